"""The "triton" backend against the float64 reference, with the error rule (tests/numerics.py).

Without a GPU these run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest); its
dots round their operands to the input dtype first (demul_fast/kernels/launch.emulate_dot), so the
bf16/fp16 products the tensor cores would form are tested here in float32, bfloat16 and
float16. Every output buffer is filled with NaN before its kernel runs (POISON_OUTPUTS), so
an element a kernel forgets to write fails. The distillation is the K-free form (SPEC 4.3)
against the reference's direct form, for K > D, K = D and K < D, with and without bias.
Shapes are odd (C=37, M=3, D=100) or cross block boundaries (D=300: five 64-column chunks,
three output chunks; C=40 at M=5: three row tiles; M=17: BLOCK_M=32).
"""

import math

import pytest
import torch

from demul_fast import reference as ref
from demul_fast.ops import backends
from demul_fast.ops import functional as F
from demul_fast.ops.capability import Call
from demul_fast.ops.distill_basis import build_distill_basis
from numerics import assert_error_rule, ce_magnitudes, default_compute_dtype, head_magnitudes
import rounded_yardstick

from demul_fast.ops import triton_ops  # triton is in the test extra (checked by conftest)

if triton_ops.UNAVAILABLE_REASON:
    pytest.skip(triton_ops.UNAVAILABLE_REASON, allow_module_level=True)
from demul_fast.kernels import cosine_ce, launch, text_head  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ODD = dict(C=37, M=3, D=100, B=5, K=70)
CROSSING = dict(C=40, M=5, D=300, B=20, K=40)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


def make_inputs(gen, C, M, D, B, K, bias=True):
    """Float64 inputs on DEVICE: T, A, X, y, E, W, b (b None without bias)."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE)
    T = rnd(C, M, D)
    A = rnd(C, M)
    X = rnd(B, D)
    y = torch.randint(0, C, (B,), generator=gen).to(DEVICE)
    E = rnd(C, K)
    W = rnd(K, D, scale=1 / math.sqrt(D))
    b = rnd(K, scale=0.5) if bias else None
    return T, A, X, y, E, W, b


def run(fn, args, diff, dtype, cotangents=None):
    """Call fn(*args) with the float tensors cast to dtype, the positions in ``diff``
    requiring grad. Returns (outputs tuple, grads of sum_i <out_i, cotangent_i>)."""
    cast = [a.detach().to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    for i in diff:
        cast[i].requires_grad_(True)
    out = fn(*cast)
    outs = tuple(out) if isinstance(out, tuple) else (out,)
    outs = tuple(o for o in outs if o is not None)
    cots = cotangents or [torch.ones_like(o, dtype=torch.float64) for o in outs]
    total = sum((o.double() * c).sum() for o, c in zip(outs, cots))
    grads = torch.autograd.grad(total, [cast[i] for i in diff])
    return outs, grads


def check(name, fast_fn, ref_fn, args, diff, dtype=torch.float32, cotangents=None, grad_names=None):
    """Error rule for every output (k=2) and every gradient (k=3): fast in ``dtype`` vs the
    float64 reference, bounded by the reference's own error on the same ``dtype`` inputs
    accumulated in float32 (tests/numerics.py). Float32 inputs only: in half precision the
    kernels round some operands by design, and the ops' tests use ``check_rounded``."""
    assert dtype == torch.float32, "half precision: check_rounded (the rounded yardstick)"
    fo, fg = run(fast_fn, args, diff, dtype, cotangents)
    if cotangents is not None:  # autograd hands a half-precision output its cotangent rounded
        cotangents = [c.to(f.dtype).double() for c, f in zip(cotangents, fo)]
    rounded = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    ro, rg = run(ref_fn, rounded, diff, torch.float64, cotangents)  # exact, on the same rounded inputs
    po, pg = run(ref_fn, rounded, diff, default_compute_dtype(dtype), cotangents)
    assert len(fo) == len(ro)
    for i, (f, r, p) in enumerate(zip(fo, ro, po)):
        assert_error_rule(f"{name} out{i}", f, r, p, k=2.0, dtype=dtype)
    for j, (f, r, p) in enumerate(zip(fg, rg, pg)):
        label = grad_names[j] if grad_names else f"grad{j}"
        assert_error_rule(f"{name} {label}", f, r, p, k=3.0, dtype=dtype)
    return fo, fg


