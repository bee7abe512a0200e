"""The GPU tests' checks, run on the CPU: what keeps them honest.

tests/test_cuda_gpu.py and tests/test_triton_gpu.py judge every op through the functions of
tests/kernel_checks.py (``check_aggregate``, ``check_cross_entropy``, ``check_distill``,
``check_head``, ``check_head_distillation``), and test_properties' part-by-part test through
``backend_cases.assert_parts_match_reference``; none of them runs here. This module calls the
very same functions on the same kernels where the CPU can run them: csrc/ in the CUDA
emulation (tests/cuda_emu, family "cuda") and the Triton kernels in the interpreter (family
"triton"), at small shapes, in float32, bfloat16 and float16. In each cell the correct
kernels must pass (the control), and each mutation of their results must fail: every output
and gradient x1.01, every gradient with its sign flipped and set to zero, and the last class's
row of a per-class gradient never written (zero: what unpoisoned memory may hold). The
mutations are applied to the control's results (what a wrong kernel or a wrong wrapper of
its backward hands the caller), so one kernel run serves all of them.

Float32 is judged against the float32 reference as yardstick, half precision against the
yardstick that rounds what the family's kernels round (tests/rounded_yardstick.py), both with
float32 floors and no operand allowance. ``python tests/test_kernel_checks.py`` prints the
table of refusals.
"""

from __future__ import annotations

import sys

import pytest
import torch

from demul_fast import reference as ref
from demul_fast.ops import backends, cuda_ops
from demul_fast.ops.distill_basis import build_distill_basis
import backend_cases
import kernel_checks
from numerics import round_trip
import test_edge_cases

from cuda_emu import build as emu_build

pytestmark = pytest.mark.usefixtures("one_thread")

# CE-heavy proportions at CLIP's logit scale, every size odd, one tile each (test_mutations')
SHAPE = dict(C=13, M=3, D=37, B=5, K=45)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
CHECKS = ["aggregate", "cross_entropy", "distill", "head", "head_distillation", "parts"]
# the per-class gradients (class index first) whose last row a kernel may leave unwritten
PER_CLASS = {"text_features", "prompt_logits", "class_features", "aggregate dT", "aggregate dA", "ce dU",
             "distill dT"}
GRADIENTS = PER_CLASS | {"image_features", "scale", "ce dX"}


def _unwritten_last_class(v):
    v = v.clone()
    v[-1] = 0
    return v


def mutations(keys):
    """{label: change of the results dict} for the results' keys."""
    out = {}
    for k in keys:
        out[f"{k} x1.01"] = (lambda k: lambda r: {**r, k: r[k] * 1.01})(k)
    for k in keys:
        if k in GRADIENTS:
            out[f"{k} sign flipped"] = (lambda k: lambda r: {**r, k: -r[k]})(k)
            out[f"{k} zero"] = (lambda k: lambda r: {**r, k: torch.zeros_like(r[k])})(k)
    for k in keys:
        if k in PER_CLASS:
            out[f"{k} last class unwritten"] = (lambda k: lambda r: {**r, k: _unwritten_last_class(r[k])})(k)
    return out


def _family_ops(family):
    """(module with the four ops, interpreted) of a family; skips the cell with the reason."""
    if family == "cuda":
        reason = emu_build.unavailable_reason()
        if reason is not None:
            pytest.skip(f"CUDA emulation unavailable: {reason}")
        return cuda_ops, False
    from demul_fast.ops import triton_ops  # noqa: PLC0415
    if triton_ops.UNAVAILABLE_REASON:
        pytest.skip(f"triton unavailable: {triton_ops.UNAVAILABLE_REASON}")
    return triton_ops, not torch.cuda.is_available()


@pytest.fixture
def kernels(monkeypatch):
    """cuda_ops on the emulated extension; the Triton launcher poisoning its outputs with NaN."""
    from demul_fast.kernels import launch  # noqa: PLC0415

    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    if emu_build.unavailable_reason() is None:
        monkeypatch.setattr(cuda_ops, "_C", emu_build.build())


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    C, M, D, B, K = (SHAPE[k] for k in "CMDBK")

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    return gen, r(C, M, D), r(C, M), r(B, D), torch.randint(0, C, (B,), generator=gen), r(C, K), r(K, D) / D ** 0.5, \
        r(K), r


class _Parts:
    """The three standalone ops of a kernel module in ``part_values``' shape (the basis built
    from phi/E as demul_fast.ops.functional builds it for these inputs: float32)."""

    def __init__(self, ops):
        self.ops = ops

    def aggregate_prompts(self, T, A):
        return self.ops.aggregate_prompts(T, A)

    def cosine_cross_entropy(self, X, U, y, scale, ls):
        return self.ops.cosine_cross_entropy(X, U, y, scale, ls)

    def prompt_distill_loss(self, T, W, b, E):
        return self.ops.prompt_distill_loss(T, build_distill_basis(W, b, E, dtype=torch.float32))


