"""GPU tests of the "cuda" backend (the kernels of demul_fast._C): each function and the
whole head against the float64 reference with the error rule (tests/numerics.py: outputs
k=2, gradients k=3, relative to the yardstick's own error on the same inputs: the plain
PyTorch path accumulated in float32 for float32 inputs, the yardstick that rounds what the
kernels round for half inputs, tests/rounded_yardstick.py; float32 floors, no operand
allowance), through the checks of tests/kernel_checks.py that tests/test_kernel_checks.py
and test_cuda_emulated.py run on the CPU; the triton backend on the same inputs against the
yardstick of its own kernels, where it is available. Fresh random inputs, odd and
ImageNet-scale shapes, all three dtypes: bfloat16 and float16 run every matrix product on
tensor cores (csrc/common.cuh), float32 on the SIMT path. The distillation runs K-free
against the basis of SPEC 4.3 (K > D, K = D, K < D, with and without a bias) and is
checked against the reference's direct form. Before every call the CUDA caching allocator
is filled with NaN blocks, so an output element a kernel forgets to write shows up as
non-finite. Skipped at collection without a CUDA device (tests/conftest.py)."""

import pytest
import torch

from demul_fast import reference as ref
from demul_fast.ops import backends, functional as F
from demul_fast.ops.distill_basis import build_distill_basis
import kernel_checks
from numerics import round_trip

pytestmark = pytest.mark.gpu
DEV = "cuda"
ODD = dict(C=37, M=3, D=100, B=5, K=70)
PRIMES = dict(C=67, M=5, D=131, B=97, K=193)  # every dimension crosses a 64-wide tile
LARGE = dict(C=1000, M=8, D=512, B=256, K=3072)
SQUARE = dict(C=37, M=3, D=96, B=5, K=96)  # K = D: the basis has full rank D
M64 = dict(C=5, M=64, D=72, B=7, K=40)  # one class per 64-row block of the fused forward
MANY = dict(C=3, M=70, D=80, B=9, K=50)  # M > 64: aggregation not fused, blocks cross classes
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def cuda_available():
    reason = backends.why_not("cuda", torch.device(DEV), torch.float32)
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")


def poison():
    """Leave NaN-filled blocks of many sizes in the caching allocator for outputs to reuse."""
    blocks = [torch.full((n,), float("nan"), device=DEV) for n in (1, 64, 1 << 10, 1 << 14, 1 << 18, 1 << 22)
              for _ in range(4)]
    del blocks


def make_inputs(gen, C, M, D, B, K, bias=True):
    """float64 CUDA inputs (cast per dtype by the tests)."""
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEV)
    y = torch.randint(0, C, (B,), generator=gen).to(DEV)
    return r(C, M, D), r(C, M), r(B, D), y, r(C, K), r(K, D) / D ** 0.5, (r(K) if bias else None)


def check(name, what, fns, *args):
    """kernel_checks.check_<what> for the cuda backend (float32: the float32 reference as
    yardstick; half precision: the yardstick that rounds what csrc/ rounds, float32 floors),
    then the same check for the triton backend on the same inputs where it is available: each
    backend against the yardstick of its own kernels (their roundings differ by design, so
    each is held to its own bound rather than to the other's results). fns = (cuda, triton);
    args: check_<what>'s after the function, up to the dtype. Returns cuda's results. In half
    precision at the ImageNet-scale shape the rounded yardstick cannot be computed (too many
    operand elements on a rounding boundary): skipped, naming the counts."""
    checker = kernel_checks.skipping_unboundable(getattr(kernel_checks, f"check_{what}"))
    cuda_fn, triton_fn = fns
    dtype = args[-1]
    got = checker(f"{name} cuda", "cuda", cuda_fn, *args, before=poison, after=torch.cuda.synchronize)
    # (the checker asserts the error rule; here only what it implies: nothing non-finite, no
    # element left unwritten in the NaN-filled allocator)
    assert all(torch.isfinite(v).all() for v in [*got[0], *got[1]]), f"{name}: non-finite cuda results"
    if triton_fn is not None and backends.why_not("triton", torch.device(DEV), dtype) is None:
        checker(f"{name} triton", "triton", triton_fn, *args, before=poison, after=torch.cuda.synchronize)
    return got


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEV)