def check_rounded(name, op, fast_fn, args, diff, dtype, cotangents, keys, yard_args, magnitudes):
    """A standalone op in half precision against the yardstick that rounds what its kernels
    round (tests/rounded_yardstick.py: ``aggregate``, ``cross_entropy``, ``distillation``),
    float32 floors, no operand allowance. keys: the yardstick's names of the outputs, then of
    the gradients; yard_args: the op's arguments (rounded) after the family."""
    fo, fg = run(fast_fn, args, diff, dtype, cotangents)
    interp = DEVICE == "cpu"  # the interpreter truncates float32 -> bfloat16; a GPU rounds to nearest
    rounded_yardstick.check_op(name, op, "triton", dtype, "truncate" if interp and dtype == torch.bfloat16
                               else "nearest", dict(zip(keys, list(fo) + list(fg))), yard_args, magnitudes,
                               stored_ulps=1.0 if interp else 0.5)
    return fo, fg


def rand_like(gen, t):
    return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device)


def test_backend_available_here():
    assert backends.why_not("triton", torch.device(DEVICE), torch.float32) is None


@pytest.mark.parametrize("shape", [ODD, CROSSING, dict(C=5, M=17, D=40, B=1, K=1)], ids=["odd", "crossing", "M17"])
def test_aggregate_prompts(gen, shape):
    T, A, *_ = make_inputs(gen, **shape)
    cot = [rand_like(gen, torch.empty(shape["C"], shape["D"]))]
    fo, _ = check("aggregate", lambda t, a: F.aggregate_prompts(t, a, backend="triton"), ref.aggregate_prompts,
                  [T, A], diff=[0, 1], cotangents=cot, grad_names=["dT", "dA"])
    assert fo[0].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_aggregate_prompts_half_precision(gen, dtype):
    """u^ stored in T's dtype and read back by the backward (the yardstick's one site)."""
    T, A, *_ = make_inputs(gen, **ODD)
    cot = rand_like(gen, torch.empty(ODD["C"], ODD["D"])).to(dtype).double()
    fo, _ = check_rounded(f"aggregate {dtype}", rounded_yardstick.aggregate,
                          lambda t, a: F.aggregate_prompts(t, a, backend="triton"), [T, A], [0, 1], dtype, [cot],
                          ["class_features", "text_features", "prompt_logits"], (T.to(dtype), A.to(dtype), cot), {})
    assert fo[0].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cosine_cross_entropy_half_precision(gen, dtype):
    """B G stored in X's dtype, x^ rounded as the dU dot's operand (the yardstick's sites)."""
    _, _, X, y, *_ = make_inputs(gen, **ODD)
    U = ref.l2_normalize(rand_like(gen, torch.empty(ODD["C"], ODD["D"])))
    tau = torch.tensor(14.3, dtype=torch.float64, device=DEVICE)
    Xh, Uh, g = X.to(dtype), U.to(dtype), 0.7
    cot = [torch.tensor(g, dtype=torch.float64, device=DEVICE)]
    check_rounded(f"ce {dtype}", rounded_yardstick.cross_entropy,
                  lambda x, u, s: F.cosine_cross_entropy(x, u, y, s, 0.1, backend="triton"), [X, U, tau], [0, 1, 2],
                  dtype, cot, ["ce_loss", "image_features", "class_features", "scale"],
                  (Xh, Uh, y, float(tau.to(dtype)), 0.1, g), ce_magnitudes(Xh, Uh, y, float(tau.to(dtype)), 0.1, g))


