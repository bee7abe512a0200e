"""Mutation test of the standalone ops' checks: a 1 % error in any output or gradient fails.

Ops: ``aggregate_prompts`` (u^; dT, dA), ``cosine_cross_entropy`` (ce_loss; dX, dU) and
``prompt_distill_loss`` (distill_loss; dT), on every CPU-runnable path (the torch backend,
the Triton kernels in the interpreter, the CUDA kernels in the emulation) in float32,
bfloat16 and float16. The check is the one the op tests use (test_triton.py,
test_cuda_emulated.py): the error rule of tests/numerics.py against the yardstick that rounds
what the path's kernels round (tests/rounded_yardstick.py: ``cross_entropy``,
``distillation``, ``aggregate``), float32-level floors, no operand allowance.
The control must pass; each output and each gradient times 1.01 must fail (applied to the
control's results: what a wrapper of the op's forward or backward would do).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from demul_fast import reference as ref
from demul_fast.ops import torch_ops
from demul_fast.ops.distill_basis import build_distill_basis
from numerics import assert_error_rule, ce_magnitudes
import rounded_yardstick
from test_mutations import table_cell

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(C=13, M=3, D=37, B=5, K=45)
TAU, LS = 100.0, 0.1
G_CE, G_DIST = 0.7, 1.3  # the losses' cotangents
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
OPS = ["aggregate", "cross_entropy", "distill"]


def _module(path):
    if path == "torch":
        return torch_ops, contextlib.nullcontext
    if path == "triton":
        from demul_fast.ops import triton_ops  # noqa: PLC0415
        if triton_ops.UNAVAILABLE_REASON:
            pytest.skip(f"triton backend unavailable: {triton_ops.UNAVAILABLE_REASON}")
        return triton_ops, contextlib.nullcontext
    from cuda_emu import build as emu_build  # noqa: PLC0415
    from demul_fast.ops import cuda_ops  # noqa: PLC0415
    reason = emu_build.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA emulation unavailable: {reason}")
    module = emu_build.build()

    @contextlib.contextmanager
    def on_the_emulation():
        saved, cuda_ops._C = cuda_ops._C, module
        try:
            yield
        finally:
            cuda_ops._C = saved
    return cuda_ops, on_the_emulation


def make_inputs(dtype, seed=4321):
    gen = torch.Generator().manual_seed(seed)
    C, M, D, B, K = (SHAPE[k] for k in "CMDBK")

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    T, A, X = r(C, M, D), r(C, M), r(B, D)
    U = ref.l2_normalize(torch.randn(C, D, generator=gen, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, C, (B,), generator=gen)
    E, W, b = r(C, K), r(K, D, scale=D ** -0.5), r(K, scale=0.5)
    basis = build_distill_basis(W, b, E, dtype=torch.float32)
    cot = torch.randn(C, D, generator=gen, dtype=torch.float64)
    return dict(T=T, A=A, X=X, U=U, y=y, basis=basis, cot=cot)


def run_op(op, path, inp):
    """{output or gradient name: tensor} of one call and its backward."""
    mod, context = _module(path)
    with context():
        if op == "aggregate":
            T, A = inp["T"].clone().requires_grad_(), inp["A"].clone().requires_grad_()
            u = mod.aggregate_prompts(T, A)
            (u.double() * inp["cot"].to(u.dtype).double()).sum().backward()
            return dict(class_features=u.detach(), text_features=T.grad, prompt_logits=A.grad)
        if op == "cross_entropy":
            X, U = inp["X"].clone().requires_grad_(), inp["U"].clone().requires_grad_()
            loss = mod.cosine_cross_entropy(X, U, inp["y"], TAU, LS)
            (loss * G_CE).backward()
            return dict(ce_loss=loss.detach(), image_features=X.grad, class_features=U.grad)
        T = inp["T"].clone().requires_grad_()
        loss = mod.prompt_distill_loss(T, inp["basis"])
        (loss * G_DIST).backward()
        return dict(distill_loss=loss.detach(), text_features=T.grad)


def yardstick(op, path, dtype, inp):
    """(exact, plain, allowance, magnitudes) for this op, path and dtype."""
    kernel = path in ("triton", "cuda") and dtype != torch.float32
    site_dtype = dtype if kernel else torch.float32  # torch and float32 paths round nothing
    mode = "truncate" if path == "triton" and dtype == torch.bfloat16 else "nearest"  # the interpreter truncates
    family = path if kernel else "triton"
    if op == "aggregate":
        exact, plain, allowance, _ = rounded_yardstick.yardstick(family, site_dtype, mode, inp["T"], inp["A"],
                                                                 inp["cot"].to(dtype), op=rounded_yardstick.aggregate)
        return exact, plain, allowance, {}
    if op == "cross_entropy":
        args = (inp["X"], inp["U"], inp["y"], TAU, LS, G_CE)
        exact, plain, allowance, _ = rounded_yardstick.yardstick(family, site_dtype, mode, *args,
                                                                 op=rounded_yardstick.cross_entropy)
        return exact, plain, allowance, ce_magnitudes(inp["X"], inp["U"], inp["y"], TAU, LS, G_CE)
    exact, plain, allowance, _ = rounded_yardstick.yardstick(family, site_dtype, mode, inp["T"], inp["basis"], G_DIST,
                                                             op=rounded_yardstick.distillation)
    return exact, plain, allowance, {"distill_loss": 2.0}


def refusals(path, dtype, res, yard):
    exact, plain, allowance, mags = yard
    ulps = 1.0 if path == "triton" and dtype == torch.bfloat16 else 0.5  # the interpreter truncates
    failed = []
    for name, fast in res.items():
        grad = name in ("text_features", "prompt_logits", "image_features") or (name == "class_features"
                                                                               and "ce_loss" in res)
        try:
            assert_error_rule(f"{path}-{IDS[dtype]} {name}", fast, exact[name], plain[name], k=3.0 if grad else 2.0,
                              dtype=dtype, magnitude=mags.get(name), stored_ulps=ulps, extra=allowance[name])
        except AssertionError:
            failed.append(name)
    return failed


def mutation_results(op, path, dtype):
    """{"control": refused names, "<name> x1.01": refused names} for one op, path and dtype."""
    inp = make_inputs(dtype)
    res = run_op(op, path, inp)
    yard = yardstick(op, path, dtype, inp)
    results = {"control": refusals(path, dtype, res, yard)}
    for name in res:
        results[f"{name} x1.01"] = refusals(path, dtype, {**res, name: res[name] * 1.01}, yard)
    return results


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("path", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("op", OPS)
def test_a_one_percent_error_fails_and_the_control_passes(op, path, dtype):
    results = mutation_results(op, path, dtype)
    assert results["control"] == [], f"the correct {op} on {path} fails its own check: {results['control']}"
    for mutation, failed in results.items():
        if mutation != "control":
            name = mutation.split(" x")[0]
            assert name in failed, f"{op} {path} {IDS[dtype]}: {mutation} passes the check of {name}"


def table() -> str:
    cols = [(p, d) for p in ("torch", "triton", "cuda") for d in DTYPES]
    rows = ["| op: mutation | " + " | ".join(f"{p} {IDS[d]}" for p, d in cols) + " |",
            "|---|" + "---|" * len(cols)]
    for op in OPS:
        results = {c: mutation_results(op, *c) for c in cols}
        for m in results[cols[0]]:
            cells = [table_cell(m, results[c][m]) for c in cols]
            rows.append(f"| {op}: {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    print(table())