def basis_of(E, W, b):
    """The float32 basis of the frozen phi/E (float64 inputs), as demul_fast.ops.functional builds it."""
    return build_distill_basis(W, b, E, dtype=torch.float32)


def cuda_ops():
    from demul_fast.ops import cuda_ops as module
    return module


def backend_fn(name, backend):
    fn = getattr(F, name)
    return lambda *a, **k: fn(*a, **k, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [ODD, PRIMES, LARGE], ids=["odd", "primes", "large"])
def test_aggregate_prompts(gen, shape, dtype):
    T, A, *_ = make_inputs(gen, **shape)
    (fo,), _ = check(f"aggregate {dtype}", "aggregate", (backend_fn("aggregate_prompts", "cuda"),
                                                         backend_fn("aggregate_prompts", "triton")),
                     T, A, rand(gen, shape["C"], shape["D"]), dtype)
    assert fo.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ls", [(ODD, 0.0), (PRIMES, 0.1), (LARGE, 0.1)], ids=["odd", "primes", "large"])
def test_cosine_cross_entropy(gen, shape, ls, dtype):
    _, _, X, y, *_ = make_inputs(gen, **shape)
    U = ref.l2_normalize(rand(gen, shape["C"], shape["D"]))
    tau = torch.tensor(57.0, dtype=torch.float64, device=DEV)

    def with_ls(fn):
        return lambda x, u, s: fn(x, u, y, s, ls)
    (fo,), _ = check(f"ce {dtype}", "cross_entropy", (with_ls(backend_fn("cosine_cross_entropy", "cuda")),
                                                      with_ls(backend_fn("cosine_cross_entropy", "triton"))),
                     X, U, y, tau, ls, 0.7, dtype)
    assert fo.dtype == torch.float32 and fo.dim() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,bias", [(ODD, True), (ODD, False), (SQUARE, True), (PRIMES, False), (PRIMES, True),
                                        (LARGE, True)],
                         ids=["k<d", "k<d-nobias", "k=d", "k>d-nobias", "k>d", "large"])
def test_prompt_distill_loss(gen, shape, bias, dtype):
    T, _, _, _, E, W, b = make_inputs(gen, bias=bias, **shape)
    E, W, b = round_trip(dtype, E, W, b)
    basis = basis_of(E, W, b)
    (fo,), _ = check(f"distill {dtype}", "distill",
                     (lambda t: cuda_ops().prompt_distill_loss(t, basis),
                      lambda t: F.prompt_distill_loss(t, W.to(t.dtype), None if b is None else b.to(t.dtype),
                                                      E.to(t.dtype), backend="triton")),
                     T, E, W, b, 1.3, dtype)
    assert fo.dtype == torch.float32


def test_distill_when_the_projection_nearly_cancels_the_bias(gen):
    """W t^ close to -b (SPEC 4.3): ||z|| is small and comes from a sum of squares."""
    T, _, _, _, E, W, _ = make_inputs(gen, **SQUARE)
    t_hat = ref.l2_normalize(T)
    b = -(t_hat[0, 0] @ W.T) + 1e-3 * rand(gen, W.shape[0])
    check("distill near -b", "distill",
          (lambda t: cuda_ops().prompt_distill_loss(t, basis_of(E, W, b)),
           lambda t: F.prompt_distill_loss(t, W.float(), b.float(), E.float(), backend="triton")),
          T, E, W, b, 1.0, torch.float32)