@pytest.mark.parametrize("shape,ls", [(ODD, 0.0), (ODD, 0.1), (CROSSING, 0.1)], ids=["odd-ls0", "odd-ls0.1", "crossing"])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_cosine_cross_entropy(gen, shape, ls, scale_kind):
    _, _, X, y, *_ = make_inputs(gen, **shape)
    U = ref.l2_normalize(rand_like(gen, torch.empty(shape["C"], shape["D"])))
    tau = 14.3 if scale_kind == "float" else torch.tensor(14.3, dtype=torch.float64, device=DEVICE)
    args = [X, U, y, tau]
    diff = [0, 1, 3] if scale_kind == "tensor" else [0, 1]
    fo, _ = check(f"ce({scale_kind})",
                  lambda x, u, yy, s: F.cosine_cross_entropy(x, u, yy, s, ls, backend="triton"),
                  lambda x, u, yy, s: ref.cosine_cross_entropy(x, u, yy, s, ls),
                  args, diff=diff, grad_names=["dX", "dU", "dscale"])
    assert fo[0].dtype == torch.float32 and fo[0].dim() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cosine_cross_entropy_split_classes(gen, dtype):
    """B=70 (two image tiles, the second partial), C=130: nine class splits merged by the
    merge pass, three class splits of the dX pass summed by its finish."""
    shape = dict(C=130, M=1, D=32, B=70, K=1)
    cfg = cosine_ce.ce_config(70, 130, 32)
    assert cfg["splits"] > 1 and cfg["dx_splits"] > 1 and 70 % 64
    _, _, X, y, *_ = make_inputs(gen, **shape)
    U = ref.l2_normalize(rand_like(gen, torch.empty(130, 32)))
    fast = (lambda x, u: F.cosine_cross_entropy(x, u, y, 20.0, 0.1, backend="triton"))
    if dtype == torch.float32:
        check(f"ce split {dtype}", fast, lambda x, u: ref.cosine_cross_entropy(x, u, y, 20.0, 0.1), [X, U],
              diff=[0, 1], dtype=dtype, grad_names=["dX", "dU"])
    else:
        Xh, Uh = X.to(dtype), U.to(dtype)
        check_rounded(f"ce split {dtype}", rounded_yardstick.cross_entropy, fast, [X, U], [0, 1], dtype,
                      [torch.tensor(1.0, dtype=torch.float64, device=DEVICE)],
                      ["ce_loss", "image_features", "class_features"], (Xh, Uh, y, 20.0, 0.1, 1.0),
                      ce_magnitudes(Xh, Uh, y, 20.0, 0.1, 1.0))


def test_cosine_cross_entropy_class_grad_only(gen):
    """X without grad: the dX kernel is skipped, dU still right."""
    _, _, X, y, *_ = make_inputs(gen, **ODD)
    U = ref.l2_normalize(rand_like(gen, torch.empty(ODD["C"], ODD["D"])))
    check("ce(dU only)", lambda x, u, yy: F.cosine_cross_entropy(x, u, yy, 30.0, backend="triton"),
          lambda x, u, yy: ref.cosine_cross_entropy(x, u, yy, 30.0), [X, U, y], diff=[1], grad_names=["dU"])


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SMALL = dict(C=5, M=3, D=24, B=4, K=40)


def basis_of(W, b, E):
    return build_distill_basis(W, b, E) if W is not None else None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,bias", [(40, True), (24, False), (16, True)], ids=["K>D-bias", "K=D", "K<D-bias"])
def test_prompt_distill_loss(gen, K, bias, dtype):
    T, _, _, _, E, W, b = make_inputs(gen, bias=bias, **dict(SMALL, K=K))
    basis = basis_of(W, b, E)
    fast = (lambda t: triton_ops.prompt_distill_loss(t, basis))
    if dtype == torch.float32:
        fo, _ = check(f"distill {dtype}", fast,
                      lambda t: ref.prompt_distill_loss(t, W.to(t.dtype), None if b is None else b.to(t.dtype),
                                                        E.to(t.dtype)), [T], diff=[0], dtype=dtype, grad_names=["dT"])
    else:  # the saved v and dv|z| rounded as the kernels round them (tests/rounded_yardstick.py)
        fo, _ = check_rounded(f"distill {dtype}", rounded_yardstick.distillation, fast, [T], [0], dtype,
                              [torch.tensor(1.0, dtype=torch.float64, device=DEVICE)],
                              ["distill_loss", "text_features"], (T.to(dtype), basis, 1.0), {"distill_loss": 2.0})
    assert fo[0].dtype == torch.float32


@pytest.mark.parametrize("shape", [ODD, CROSSING], ids=["odd", "crossing"])
def test_prompt_distill_loss_shapes(gen, shape):
    T, _, _, _, E, W, b = make_inputs(gen, **shape)
    basis = basis_of(W, b, E)
    check("distill", lambda t: triton_ops.prompt_distill_loss(t, basis),
          lambda t: ref.prompt_distill_loss(t, W.to(t.dtype), b.to(t.dtype), E.to(t.dtype)), [T], diff=[0],
          grad_names=["dT"])


