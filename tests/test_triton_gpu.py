"""GPU-only tests of the "triton" backend: float32/bf16/fp16 numerics on the compiled (not
interpreted) tensor-core path, and the ImageNet-scale head, each with the error rule against
the float64 reference through the checks of tests/kernel_checks.py (float32: the float32
reference as yardstick; half precision: the yardstick that rounds what the Triton kernels
round, tests/rounded_yardstick.py, float32 floors, no operand allowance), which
tests/test_kernel_checks.py runs on the CPU under the interpreter (the distillation in the
K-free form of SPEC 4.3 against the direct form). Skipped at collection without a CUDA
device (tests/conftest.py)."""

import pytest
import torch

from demul_fast import reference as ref
from demul_fast.ops import functional as F, triton_ops
import kernel_checks
from numerics import round_trip
from demul_fast.ops.distill_basis import build_distill_basis
from test_triton import CROSSING, ODD, make_inputs, rand_like

pytestmark = pytest.mark.gpu
LARGE = dict(C=1000, M=8, D=512, B=256, K=3072)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# the checks of tests/kernel_checks.py, skipping (with the counts) where the rounded yardstick
# cannot be computed (half precision at LARGE)
CHECK_HEAD = kernel_checks.skipping_unboundable(kernel_checks.check_head)
CHECK_AGGREGATE = kernel_checks.skipping_unboundable(kernel_checks.check_aggregate)
CHECK_CROSS_ENTROPY = kernel_checks.skipping_unboundable(kernel_checks.check_cross_entropy)
CHECK_DISTILL = kernel_checks.skipping_unboundable(kernel_checks.check_distill)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    from demul_fast.kernels import launch
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


def basis_of(E, W, b):
    """The float32 basis, as demul_fast.ops.functional builds it for float32 / half inputs (and
    as the rounded yardstick takes it: R rounded to T's dtype from float32)."""
    return build_distill_basis(W, b, E, dtype=torch.float32)


def _head_check(gen, shape, dtype, ls=0.1, alpha=1.0, bias=True):
    T, A, X, y, E, W, b = make_inputs(gen, bias=bias, **shape)
    E, W, b = round_trip(dtype, E, W, b)
    tau = torch.tensor(100.0, dtype=torch.float64, device=T.device)
    basis = basis_of(E, W, b)

    def fast(t, a, x, s):
        return tuple(triton_ops.demul_head(t, a, x, y, s, basis, alpha=alpha, label_smoothing=ls, return_logits=True))
    B, C = shape["B"], shape["C"]
    cot = [torch.tensor(w, dtype=torch.float64, device=T.device) for w in (1.0, 0.5, -0.25)]
    cot.append(rand_like(gen, torch.empty(B, C)) / (B * C))
    fo, _ = CHECK_HEAD(f"head {dtype}", "triton", fast, T, A, X, y, tau, E, W, b, alpha, ls, cot, dtype)
    assert [o.dtype for o in fo] == [torch.float32] * 3 + [dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_large(gen, dtype):
    _head_check(gen, LARGE, dtype)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("shape", [ODD, CROSSING], ids=["odd", "crossing"])
def test_head_half_odd_shapes(gen, shape, dtype):
    _head_check(gen, shape, dtype, ls=0.0, alpha=0.5, bias=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [ODD, LARGE], ids=["odd", "large"])
def test_parts(gen, shape, dtype):
    T, A, X, y, E, W, b = make_inputs(gen, **shape)
    E, W, b = round_trip(dtype, E, W, b)
    (u,), _ = CHECK_AGGREGATE(f"aggregate {dtype}", "triton",
                                            lambda t, a: F.aggregate_prompts(t, a, backend="triton"), T, A,
                                            rand_like(gen, torch.empty(shape["C"], shape["D"])), dtype)
    U = ref.l2_normalize(rand_like(gen, torch.empty(shape["C"], shape["D"])))
    (ce,), _ = CHECK_CROSS_ENTROPY(
        f"ce {dtype}", "triton", lambda x, u, s: F.cosine_cross_entropy(x, u, y, s, 0.1, backend="triton"), X, U, y,
        torch.tensor(50.0, dtype=torch.float64, device=X.device), 0.1, 1.0, dtype)
    basis = basis_of(E, W, b)
    (dist,), _ = CHECK_DISTILL(f"distill {dtype}", "triton",
                                             lambda t: triton_ops.prompt_distill_loss(t, basis), T, E, W, b, 1.0,
                                             dtype)
    assert u.dtype == dtype and ce.dtype == dist.dtype == torch.float32