def _head_fns(y, E, W, b, alpha, ls, distill):
    basis = basis_of(E, W, b) if distill else None

    def fast(t, a, x, s):
        return tuple(cuda_ops().demul_head(t, a, x, y, s, basis, alpha, ls, True))

    def triton(t, a, x, s):
        cast = (lambda v: None if v is None or not distill else v.to(t.dtype))
        return tuple(F.demul_head(t, a, x, y, s, cast(E), cast(W), cast(b), alpha=alpha, label_smoothing=ls,
                                  return_logits=True, backend="triton"))
    return fast, triton


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,distill", [(ODD, True), (PRIMES, False), (PRIMES, True), (SQUARE, True),
                                           (M64, True), (MANY, True), (LARGE, True)],
                         ids=["odd", "primes-ce-only", "primes", "k=d", "m=64", "m>64", "large"])
def test_demul_head(gen, shape, distill, dtype):
    T, A, X, y, E, W, b = make_inputs(gen, **shape)
    E, W, b = round_trip(dtype, E, W, b)
    tau = torch.tensor(100.0, dtype=torch.float64, device=DEV)
    B, C = shape["B"], shape["C"]
    # Weights on loss, ce, dist and logits: every output gradient path is exercised.
    cot = [torch.tensor(v, dtype=torch.float64, device=DEV) for v in (1.0, 0.5, -0.25)]
    cot.append(rand(gen, B, C) / (B * C))
    fo, _ = check(f"head {dtype}", "head", _head_fns(y, E, W, b, 0.7, 0.1, distill), T, A, X, y, tau,
                  *((E, W, b) if distill else (None, None, None)), 0.7, 0.1, cot, dtype)
    assert [o.dtype for o in fo] == [torch.float32] * 3 + [dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [ODD, PRIMES, M64, MANY], ids=["odd", "primes", "m=64", "m>64"])