def run_check(check, family, dtype):
    """Runs one check on one family's kernels in one dtype with every mutation: {label: the
    failure's message, '' where the mutated result passed}. The control must pass (an
    AssertionError here is the correct kernels failing their check)."""
    ops, interpreted = _family_ops(family)
    gen, T, A, X, y, E, W, b, r = _inputs()
    E, W, b = round_trip(dtype, E, W, b)
    basis = build_distill_basis(W, b, E, dtype=torch.float32)
    refused = {}
    kw = dict(interpreted=interpreted, refused=refused)
    name = f"{check} {family} {IDS[dtype]}"
    if check == "aggregate":
        kernel_checks.check_aggregate(name, family, ops.aggregate_prompts, T, A, r(SHAPE["C"], SHAPE["D"]), dtype,
                                      mutations=mutations(["class_features", "text_features", "prompt_logits"]), **kw)
    elif check == "cross_entropy":
        U = ref.l2_normalize(r(SHAPE["C"], SHAPE["D"]))
        kernel_checks.check_cross_entropy(
            name, family, lambda x, u, s: ops.cosine_cross_entropy(x, u, y, s, 0.1), X, U, y,
            torch.tensor(57.0, dtype=torch.float64), 0.1, 0.7, dtype,
            mutations=mutations(["ce_loss", "image_features", "class_features", "scale"]), **kw)
    elif check == "distill":
        kernel_checks.check_distill(name, family, lambda t: ops.prompt_distill_loss(t, basis), T, E, W, b, 1.3, dtype,
                                    mutations=mutations(["distill_loss", "text_features"]), **kw)
    elif check == "head":
        cot = [torch.tensor(v, dtype=torch.float64) for v in (1.0, 0.5, -0.25)]
        cot.append(r(SHAPE["B"], SHAPE["C"]) / (SHAPE["B"] * SHAPE["C"]))

        def head(t, a, x, s):
            return tuple(ops.demul_head(t, a, x, y, s, basis, 0.7, 0.1, True))
        kernel_checks.check_head(name, family, head, T, A, X, y, torch.tensor(100.0, dtype=torch.float64), E, W, b,
                                 0.7, 0.1, cot, dtype, mutations=mutations(kernel_checks.HEAD_KEYS), **kw)
    elif check == "head_distillation":
        def dist(t, a):
            return ops.demul_head(t, a, X.to(t.dtype), y, 30.0, basis, 0.7, 0.1).distill_loss
        kernel_checks.check_head_distillation(name, family, dist, T, A, X, y, 30.0, E, W, b, 0.7, 0.1, 1.3, dtype,
                                              mutations=mutations(["distill_loss", "text_features"]), **kw)
    else:  # test_properties' part-by-part check, on the ops with float32 bases
        inputs = dict(text_features=T.to(dtype), prompt_logits=A.to(dtype), image_features=X.to(dtype), labels=y,
                      scale=30.0, llm_embeddings=E.to(dtype), phi_weight=W.to(dtype), phi_bias=b.to(dtype))
        backend_cases.assert_parts_match_reference(inputs, gen, None, 0.1, impl=_Parts(ops), family=family,
                                                   interpreted=interpreted,
                                                   mutations=mutations(backend_cases.PART_NAMES), refused=refused)
    return refused


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("family", ["cuda", "triton"])
@pytest.mark.parametrize("check", CHECKS)
def test_the_check_passes_the_kernels_and_refuses_each_mutation(kernels, check, family, dtype):
    refused = run_check(check, family, dtype)
    passed = sorted(label for label, why in refused.items() if not why)
    assert refused and not passed, f"{check} {family} {IDS[dtype]}: mutated results passed the check: {passed}"


@pytest.fixture
def emulated_cuda_backend(monkeypatch, kernels):
    """The public functions' "cuda" backend on CPU tensors: cuda_ops on the emulated extension
    (``kernels``), its capability asked as on a GPU (without the device, which it would refuse)."""
    reason = emu_build.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA emulation unavailable: {reason}")
    original = cuda_ops.capability
    monkeypatch.setattr(cuda_ops, "capability", lambda call: original(call._replace(device=None)))
    monkeypatch.setitem(backends._loaded, "cuda", (cuda_ops, None))


def test_the_float16_range_edge_case_on_the_emulated_cuda_backend(emulated_cuda_backend, gen):
    """tests/test_edge_cases.py's float16 test, whose "cuda" variant runs only on a GPU, run
    as it is (the test function itself) on the emulated kernels: feature norms past 65504,
    the head against the yardstick that rounds what csrc/ rounds."""
    test_edge_cases.test_float16_products_overflow_without_float32_accumulation(gen, "cuda", "cpu", torch.float16)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=lambda d: IDS[d])
def test_the_low_precision_degenerate_shapes_on_the_emulated_cuda_backend(emulated_cuda_backend, gen, dtype):
    """tests/test_edge_cases.py's C = M = B = 1 head in half precision, GPU-only for "cuda"."""
    test_edge_cases.test_degenerate_shapes_low_precision(gen, "cuda", "cpu", dtype)


if __name__ == "__main__":  # the table of refusals: which check of each cell refuses each mutation
    torch.set_num_threads(1)
    from demul_fast.kernels import launch

    launch.POISON_OUTPUTS = True
    if emu_build.unavailable_reason() is None:
        cuda_ops._C = emu_build.build()
    for check in CHECKS:
        for family in ("cuda", "triton"):
            for dtype in DTYPES:
                got = run_check(check, family, dtype)
                for label, why in got.items():
                    print(f"| {check} | {family} | {IDS[dtype]} | {label} | {why[:90] or 'PASSED'} |")
                sys.stdout.flush()
