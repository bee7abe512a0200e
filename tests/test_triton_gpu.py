"""GPU-only tests of the "triton" backend: float32/bf16/fp16 numerics on the compiled (not
interpreted) tensor-core path, and the ImageNet-scale head, each with the error rule against
the float64 reference (the distillation in the K-free form of SPEC 4.3 against the direct
form). Skipped at collection without a CUDA device (tests/conftest.py)."""

import pytest
import torch

from demul_fast import reference as ref
from demul_fast.ops import functional as F, triton_ops
from numerics import round_trip
from test_triton import CROSSING, ODD, basis_of, check, head_fns, make_inputs, rand_like

pytestmark = pytest.mark.gpu
LARGE = dict(C=1000, M=8, D=512, B=256, K=3072)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    from demul_fast.kernels import launch
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


def _head_check(gen, shape, dtype, ls=0.1, alpha=1.0, bias=True):
    T, A, X, y, E, W, b = make_inputs(gen, bias=bias, **shape)
    E, W, b = round_trip(dtype, E, W, b)
    tau = torch.tensor(100.0, dtype=torch.float64, device=T.device)
    fast, slow = head_fns(y, E, W, b, alpha, ls, True)
    B, C = shape["B"], shape["C"]
    cot = [torch.tensor(w, dtype=torch.float64, device=T.device) for w in (1.0, 0.5, -0.25)]
    cot.append(rand_like(gen, torch.empty(B, C)) / (B * C))
    fo, _ = check(f"head {dtype}", fast, slow, [T, A, X, tau], diff=[0, 1, 2, 3], dtype=dtype, cotangents=cot,
                  grad_names=["dT", "dA", "dX", "dscale"])
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
    cot = [rand_like(gen, torch.empty(shape["C"], shape["D"]))]
    check(f"aggregate {dtype}", lambda t, a: F.aggregate_prompts(t, a, backend="triton"), ref.aggregate_prompts,
          [T, A], diff=[0, 1], dtype=dtype, cotangents=cot, grad_names=["dT", "dA"])
    U = ref.l2_normalize(rand_like(gen, torch.empty(shape["C"], shape["D"])))
    check(f"ce {dtype}", lambda x, u: F.cosine_cross_entropy(x, u, y, 50.0, 0.1, backend="triton"),
          lambda x, u: ref.cosine_cross_entropy(x, u, y, 50.0, 0.1), [X, U], diff=[0, 1], dtype=dtype,
          grad_names=["dX", "dU"])
    basis = basis_of(W, b, E)
    check(f"distill {dtype}", lambda t: triton_ops.prompt_distill_loss(t, basis),
          lambda t: ref.prompt_distill_loss(t, W.to(t.dtype), b.to(t.dtype), E.to(t.dtype)), [T], diff=[0],
          dtype=dtype, grad_names=["dT"])
