"""Which (backend, device, dtype) combinations the cross-backend tests run on, and the
shared helpers that run the head on one backend and on the reference.

Collection-time decisions, never silent:

* CPU: every backend that ``demul_fast.ops.backends.why_not(name, "cpu", dtype)`` accepts. That
  is ``torch`` always, and ``triton`` under the Triton interpreter (conftest sets
  ``TRITON_INTERPRET=1`` without a GPU) once the backend exists; the interpreter runs only
  float32 (its bf16 ``tl.dot`` is broken), so triton-on-CPU cases are float32 only.
* CUDA: every backend with every kernel dtype, marked ``gpu`` (skipped at collection,
  with the reason, without a GPU). On a GPU machine, a backend that cannot run there
  (e.g. the extension was not built) is skipped with ``why_not``'s reason.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Dict, List, Optional

import pytest
import torch

import demul_fast as df
from demul_fast.ops import backends

HAS_GPU = torch.cuda.is_available()
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}


def _interpreted(name: str, device: str) -> bool:
    return name == "triton" and device == "cpu"


def backend_params(dtypes=(torch.float32,)) -> List:
    """pytest params (backend, device, dtype) for every combination that can run here,
    plus the GPU ones (marked ``gpu``)."""
    params = []
    for name in backends.BACKENDS:
        for dtype in dtypes:
            if _interpreted(name, "cpu") and dtype != torch.float32:
                continue
            if backends.why_not(name, torch.device("cpu"), dtype) is None:
                params.append(pytest.param(name, "cpu", dtype, id=f"{name}-cpu-{DTYPE_IDS[dtype]}"))
    for name in backends.BACKENDS:
        for dtype in dtypes:
            if dtype == torch.float64 and name != "torch":
                continue
            marks = [pytest.mark.gpu]
            if HAS_GPU:
                reason = backends.why_not(name, torch.device("cuda"), dtype)
                if reason is not None:
                    marks.append(pytest.mark.skip(reason=f"backend {name} unavailable on cuda: {reason}"))
            params.append(pytest.param(name, "cuda", dtype, id=f"{name}-cuda-{DTYPE_IDS[dtype]}", marks=marks))
    return params


def available_backends(device: str, dtype=torch.float32) -> List[str]:
    """Names of the backends that can run (device, dtype) on this machine right now."""
    if device == "cuda" and not HAS_GPU:
        return []
    return [n for n in backends.BACKENDS if backends.why_not(n, torch.device(device), dtype) is None]


def backend_module(name: str):
    """The backend's implementation module (imported only when the backend is available)."""
    return importlib.import_module(backends._MODULES[name])


def make_head_inputs(gen, C=5, M=3, D=8, B=4, K=6, dtype=torch.float32, device="cpu", bias=True,
                     distill=True) -> Dict[str, Optional[torch.Tensor]]:
    """Random head inputs as a kwargs dict for ``demul_head`` (scale a float)."""
    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    return dict(
        text_features=r(C, M, D),
        prompt_logits=r(C, M),
        image_features=r(B, D),
        labels=torch.randint(0, C, (B,), generator=gen).to(device),
        scale=30.0,
        llm_embeddings=r(C, K) if distill else None,
        phi_weight=r(K, D) if distill else None,
        phi_bias=r(K) if distill and bias else None,
    )


def strided_view(name, t):
    """A differentiable, non-contiguous view with the same values: transposed storage for
    matrices and T, a view with gaps (every other element) for vectors, a storage offset for
    image_features."""
    if name == "labels":
        return torch.stack([t, t.flip(0)], dim=1)[:, 0]
    if name == "image_features":
        big = torch.cat([t.new_zeros(1, t.shape[1]), t], dim=0)
        big = torch.cat([big, big], dim=1)
        return big[1:, : t.shape[1]]
    if t.dim() == 1:
        return torch.stack([t, t], dim=1)[:, 0]
    if t.dim() == 2:
        return t.t().contiguous().t()
    return t.permute(2, 0, 1).contiguous().permute(1, 2, 0)


GRAD_ARGS = ("text_features", "prompt_logits", "image_features")


