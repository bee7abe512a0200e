"""Mutation test of the head's checks on every CPU-runnable path and dtype: wrong heads fail.

Paths: the torch backend, the Triton kernels (interpreter) and the CUDA kernels (csrc/ in
the CPU emulation, tests/cuda_emu), each in float32, bfloat16 and float16. Each path runs
the head once correctly (the control, which must pass) and once per input mutation; the
gradient mutations are applied to the control's gradients, which is exactly what wrapping
the op's backward would do (the gradient reaches the caller through it). The check is the
one the kernel tests use: the error rule of tests/numerics.py against the yardstick of
tests/rounded_yardstick.py, which rounds what the path's kernels round (nothing for torch
and float32), with float32-level floors and no operand allowance, on every output (loss,
ce, dist, logits) and gradient (T, A, X).

Mutations (``MUTATIONS``): alpha x1.05, scale x1.01, phi's bias dropped (c, delta, beta of
the basis zeroed), label smoothing ignored; dT, dX, dA x1.05; each of them with its sign
flipped; each set to zero; dT, dX, dA x1.01 (a 1 % error in one gradient alone); the last class's dA never written (zero: what unpoisoned memory
may hold; poisoned outputs turn a missing write into NaN, which fails trivially).

``python tests/test_mutations.py`` prints the table of which check refuses each mutation
(docs/testing-precision.md holds a copy).
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from demul_fast import reference as ref
from demul_fast.ops import torch_ops
from demul_fast.ops.distill_basis import build_distill_basis
from numerics import assert_error_rule, head_magnitudes
import rounded_yardstick

pytestmark = pytest.mark.usefixtures("one_thread")

# CE-heavy proportions at CLIP's logit scale (C/B = 3, tau = 100, K > D), every size odd,
# small enough for the interpreter and the emulation (one tile each)
SHAPE = dict(C=13, M=3, D=37, B=5, K=45)
TAU, ALPHA, LS = 100.0, 1.0, 0.1
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
GRADS = {"dT": "text_features", "dA": "prompt_logits", "dX": "image_features"}


def _zero_bias(basis):
    return basis._replace(c=torch.zeros_like(basis.c), delta=torch.zeros_like(basis.delta),
                          beta=torch.zeros_like(basis.beta))


# input mutations: (name, change of the call's keyword arguments)
INPUT_MUTATIONS = {
    "alpha x1.05": lambda kw: kw.update(alpha=kw["alpha"] * 1.05),
    "scale x1.01": lambda kw: kw.update(scale=kw["scale"] * 1.01),
    "phi bias dropped": lambda kw: kw.update(basis=_zero_bias(kw["basis"])),
    "label smoothing ignored": lambda kw: kw.update(label_smoothing=0.0),
}


def _last_class_unwritten(g):
    g = g.clone()
    g[-1] = 0
    return g


# gradient mutations: (name, (gradient, change))
GRAD_MUTATIONS = {}
for _g in GRADS:
    GRAD_MUTATIONS[f"{_g} x1.05"] = (_g, lambda g: g * 1.05)
for _g in GRADS:  # a 1 % error: the floors' magnitudes are the actual per-class terms (numerics.py)
    GRAD_MUTATIONS[f"{_g} x1.01"] = (_g, lambda g: g * 1.01)
for _g in GRADS:
    GRAD_MUTATIONS[f"{_g} sign flipped"] = (_g, lambda g: -g)
for _g in GRADS:
    GRAD_MUTATIONS[f"{_g} zero"] = (_g, torch.zeros_like)
GRAD_MUTATIONS["dA last class unwritten"] = ("dA", _last_class_unwritten)
MUTATIONS = list(INPUT_MUTATIONS) + list(GRAD_MUTATIONS)


# ---------------------------------------------------------------- the paths

def _torch_head():
    return torch_ops.demul_head


def _triton_head():
    from demul_fast.ops import triton_ops  # noqa: PLC0415
    if triton_ops.UNAVAILABLE_REASON:
        pytest.skip(f"triton backend unavailable: {triton_ops.UNAVAILABLE_REASON}")
    return triton_ops.demul_head


def _cuda_head():
    from cuda_emu import build as emu_build  # noqa: PLC0415
    from demul_fast.ops import cuda_ops  # noqa: PLC0415
    reason = emu_build.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA emulation unavailable: {reason}")
    module = emu_build.build()

    def head(*args, **kwargs):
        return cuda_ops.demul_head(*args, **kwargs)

    @contextlib.contextmanager
    def on_the_emulation():  # forward and backward on the emulated extension
        saved = cuda_ops._C
        cuda_ops._C = module
        try:
            yield
        finally:
            cuda_ops._C = saved
    head.context = on_the_emulation
    return head


PATHS = {"torch": _torch_head, "triton": _triton_head, "cuda": _cuda_head}


def make_inputs(dtype, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    C, M, D, B, K = (SHAPE[k] for k in "CMDBK")

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    T, A, X = r(C, M, D), r(C, M), r(B, D)
    y = torch.randint(0, C, (B,), generator=gen)
    E, W, b = r(C, K), r(K, D, scale=D ** -0.5), r(K, scale=0.5)
    basis = build_distill_basis(W, b, E, dtype=torch.float32)
    return dict(T=T, A=A, X=X, y=y, E=E, W=W, b=b, basis=basis)


def run_path(head, inp, mutate=None):
    """{output or gradient name: tensor} of one head call (loss.backward())."""
    T, A, X = (inp[k].clone().requires_grad_() for k in "TAX")
    kw = dict(scale=TAU, basis=inp["basis"], alpha=ALPHA, label_smoothing=LS)
    if mutate is not None:
        mutate(kw)
    with getattr(head, "context", contextlib.nullcontext)():
        out = head(T, A, X, inp["y"], kw["scale"], kw["basis"], alpha=kw["alpha"],
                   label_smoothing=kw["label_smoothing"], return_logits=True)
        out.loss.backward()
    res = dict(loss=out.loss, ce_loss=out.ce_loss, distill_loss=out.distill_loss, logits=out.logits,
               dT=T.grad, dA=A.grad, dX=X.grad)
    return {k: v.detach() for k, v in res.items()}


def yardstick(path, dtype, inp):
    """(exact, plain, allowance) keyed like run_path's result, for this path's roundings."""
    kernel = path in ("triton", "cuda") and dtype != torch.float32
    site_dtype = dtype if kernel else torch.float32  # torch and float32 kernels round nothing
    mode = "truncate" if path == "triton" and dtype == torch.bfloat16 else "nearest"  # the interpreter truncates
    family = path if kernel else "triton"
    exact, plain, allowance, _ = rounded_yardstick.yardstick(
        family, site_dtype, mode, inp["T"], inp["A"], inp["X"], inp["y"], TAU, inp["basis"], ALPHA, LS,
        (1.0, 0.0, 0.0, None))
    names = dict(text_features="dT", prompt_logits="dA", image_features="dX")
    return [{names.get(k, k): v for k, v in d.items()} for d in (exact, plain, allowance)]


def magnitudes(inp):
    rounded = dict(text_features=inp["T"], prompt_logits=inp["A"], image_features=inp["X"], labels=inp["y"],
                   scale=TAU, llm_embeddings=inp["E"], phi_weight=inp["W"], phi_bias=inp["b"])
    m = head_magnitudes(rounded, ALPHA, LS)
    return dict(loss=m["loss"], ce_loss=m["ce_loss"], distill_loss=m["distill_loss"], logits=m["logits"],
                dT=m["text_features"], dA=m["prompt_logits"], dX=m["image_features"])


def refusals(path, dtype, res, yard, mags):
    """The names of the outputs/gradients whose check refuses ``res``."""
    exact, plain, allowance = yard
    ulps = 1.0 if path == "triton" and dtype == torch.bfloat16 else 0.5  # the interpreter truncates
    failed = []
    for name, fast in res.items():
        try:
            assert_error_rule(f"{path}-{IDS[dtype]} {name}", fast, exact[name], plain[name],
                              k=3.0 if name in GRADS else 2.0, dtype=dtype, magnitude=mags[name],
                              stored_ulps=ulps, extra=allowance[name])
        except AssertionError:
            failed.append(name)
    return failed


def mutation_results(path, dtype):
    """{"control": refusals, mutation: refusals} for one path and dtype."""
    head = PATHS[path]()
    inp = make_inputs(dtype)
    yard, mags = yardstick(path, dtype, inp), magnitudes(inp)
    control = run_path(head, inp)
    results = {"control": refusals(path, dtype, control, yard, mags)}
    for name, mutate in INPUT_MUTATIONS.items():
        results[name] = refusals(path, dtype, run_path(head, inp, mutate), yard, mags)
    for name, (grad, change) in GRAD_MUTATIONS.items():
        results[name] = refusals(path, dtype, {**control, grad: change(control[grad])}, yard, mags)
    return results


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_mutation_fails_and_the_control_passes(path, dtype):
    results = mutation_results(path, dtype)
    assert results["control"] == [], f"the correct {path} head fails its own check: {results['control']}"
    missed = [m for m in MUTATIONS if not results[m]]
    assert not missed, f"{path} {IDS[dtype]}: these mutations pass the check: {missed}"


def test_the_yardstick_is_the_reference_without_roundings():
    """The yardstick's algebra (forward and backward written out) is the head: with no
    rounding sites, in float64, it matches the float64 reference (direct form, autograd)."""
    inp = make_inputs(torch.float64)
    exact, _, allowance = yardstick("torch", torch.float64, inp)
    leaves = [inp[k].clone().requires_grad_() for k in "TAX"]
    out = ref.demul_head(*leaves, inp["y"], TAU, inp["E"], inp["W"], inp["b"], alpha=ALPHA, label_smoothing=LS,
                         return_logits=True)
    out.loss.backward()
    want = dict(loss=out.loss, ce_loss=out.ce_loss, distill_loss=out.distill_loss, logits=out.logits,
                dT=leaves[0].grad, dA=leaves[1].grad, dX=leaves[2].grad)
    for name, w in want.items():
        # the basis is stored in float32 (as the backends get it): float32-level agreement
        torch.testing.assert_close(exact[name], w.detach(), rtol=2e-5, atol=2e-5 * float(w.abs().max()),
                                   msg=lambda m, n=name: f"{n}: {m}")
        assert not allowance[name].any()


def table_cell(mutation: str, failed: list) -> str:
    """One cell of a mutation table: what refused the mutation (or **MISSED**); for the
    control, "passes" (or what wrongly failed it)."""
    if not failed:
        return "passes" if mutation == "control" else "**MISSED**"
    return ("FAILS: " if mutation == "control" else "") + ", ".join(failed)


def table() -> str:
    rows = ["| mutation | " + " | ".join(f"{p} {IDS[d]}" for p in PATHS for d in DTYPES) + " |",
            "|---|" + "---|" * (len(PATHS) * len(DTYPES))]
    results = {(p, d): mutation_results(p, d) for p in PATHS for d in DTYPES}
    for m in ["control"] + MUTATIONS:
        cells = [table_cell(m, results[(p, d)][m]) for p in PATHS for d in DTYPES]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    print(table())