def test_distill_small_projection():
    """W t^ close to -b (|z| << |b|): the K-free form has no cancellation (SPEC 4.3)."""
    gen = torch.Generator().manual_seed(7)
    C, M, D, K = 3, 2, 16, 24
    T = torch.randn(C, M, D, generator=gen, dtype=torch.float64)
    W = torch.randn(K, D, generator=gen, dtype=torch.float64)
    t_hat = ref.l2_normalize(T)
    b = -(t_hat[0, 0] @ W.T) + 1e-3 * torch.randn(K, generator=gen, dtype=torch.float64)
    E = torch.randn(C, K, generator=gen, dtype=torch.float64)
    basis = basis_of(W, b, E)
    check("distill near -b", lambda t: triton_ops.prompt_distill_loss(t, basis),
          lambda t: ref.prompt_distill_loss(t, W.to(t), b.to(t), E.to(t)), [T.to(DEVICE)], diff=[0], grad_names=["dT"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_distill_backward_near_cos_one(dtype):
    """Every e^ close to its prompts' z^ (cos near 1, dv |z| = F - (cos/|z|) v about 1e-3 of
    |F|): the backward's <v - c, dv |z|> comes from the forward as <v - c, F> - (cos/|z|)
    <v - c, v> (text_head._distill_finish's PV), two sums that cancel to about 1e-3 here.
    D = r = 300 with K > D: three output chunks, each reading only its triangle of R."""
    gen = torch.Generator().manual_seed(11)
    C, M, D, K = 6, 3, 300, 320
    T = torch.randn(C, 1, D, generator=gen, dtype=torch.float64) \
        + 1e-3 * torch.randn(C, M, D, generator=gen, dtype=torch.float64)
    T = T.to(dtype).double()  # the rows the kernels see, so that E matches them
    W = torch.randn(K, D, generator=gen, dtype=torch.float64) / math.sqrt(D)
    b = 0.5 * torch.randn(K, generator=gen, dtype=torch.float64)
    z = ref.l2_normalize(T) @ W.T + b
    E = 2.0 * z.mean(1) + 1e-3 * torch.randn(C, K, generator=gen, dtype=torch.float64)
    e_hat, z_hat = ref.l2_normalize(E)[:, None, :], ref.l2_normalize(z)
    cos = (e_hat * z_hat).sum(-1, keepdim=True)
    assert float((e_hat - cos * z_hat).norm(dim=-1).max()) < 1e-2  # dv |z| small: the case is near-cancelling
    T, W, b, E = (t.to(DEVICE) for t in (T, W, b, E))
    basis = basis_of(W, b, E)
    fast = (lambda t: triton_ops.prompt_distill_loss(t, basis))
    if dtype == torch.float32:  # check()'s rule with the loss's terms (1 and cos) as its magnitude, as below
        def reference(t):
            return ref.prompt_distill_loss(t, W.to(t), b.to(t), E.to(t))
        (fo,), (fg,) = run(fast, [T], [0], dtype)
        (ro,), (rg,) = run(reference, [T], [0], torch.float64)
        (po,), (pg,) = run(reference, [T], [0], torch.float32)
        assert_error_rule("distill near cos 1 loss", fo, ro, po, k=2.0, dtype=dtype, magnitude=2.0)
        assert_error_rule("distill near cos 1 dT", fg, rg, pg, k=3.0, dtype=dtype)
    else:
        check_rounded(f"distill near cos 1 {dtype}", rounded_yardstick.distillation, fast, [T], [0], dtype,
                      [torch.tensor(1.0, dtype=torch.float64, device=DEVICE)], ["distill_loss", "text_features"],
                      (T.to(dtype), basis, 1.0), {"distill_loss": 2.0})


HEAD_CASES = [
    # shape, label_smoothing, alpha, bias, llm embeddings, return_logits, scale tensor
    (ODD, 0.0, 1.0, True, True, False, False),
    (ODD, 0.1, 0.0, False, True, True, True),
    (CROSSING, 0.1, 1.0, False, True, True, False),
    (ODD, 0.0, 1.0, False, False, False, True),
]


def head_fns(y, E, W, b, alpha, ls, return_logits):
    """(triton, reference) callables (t, a, x, s) -> tuple of HeadOutput fields."""
    basis = basis_of(W, b, E)

    def fast(t, a, x, s):
        out = triton_ops.demul_head(t, a, x, y, s, basis, alpha=alpha, label_smoothing=ls, return_logits=return_logits)
        assert (out.logits is not None) == return_logits
        return tuple(o for o in out if o is not None)

    def slow(t, a, x, s):
        cast = (lambda v: None if v is None else v.to(t.dtype))
        out = ref.demul_head(t, a, x, y, s, cast(E), cast(W), cast(b), alpha=alpha, label_smoothing=ls,
                             return_logits=return_logits)
        return tuple(o for o in out if o is not None)
    return fast, slow


@pytest.mark.parametrize("shape,ls,alpha,bias,with_llm,return_logits,scale_tensor", HEAD_CASES,
                         ids=["odd", "odd-ls-alpha0-logits", "crossing-logits", "no-llm"])
def test_demul_head(gen, shape, ls, alpha, bias, with_llm, return_logits, scale_tensor):
    T, A, X, y, E, W, b = make_inputs(gen, bias=bias, **shape)
    if not with_llm:
        E = W = b = None
    tau = torch.tensor(17.0, dtype=torch.float64, device=DEVICE) if scale_tensor else 17.0
    # a different weight on every output, so each output's gradient path is exercised
    C, B = shape["C"], shape["B"]
    cot = [torch.tensor(w, dtype=torch.float64, device=DEVICE) for w in (1.0, 0.3, -0.7)]
    if return_logits:
        cot.append(rand_like(gen, torch.empty(B, C)) / (B * C))
    diff = [0, 1, 2, 3] if scale_tensor else [0, 1, 2]
    fast, slow = head_fns(y, E, W, b, alpha, ls, return_logits)
    fo, _ = check("head", fast, slow, [T, A, X, tau], diff=diff, cotangents=cot,
                  grad_names=["dT", "dA", "dX", "dscale"])
    assert all(o.dtype == torch.float32 for o in fo[:3])
    if not with_llm:
        assert float(fo[2].detach()) == 0.0


def test_head_sweep_in_rounds(gen, monkeypatch):
    """The dU pass's sweep for the text backward (cosine_ce._ce_du_kernel, SWEEP) in rounds of
    2 prompt rows per class: M = 5 takes three rounds, the last one partial."""
    monkeypatch.setattr(cosine_ce, "SWEEP_ELEMS", cosine_ce.BLOCK_CU * cosine_ce.BLOCK_DO * 2)
    shape = dict(CROSSING, D=100)
    assert cosine_ce.sweep_rows(shape["M"], cosine_ce.ce_config(shape["B"], shape["C"], shape["D"])["BLOCK_DU"]) == 2
    T, A, X, y, E, W, b = make_inputs(gen, **shape)
    fast, slow = head_fns(y, E, W, b, 1.0, 0.0, False)
    check("head", fast, slow, [T, A, X, 17.0], diff=[0, 1, 2], grad_names=["dT", "dA", "dX"])


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("path", ["128-rows", "64-rows", "streamed"])
def test_head_half_precision(gen, monkeypatch, dtype, path):
    """Half inputs, the GPU's operand rounding emulated: outputs in the input dtype, losses
    in float32; the error rule against the yardstick that rounds what the kernels round
    (tests/rounded_yardstick.py), with float32 floors and no operand allowance. Each path of
    the text forward's aggregation (the 128-row tile's parts, the 64-row resident tile, the
    streamed tile), which also stores the u^ the CE passes read in X's type."""
    if path == "64-rows":
        monkeypatch.setattr(text_head, "wide_tiles_fit", lambda device: False)
    elif path == "streamed":
        monkeypatch.setattr(text_head, "RESIDENT_BYTES", 0)
    T, A, X, y, E, W, b = make_inputs(gen, **dict(SMALL, C=9, B=6))
    cfg = text_head.text_config(9, SMALL["M"], SMALL["D"], min(SMALL["K"], SMALL["D"]), 2,
                                text_head.wide_tiles_fit(None))
    assert (bool(cfg["AGG_PARTS"]), cfg["RESIDENT"]) == {"128-rows": (True, True), "64-rows": (False, True),
                                                          "streamed": (False, False)}[path], cfg
    fast, _ = head_fns(y, E, W, b, 1.0, 0.1, True)
    GL = rand_like(gen, torch.empty(6, 9)) / 54
    cot = [torch.tensor(1.0, dtype=torch.float64, device=DEVICE)] * 3 + [GL]
    fo, fg = run(lambda t, a, x: fast(t, a, x, 12.0), [T, A, X], [0, 1, 2], dtype, cot)
    assert [o.dtype for o in fo] == [torch.float32] * 3 + [dtype]
    assert all(g.dtype == dtype for g in fg)
    keys = ["loss", "ce_loss", "distill_loss", "logits", "text_features", "prompt_logits", "image_features"]
    rounded = dict(text_features=T.to(dtype), prompt_logits=A.to(dtype), image_features=X.to(dtype), labels=y,
                   scale=12.0, llm_embeddings=E, phi_weight=W, phi_bias=b)
    # the terms' magnitudes for this objective: loss + ce + dist + <GL, logits> (tests/numerics.py)
    mags = head_magnitudes(rounded, 1.0, 0.1, cotangents=(1.0, 1.0, 1.0, GL.to(dtype)))
    interp = DEVICE == "cpu"
    rounded_yardstick.check_head(f"head {dtype}", "triton", dtype,
                                 "truncate" if interp and dtype == torch.bfloat16 else "nearest",
                                 dict(zip(keys, list(fo) + list(fg))), T.to(dtype), A.to(dtype), X.to(dtype), y, 12.0,
                                 basis_of(W, b, E), 1.0, 0.1, (1.0, 1.0, 1.0, GL.to(dtype)), mags,
                                 stored_ulps=1.0 if interp else 0.5)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_head_cancelling_text_gradient(dtype, scale):
    """D = 1: normalising a 1-vector has zero gradient, so dT is exactly 0 and what the kernel
    returns is its own rounding, held to float32 floors on the terms that cancel. Class 22 of
    this draw has |u| = 0.014 (its prompts' signs nearly cancel), so the terms of
    dL/du = (gu - <u^, gu> u^) / |u| are large. The text backward's product that spreads w du
    to the rows ran as two bfloat16 pieces (3 products, 3 2^-16 of each term): an error of
    about 65 float32 units of the terms' magnitude here, 4x the floor, in bfloat16 and float16
    (found by hypothesis in tests/test_properties.py); three pieces keep it at float32's."""
    from backend_cases import assert_head_matches_reference, make_head_inputs  # noqa: PLC0415

    inputs = make_head_inputs(torch.Generator().manual_seed(0), C=33, M=8, D=1, B=33, K=33, dtype=dtype,
                              device=DEVICE, bias=False)
    inputs["scale"] = scale
    assert_head_matches_reference(inputs, "triton", label_smoothing=0.0, alpha=1.0, return_logits=False)


@triton.jit
def _split_product_kernel(A, B, O, K: tl.constexpr, N: tl.constexpr, MR: tl.constexpr, EMULATE: tl.constexpr):
    rows, ks, cols = tl.arange(0, MR), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(A + rows[:, None] * K + ks[None, :])
    b = tl.load(B + ks[:, None] * N + cols[None, :])
    acc = text_head._dot_f32(a, b, tl.zeros([MR, N], dtype=tl.float32), tl.bfloat16, EMULATE)
    tl.store(O + rows[:, None] * N + cols[None, :], acc)


def test_split_product_keeps_float32_precision(gen):
    """text_head._dot_f32 (float32 operands on the bfloat16 tensor cores, three pieces each)
    against float64: within 8 float32 units of sum |a| |b| per element, on operands spread over
    2^-20..2^20. Dropping the third pieces' products (a0 b2, a2 b0) leaves 2^-15 (truncating) /
    2^-17 (rounding) of the terms and fails; so does the former two-piece form."""
    MR, K, N = 32, 16, 64
    def spread(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64)
                * 2.0 ** torch.randint(-20, 21, shape, generator=gen)).float().to(DEVICE)
    a, b = spread(MR, K), spread(K, N)
    out = torch.empty(MR, N, dtype=torch.float32, device=DEVICE)
    _split_product_kernel[(1,)](a, b, out, K=K, N=N, MR=MR, EMULATE=launch.emulate_dot(torch.bfloat16))
    exact = a.double() @ b.double()
    terms = a.double().abs() @ b.double().abs()
    ratio = float(((out.double() - exact).abs() / terms).max())
    print(f"max error / sum |a||b| = {ratio:.3e} = {ratio / torch.finfo(torch.float32).eps:.2f} float32 units")
    assert ratio <= 8 * torch.finfo(torch.float32).eps


def test_head_noncontiguous_and_mixed_dtypes(gen):
    """Strided T (read in place, no copy) and X, prompt logits in float64 beside float32 features."""
    C, M, D, B, K = 6, 3, 20, 4, 16
    T, A, X, y, E, W, b = make_inputs(gen, C=C, M=M, D=D, B=B, K=K)
    T_strided = T.float().permute(2, 0, 1).contiguous().permute(1, 2, 0)  # same values, D-stride C*M
    X_strided = X.float().t().contiguous().t()
    assert not T_strided.is_contiguous() and not X_strided.is_contiguous()
    T_strided.requires_grad_(True)
    A64 = A.clone().requires_grad_(True)
    out = triton_ops.demul_head(T_strided, A64, X_strided, y.int(), 9.0, basis_of(W, b, E), alpha=0.5)
    out.loss.backward()
    T64, A_ref = T.clone().requires_grad_(True), A.clone().requires_grad_(True)
    r = ref.demul_head(T64, A_ref, X, y, 9.0, E, W, b, alpha=0.5)
    r.loss.backward()
    torch.testing.assert_close(out.loss.double(), r.loss, rtol=1e-5, atol=1e-6)
    assert A64.grad.dtype == torch.float64 and T_strided.grad.dtype == torch.float32
    torch.testing.assert_close(T_strided.grad.double(), T64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(A64.grad, A_ref.grad, rtol=1e-4, atol=1e-6)


def test_labels_out_of_range_read_nothing(gen):
    """Validation is bypassed here: a label outside [0, C) must only fail to match a class
    (no out-of-bounds read), leaving lse - (ls/C) sum_c s for that row."""
    B, C, D = 3, 5, 16
    X = torch.randn(B, D, generator=gen).to(DEVICE)
    U = ref.l2_normalize(torch.randn(C, D, generator=gen)).to(DEVICE)
    y = torch.tensor([C + 1000, -7, 2], device=DEVICE)
    scale = torch.full((), 5.0, device=DEVICE)
    rows, lse, _, logits = cosine_ce.ce_forward(X, U, y, scale, 0.1, True)
    s = ref.cosine_logits(X, U, 5.0)
    torch.testing.assert_close(logits, s)
    expect = torch.logsumexp(s, -1) - 0.1 / C * s.sum(-1)
    expect[2] -= 0.9 * s[2, 2]
    torch.testing.assert_close(rows, expect)


@pytest.mark.parametrize("preset", [-1, 0], ids=["no-last-ticket", "zeroed"])
def test_losses_run_in_the_program_with_the_last_ticket(gen, monkeypatch, preset):
    """The head's forward finish (cosine_ce._fwd_finish_kernel) reduces the losses in the one
    program that takes the last ticket (the others' rows are stored by then, on a GPU too).
    The interpreter runs programs in order, so a gate that lets every program reduce would
    still end on the right value here: the ticket is set before the launch instead. From -1 no
    program takes the last ticket, and the losses must stay unwritten (NaN-poisoned); from 0
    (what ce_fwd's first program stores) they are written. B = 100, C*M = 111: 4 merge
    programs."""
    T, A, X, y, E, W, b = make_inputs(gen, C=37, M=3, D=24, B=100, K=30)
    real = cosine_ce._fwd_finish_kernel

    class Preset:
        def __getitem__(self, grid):
            assert grid[0] > 1, grid
            def launch_it(*args, **kwargs):
                tickets = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.int32]
                assert len(tickets) == 1
                tickets[0].fill_(preset)
                return real[grid](*args, **kwargs)
            return launch_it

    monkeypatch.setattr(cosine_ce, "_fwd_finish_kernel", Preset())
    out = triton_ops.demul_head(T.float(), A.float(), X.float(), y, torch.full((), 5.0, device=DEVICE),
                                basis_of(W, b, E))
    for value in (out.loss, out.ce_loss, out.distill_loss):
        assert bool(torch.isnan(value)) == (preset == -1), (preset, value)


def _triton_refusal(fn, **args):
    """The triton backend's capability answer (demul_fast.ops.capability) for a call on DEVICE."""
    lead = args["text_features"] if args.get("text_features") is not None else args["image_features"]
    return triton_ops.capability(Call(torch.device(DEVICE), lead.dtype, fn, args)).reason


def test_frozen_parameters_refuse_grad(gen):
    """phi/E that require grad are refused by the backend's `capability`, naming the
    argument (demul_fast.ops.functional then runs the direct form on the torch backend)."""
    T, A, X, y, E, W, b = make_inputs(gen, C=4, M=2, D=8, B=2, K=8)
    why = _triton_refusal("demul_head", text_features=T.float(), image_features=X.float(),
                          phi_weight=W.float().requires_grad_(True), phi_bias=None, llm_embeddings=E.float())
    assert why and "phi_weight" in why
    why = _triton_refusal("prompt_distill_loss", text_features=T.float(), phi_weight=W.float(),
                          llm_embeddings=E.float().requires_grad_(True))
    assert why and "llm_embeddings" in why
    assert _triton_refusal("demul_head", text_features=T.float(), image_features=X.float()) is None
    basis = basis_of(W, b, E)
    assert _triton_refusal("demul_head", text_features=T.float(), distill_basis=basis) is None
    grad_basis = basis._replace(F=basis.F.clone().requires_grad_(True))
    assert "no gradient" in _triton_refusal("demul_head", text_features=T.float(), distill_basis=grad_basis)


def test_ops_registered():
    names = {str(op) for op in triton_ops.OPS}
    for base in ("aggregate_prompts", "cosine_cross_entropy", "prompt_distill_loss", "demul_head"):
        assert f"demul_fast.triton_{base}.default" in names and f"demul_fast.triton_{base}_backward.default" in names
    assert all(isinstance(op, torch._ops.OpOverload) for op in triton_ops.OPS)
    assert triton_ops.DISTILL_BASIS is True


def test_double_backward_refused(gen):
    T, A, X, y, E, W, b = make_inputs(gen, C=4, M=2, D=8, B=2, K=8)
    T = T.float().requires_grad_(True)
    out = triton_ops.demul_head(T, A.float(), X.float(), y, 5.0, basis_of(W, b, E))
    (dT,) = torch.autograd.grad(out.loss, [T], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        dT.sum().backward()


def test_shape_limits():
    """Text tiles beyond MAX_BLOCK_M prompts and D beyond MAX_D are refused with a clear error
    (before any launch, through the backend's `capability`)."""
    with pytest.raises(ValueError, match="D <= 1024"):
        launch.block_d(1025)
    with pytest.raises(ValueError, match="M <= 128"):
        text_head.text_config(10, 129, 64, 64)
    assert "M <= 128" in _triton_refusal("aggregate_prompts", text_features=torch.empty(2, 129, 8))
    assert "D <= 1024" in _triton_refusal("cosine_cross_entropy", text_features=None,
                                          image_features=torch.empty(3, 1025), class_features=torch.empty(2, 1025))


@pytest.mark.parametrize("B,C,D", [(256, 1000, 512), (1024, 21841, 512), (5, 37, 100)])
def test_launch_configs(B, C, D):
    """Row tiles of 64 with 4 warps, 128 rows in the resident forward and the backward (8
    warps; 16-bit T at D=512); the grids cover 90% of a wave of 132 programs at the presets
    (one split fewer reads each image or row tile once less), the sizes add up."""
    cfg = text_head.text_config(C, 8, D, D)
    assert cfg["BLOCK_CLS"] * cfg["BLOCK_M"] == 64 and cfg["num_warps"] == 4
    assert cfg["fwd_BLOCK_CLS"] * cfg["BLOCK_M"] == cfg["bwd_BLOCK_CLS"] * cfg["BLOCK_M"] == 128
    assert cfg["AGG_PARTS"] == 2 and cfg["fwd_warps"] == cfg["bwd_warps"] == 8
    assert cfg["splits"] * cfg["cols_per_split"] >= D > (cfg["splits"] - 1) * cfg["cols_per_split"]
    assert not text_head.text_config(C, 8, D, D, wide=False)["AGG_PARTS"]  # a GPU without the shared memory
    ce = cosine_ce.ce_config(B, C, D)
    assert ce["splits"] * ce["cls_per_split"] >= C > (ce["splits"] - 1) * ce["cls_per_split"]
    if C >= 1000:
        wave = 0.9 * 132
        assert cfg["fwd_tiles"] * cfg["splits"] >= wave and cfg["bwd_tiles"] * cfg["out_chunks"] >= wave
        assert ce["b_tiles"] * ce["splits"] >= wave and ce["du_tiles"] * ce["du_chunks"] >= wave
        assert ce["b_tiles"] * ce["out_chunks"] * ce["dx_splits"] >= 132