def run_head(inputs: dict, backend: Optional[str], grad_args=GRAD_ARGS, reference: bool = False,
             cast: Optional[torch.dtype] = None, view: Optional[Callable] = None, **opts):
    """Run the head (public API with ``backend``, or ``df.reference`` if ``reference``) on
    fresh leaves; return (HeadOutput, {arg: grad}). ``cast`` converts the floating inputs
    (e.g. to float64 for the exact reference). ``view(name, leaf)`` may turn a leaf into the
    tensor actually passed (a differentiable view, e.g. a non-contiguous one). Gradients of
    ``loss`` w.r.t. the leaves of ``grad_args``."""
    kwargs, leaves = {}, {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().clone() if cast is None else v.detach().to(cast)
            if k in grad_args:
                v.requires_grad_()
                leaves[k] = v
        if view is not None and isinstance(v, torch.Tensor):
            v = view(k, v)
        kwargs[k] = v
    if reference:
        out = df.reference.demul_head(**kwargs, **opts)
    else:
        out = df.demul_head(**kwargs, backend=backend, **opts)
    grads = torch.autograd.grad(out.loss, [leaves[k] for k in grad_args], allow_unused=True)
    return out, {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(grad_args, grads)}


def _assert_rounded_head(backend, inputs, fast, fast_g, grad_args, mags, ulps, mode, alpha=1.0,
                         label_smoothing=0.0, return_logits=False):
    """The head of a kernel backend in half precision against the yardstick that rounds what
    its kernels round, with the basis the backend got (demul_fast.ops.functional._basis)."""
    from demul_fast.ops.distill_basis import build_distill_basis  # noqa: PLC0415
    from rounded_yardstick import check_head  # noqa: PLC0415

    E, W, b = inputs.get("llm_embeddings"), inputs.get("phi_weight"), inputs.get("phi_bias")
    basis = build_distill_basis(W, b, E, torch.float32) if E is not None else None
    out = {"loss": fast.loss, "ce_loss": fast.ce_loss, "distill_loss": fast.distill_loss}
    if return_logits:
        out["logits"] = fast.logits
    for k in grad_args:
        assert fast_g[k].dtype == inputs[k].dtype, f"grad {k}: dtype {fast_g[k].dtype} != {inputs[k].dtype}"
        out[k] = fast_g[k]
    check_head(f"{backend}", backend, inputs["text_features"].dtype, mode, out, inputs["text_features"],
               inputs["prompt_logits"], inputs["image_features"], inputs["labels"], inputs["scale"], basis, alpha,
               label_smoothing, (1.0, 0.0, 0.0, None), mags, stored_ulps=ulps)


def assert_head_matches_reference(inputs: dict, backend: Optional[str], grad_args=GRAD_ARGS,
                                  view: Optional[Callable] = None, **opts):
    """The package's error rule (tests/numerics.py) for the head on one backend: loss parts
    (k=2), logits when asked (k=2) and gradients (k=3) against the float64 reference on the
    same inputs, with the reference accumulated in float32 on those inputs as the yardstick
    and the terms' magnitudes of ``numerics.head_magnitudes`` as the floor; a kernel backend
    in half precision against the yardstick that rounds what its kernels round
    (tests/rounded_yardstick.py), with no operand allowance. Returns the backend's output."""
    from numerics import assert_error_rule, default_compute_dtype, head_magnitudes  # noqa: PLC0415

    dtype = inputs["text_features"].dtype
    compute = default_compute_dtype(dtype)
    fast, fast_g = run_head(inputs, backend, grad_args, view=view, **opts)
    mags = head_magnitudes(inputs, opts.get("alpha", 1.0), opts.get("label_smoothing", 0.0))
    # the Triton interpreter converts float32 to bfloat16 by truncation, a GPU rounds to nearest
    interp = _interpreted(backend or "", inputs["text_features"].device.type)
    ulps = 1.0 if interp else 0.5
    kernel = backend in ("triton", "cuda")
    if kernel and dtype in (torch.bfloat16, torch.float16):
        # the kernels round their tensor-core operands and saved tensors to the half dtype by
        # design: the yardstick rounds the same values (tests/rounded_yardstick.py), float32 floors
        # (it computes its own float64 and float32 heads: the reference runs below are not needed)
        _assert_rounded_head(backend, inputs, fast, fast_g, grad_args, mags, ulps,
                             "truncate" if interp and dtype == torch.bfloat16 else "nearest", **opts)
        return fast
    ref, ref_g = run_head(inputs, None, grad_args, reference=True, cast=torch.float64, view=view, **opts)
    plain, plain_g = run_head(inputs, None, grad_args, reference=True, view=view,
                              cast=None if compute == dtype else compute, **opts)
    for part in ("loss", "ce_loss", "distill_loss", "logits"):
        f, r, p = getattr(fast, part), getattr(ref, part), getattr(plain, part)
        if r is None:
            assert f is None, f"{part}: returned without return_logits"
            continue
        assert_error_rule(f"{backend}:{part}", f, r, p, k=2.0, dtype=dtype, magnitude=mags[part],
                          stored_ulps=ulps)
    for k in grad_args:
        assert fast_g[k].dtype == inputs[k].dtype, f"grad {k}: dtype {fast_g[k].dtype} != {inputs[k].dtype}"
        assert_error_rule(f"{backend}:d{k}", fast_g[k], ref_g[k], plain_g[k], k=3.0, dtype=dtype,
                          magnitude=mags.get(k), stored_ulps=ulps)
    return fast


def part_values(inputs, impl, ls, cast=None):
    """The three standalone ops on fresh leaves: [(name, value), ...], each op's gradients on
    their own (<aggregate, R> w.r.t. T and A, ce w.r.t. X and the class features U, distill
    w.r.t. T): summed by autograd in a half-precision leaf, two ops' gradients would be
    rounded twice, which is autograd's doing, not the op's. ``impl``: an object with the
    functions ``aggregate_prompts(T, A)``, ``cosine_cross_entropy(X, U, y, scale, ls)``,
    ``prompt_distill_loss(T, W, b, E)`` (the reference, or a backend's)."""
    def leaf(t):
        t = t.detach().clone() if cast is None else t.detach().to(cast)
        return t.requires_grad_() if t.is_floating_point() else t

    T, A, X, U = (leaf(inputs[k]) for k in ("text_features", "prompt_logits", "image_features", "class_features"))
    W, b, E, R = (None if inputs[k] is None else leaf(inputs[k]).detach()
                  for k in ("phi_weight", "phi_bias", "llm_embeddings", "cotangent"))
    agg = impl.aggregate_prompts(T, A)
    ce = impl.cosine_cross_entropy(X, U, inputs["labels"], 30.0, ls)
    dist = impl.prompt_distill_loss(T, W, b, E)
    agg_grads = torch.autograd.grad((agg.double() * R.double()).sum(), [T, A])  # R in agg's dtype: exact
    ce_grads = torch.autograd.grad(ce, [X, U])
    dist_grads = torch.autograd.grad(dist, [T])
    return list(zip(PART_NAMES, [agg, ce, dist, *agg_grads, *ce_grads, *dist_grads]))


PART_NAMES = ["aggregate", "cross_entropy", "distill", "aggregate dT", "aggregate dA", "ce dX", "ce dU", "distill dT"]


class _Backend:
    """The public functions with ``backend=name`` (the shape ``part_values`` calls)."""

    def __init__(self, name):
        self.name = name

    def aggregate_prompts(self, T, A):
        return df.aggregate_prompts(T, A, backend=self.name)

    def cosine_cross_entropy(self, X, U, y, scale, ls):
        return df.cosine_cross_entropy(X, U, y, scale, ls, backend=self.name)

    def prompt_distill_loss(self, T, W, b, E):
        return df.prompt_distill_loss(T, W, b, E, backend=self.name)


def assert_parts_match_reference(inputs: dict, gen, backend: Optional[str], ls: float, impl=None, family=None,
                                 interpreted: Optional[bool] = None, mutations: Optional[dict] = None,
                                 refused: Optional[dict] = None):
    """The error rule for the three standalone ops (``part_values``) of one backend against
    the float64 reference on the same inputs: float32 and float64 inputs, and the torch
    backend, with the reference in the compute dtype as yardstick; a kernel family ("triton",
    "cuda") in half precision with the yardstick that rounds what its kernels round
    (tests/rounded_yardstick.py: ``aggregate``, ``cross_entropy``, ``distillation``), float32
    floors, no operand allowance. Adds ``class_features`` (unit rows) and the aggregate's
    ``cotangent`` to ``inputs``, drawn from ``gen``. ``impl``/``family``/``interpreted``
    default to the public functions with ``backend``, the backend's name, and whether it is
    the Triton interpreter. ``mutations`` (the check's own mutation test, as in
    kernel_checks): {name: f} changing the fast values (a dict by ``PART_NAMES``); after the
    control passes each is judged too, and ``refused[name]`` gets the failure ('' if none).

    Magnitudes of the terms: the aggregate is unit vectors; the cross-entropy's summands are
    up to 30 + log C; 1 - cos is in [0, 2]; the aggregate's gradients are sums of terms of
    the size of |R|, which cancel where an exact gradient is ~0 (e.g. D=1: u^ = +-1 is
    constant); the cross-entropy's and the distillation's gradients: below."""
    from demul_fast.ops.distill_basis import build_distill_basis  # noqa: PLC0415
    import rounded_yardstick as ry  # noqa: PLC0415
    from numerics import assert_error_rule, ce_magnitudes, default_compute_dtype, head_magnitudes  # noqa: PLC0415

    dtype, device = inputs["text_features"].dtype, inputs["text_features"].device
    C, D = inputs["text_features"].shape[0], inputs["text_features"].shape[2]
    inputs["class_features"] = torch.nn.functional.normalize(torch.randn(C, D, generator=gen), dim=-1).to(
        device=device, dtype=dtype)
    inputs["cotangent"] = torch.randn(C, D, generator=gen).to(device=device, dtype=dtype)
    family = family or backend
    interpreted = _interpreted(backend or "", device.type) if interpreted is None else interpreted
    compute = default_compute_dtype(dtype)
    fast = dict(part_values(inputs, impl or _Backend(backend), ls))
    ref = dict(part_values(inputs, df.reference, ls, cast=torch.float64))
    ulps = 1.0 if interpreted else 0.5  # the interpreter truncates float32 -> bfloat16
    mags = dict(aggregate=1.0, cross_entropy=31.0 + math.log(C), distill=2.0)
    grad_mag = max(1.0, float(inputs["cotangent"].abs().max()))
    for name in ("aggregate dT", "aggregate dA"):
        mags[name] = max(grad_mag, float(ref[name].abs().max()))
    # the cross-entropy's and the distillation's gradients have terms of their own, unrelated to
    # |R| (a flat max(|R|, ...) let a 1 % error of the distillation's dT pass in float32):
    # numerics.ce_magnitudes for the loss's cotangent 1, and head_magnitudes' T-terms for a
    # cotangent on the head's distill_loss alone (the same mean of 1 - cos over C x M)
    ce = ce_magnitudes(inputs["image_features"], inputs["class_features"], inputs["labels"], 30.0, ls, 1.0)
    mags["ce dX"], mags["ce dU"] = ce["image_features"], ce["class_features"]
    head_inputs = {k: inputs[k] for k in ("text_features", "prompt_logits", "image_features", "labels",
                                          "llm_embeddings", "phi_weight", "phi_bias")}
    mags["distill dT"] = head_magnitudes(dict(head_inputs, scale=30.0), 1.0, ls,
                                         cotangents=(0.0, 0.0, 1.0, None))["text_features"]
    if family in ("triton", "cuda") and dtype in (torch.bfloat16, torch.float16):
        mode = "truncate" if interpreted and dtype == torch.bfloat16 else "nearest"
        T, A, X, U, R = (inputs[k] for k in ("text_features", "prompt_logits", "image_features", "class_features",
                                             "cotangent"))
        W, b, E = inputs["phi_weight"], inputs["phi_bias"], inputs["llm_embeddings"]
        basis = build_distill_basis(W, b, E, dtype=torch.float32)  # as demul_fast.ops.functional builds it
        # (the op's yardstick, its arguments, {its key: the part's name})
        checks = [(ry.aggregate, (T, A, R), dict(class_features="aggregate", text_features="aggregate dT",
                                                 prompt_logits="aggregate dA")),
                  (ry.cross_entropy, (X, U, inputs["labels"], 30.0, ls, 1.0),
                   dict(ce_loss="cross_entropy", image_features="ce dX", class_features="ce dU")),
                  (ry.distillation, (T, basis, 1.0), dict(distill_loss="distill", text_features="distill dT"))]

        def judge(label, f):
            for op, args, names in checks:
                ry.check_op(f"{label} {op.__name__}", op, family, dtype, mode, {k: f[n] for k, n in names.items()},
                            args, {k: mags[n] for k, n in names.items()}, stored_ulps=ulps)
    else:
        plain = dict(part_values(inputs, df.reference, ls, cast=None if compute == dtype else compute))

        def judge(label, f):
            for name in PART_NAMES:
                grad = " d" in name
                assert_error_rule(f"{label}:{name}", f[name], ref[name], plain[name], k=3.0 if grad else 2.0,
                                  dtype=dtype, magnitude=mags[name], stored_ulps=ulps)
    judge(f"{backend or family}", fast)
    for label, change in (mutations or {}).items():
        try:
            judge(f"{backend or family} [{label}]", change(dict(fast)))
            refused[label] = ""
        except AssertionError as e:
            refused[label] = str(e).split("\n")[0] or "refused"