def test_head_distillation_gradient_alone(gen, shape, dtype):
    """A cotangent on distill_loss alone: dT is the fused backward's distillation part, which
    the cross-entropy's larger terms hide in test_demul_head (the emulated kernels showed it)."""
    T, A, X, y, E, W, b = make_inputs(gen, **shape)
    E, W, b = round_trip(dtype, E, W, b)
    basis = basis_of(E, W, b)
    check(f"head distillation {dtype}", "head_distillation",
          (lambda t, a: cuda_ops().demul_head(t, a, X.to(t.dtype), y, 30.0, basis, 0.7, 0.1).distill_loss,
           lambda t, a: F.demul_head(t, a, X.to(t.dtype), y, 30.0, E.to(t.dtype), W.to(t.dtype), b.to(t.dtype),
                                     backend="triton", alpha=0.7, label_smoothing=0.1).distill_loss),
          T, A, X, y, 30.0, E, W, b, 0.7, 0.1, 1.3, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_scale_exactly_with_the_loss_weight(gen, dtype):
    """A loss scaled by 2^16 (a mixed-precision loss scaler's default) scales dA by exactly 2^16:
    the stored dL/ds and dt^ tiles are rescaled by powers of two, so nothing overflows float16
    (|tau G| would pass 65504 here without it) and no bit changes."""
    T, A, X, y, E, W, b = make_inputs(gen, **PRIMES)
    basis = basis_of(E, W, b)
    grads = []
    for weight in (1.0, 2.0 ** 16):
        t, a = T.to(dtype).requires_grad_(), A.float().requires_grad_()
        out = cuda_ops().demul_head(t, a, X.to(dtype), y, 100.0, basis, 0.7, 0.1)
        (out.loss * weight).backward()
        grads.append(a.grad)
    assert torch.isfinite(grads[1]).all()
    assert torch.equal(grads[1], grads[0] * 2.0 ** 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_is_bitwise_deterministic(gen, dtype):
    """No floating-point atomics: the same inputs give the same bits, forward and backward."""
    T, A, X, y, E, W, b = make_inputs(gen, **PRIMES)
    basis = basis_of(E, W, b)
    results = []
    for _ in range(2):
        leaves = [T.to(dtype).requires_grad_(), A.float().requires_grad_(), X.to(dtype).requires_grad_()]
        out = cuda_ops().demul_head(*leaves, y, 30.0, basis, 0.5, 0.1, True)
        (out.loss + out.logits.float().square().sum()).backward()
        results.append([out.loss, out.logits] + [v.grad for v in leaves])
    for a, c in zip(*results):
        assert torch.equal(a, c)


def test_head_without_logits_matches_with_logits(gen):
    T, A, X, y, E, W, b = make_inputs(gen, **ODD)
    args = [v.float() for v in (T, A, X)]
    basis = basis_of(E, W, b)
    with_l = cuda_ops().demul_head(*args, y, 30.0, basis, return_logits=True)
    without = cuda_ops().demul_head(*args, y, 30.0, basis)
    assert without.logits is None
    for a, c in zip(with_l[:3], without[:3]):
        assert torch.equal(a, c)


def test_out_of_range_labels_never_read_out_of_bounds(gen, monkeypatch):
    """With value checks off, a bad label gives an undefined loss but no memory error."""
    monkeypatch.setenv("DEMUL_FAST_CHECK_VALUES", "0")
    T, A, X, y, E, W, b = make_inputs(gen, **ODD)
    y = y.clone()
    y[0] = 10 ** 9
    y[1] = -(10 ** 9)
    leaves = [v.float().requires_grad_() for v in (T, A, X)]
    out = cuda_ops().demul_head(*leaves, y, 30.0, basis_of(E, W, b))
    out.loss.backward()
    torch.cuda.synchronize()
    # The rows with valid labels are unaffected: dX[b] depends on row b alone (and on 1/B).
    good = y.clone()
    good[:2] = 0
    ref_leaves = [v.detach().clone().requires_grad_() for v in (T, A, X)]
    ref.demul_head(*ref_leaves, good, 30.0, E, W, b).loss.backward()
    torch.testing.assert_close(leaves[2].grad[2:].double(), ref_leaves[2].grad[2:], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_host_sync_in_the_ops(gen, dtype):
    """The head's forward and backward never synchronise with the host."""
    T, A, X, y, E, W, b = make_inputs(gen, **PRIMES)
    leaves = [v.to(dtype).requires_grad_() for v in (T, X)]
    a = A.float().requires_grad_()
    basis = basis_of(E, W, b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = cuda_ops().demul_head(leaves[0], a, leaves[1], y, torch.full((), 30.0, device=DEV), basis)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(leaves[0].grad).all()


def test_basis_errors_name_the_argument(gen):
    """A direct caller of the extension gets an error naming the basis tensor, before any kernel runs."""
    from demul_fast import _C
    T = torch.randn(5, 3, 8, device=DEV)
    R, c, Fm, delta, beta = (torch.randn(4, 8, device=DEV), torch.randn(4, device=DEV),
                             torch.randn(5, 4, device=DEV), torch.randn(5, device=DEV), torch.rand((), device=DEV))
    with pytest.raises(RuntimeError, match="basis.R has D=7, expected 8"):
        _C.prompt_distill_loss_forward(T, R[:, :7].contiguous(), c, Fm, delta, beta)
    with pytest.raises(RuntimeError, match="basis.F has C=4, expected 5"):
        _C.prompt_distill_loss_forward(T, R, c, Fm[:4].contiguous(), delta, beta)
    with pytest.raises(RuntimeError, match="basis.c must be Float"):
        _C.prompt_distill_loss_forward(T, R, c.double(), Fm, delta, beta)
    with pytest.raises(RuntimeError, match="needs all of R, c, F, delta, beta, got 4"):
        _C.demul_head_forward(T, torch.randn(5, 3, device=DEV), torch.randn(2, 8, device=DEV),
                        torch.zeros(2, dtype=torch.long, device=DEV), torch.ones((), device=DEV), R, c, Fm, delta,
                        None, 1.0, 0.0, False)
