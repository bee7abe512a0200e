"""The "triton" backend against the float64 reference, with the error rule (tests/numerics.py).

Without a GPU these run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest),
where every tl.dot runs in fp32: the bf16/fp16 numerics of the GPU dot path and the large
shapes are GPU tests (tests/test_triton_gpu.py). Every output buffer is filled with NaN
before its kernel runs (POISON_OUTPUTS), so an element a kernel forgets to write fails.
Shapes are odd (C=37, M=3, D=100, B=5, K=70) or cross the kernels' block boundaries
(D=300 -> 16-row tiles: B=20, C=40, K=40 span two or three tiles; M=17 -> BLOCK_M=32).
"""

import math

import pytest
import torch

from demul_fast import backends, reference as ref
from demul_fast.backends import BackendUnavailable
from demul_fast import functional as F
from numerics import assert_error_rule, default_compute_dtype, round_trip

from demul_fast import triton_ops  # triton is in the test extra (checked by conftest)

if triton_ops.UNAVAILABLE_REASON:
    pytest.skip(triton_ops.UNAVAILABLE_REASON, allow_module_level=True)
from demul_fast.kernels import _common, cosine_ce  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ODD = dict(C=37, M=3, D=100, B=5, K=70)
CROSSING = dict(C=40, M=5, D=300, B=20, K=40)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


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
    accumulated in float32 (tests/numerics.py)."""
    fo, fg = run(fast_fn, args, diff, dtype, cotangents)
    if cotangents is not None:  # autograd hands a half-precision output its cotangent rounded
        cotangents = [c.to(f.dtype).double() for c, f in zip(cotangents, fo)]
    rounded = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    ro, rg = run(ref_fn, rounded, diff, torch.float64, cotangents)  # exact, on the same rounded inputs
    po, pg = run(ref_fn, rounded, diff, default_compute_dtype(dtype), cotangents)
    ulps = 1.0 if DEVICE == "cpu" else 0.5  # the interpreter truncates float32 -> bfloat16
    assert len(fo) == len(ro)
    for i, (f, r, p) in enumerate(zip(fo, ro, po)):
        assert_error_rule(f"{name} out{i}", f, r, p, k=2.0, dtype=dtype, stored_ulps=ulps)
    for j, (f, r, p) in enumerate(zip(fg, rg, pg)):
        label = grad_names[j] if grad_names else f"grad{j}"
        assert_error_rule(f"{name} {label}", f, r, p, k=3.0, dtype=dtype, stored_ulps=ulps)
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


def test_cosine_cross_entropy_class_grad_only(gen):
    """X without grad: the dX kernel is skipped, dU still right."""
    _, _, X, y, *_ = make_inputs(gen, **ODD)
    U = ref.l2_normalize(rand_like(gen, torch.empty(ODD["C"], ODD["D"])))
    check("ce(dU only)", lambda x, u, yy: F.cosine_cross_entropy(x, u, yy, 30.0, backend="triton"),
          lambda x, u, yy: ref.cosine_cross_entropy(x, u, yy, 30.0), [X, U, y], diff=[1], grad_names=["dU"])


@pytest.mark.parametrize("shape,bias", [(ODD, True), (CROSSING, False)], ids=["odd-bias", "crossing-nobias"])
def test_prompt_distill_loss(gen, shape, bias):
    T, _, _, _, E, W, b = make_inputs(gen, bias=bias, **shape)
    fo, _ = check("distill", lambda t, w, bb, e: F.prompt_distill_loss(t, w, bb, e, backend="triton"),
                  ref.prompt_distill_loss, [T, W, b, E], diff=[0], grad_names=["dT"])
    assert fo[0].dtype == torch.float32


HEAD_CASES = [
    # shape, label_smoothing, alpha, bias, llm embeddings, return_logits, scale tensor
    (ODD, 0.0, 1.0, True, True, False, False),
    (ODD, 0.1, 0.0, False, True, True, True),
    (CROSSING, 0.1, 1.0, False, True, True, False),
    (ODD, 0.0, 1.0, False, False, False, True),
]


@pytest.mark.parametrize("shape,ls,alpha,bias,with_llm,return_logits,scale_tensor", HEAD_CASES,
                         ids=["odd", "odd-ls-alpha0-logits", "crossing-logits", "no-llm"])
def test_demul_head(gen, shape, ls, alpha, bias, with_llm, return_logits, scale_tensor):
    T, A, X, y, E, W, b = make_inputs(gen, bias=bias, **shape)
    if not with_llm:
        E = W = b = None
    tau = torch.tensor(17.0, dtype=torch.float64, device=DEVICE) if scale_tensor else 17.0

    def head(fn):
        def call(t, a, x, s):
            out = fn(t, a, x, y, s, E if E is None else E.to(t.dtype), W if W is None else W.to(t.dtype),
                     b if b is None else b.to(t.dtype), alpha=alpha, label_smoothing=ls, return_logits=return_logits)
            assert (out.logits is not None) == return_logits
            return tuple(out)
        return call

    # a different weight on every output, so each output's gradient path is exercised
    C, B = shape["C"], shape["B"]
    cot = [torch.tensor(w, dtype=torch.float64, device=DEVICE) for w in (1.0, 0.3, -0.7)]
    if return_logits:
        cot.append(rand_like(gen, torch.empty(B, C)) / (B * C))
    diff = [0, 1, 2, 3] if scale_tensor else [0, 1, 2]
    fo, _ = check("head", head(lambda *a, **k: F.demul_head(*a, **k, backend="triton")), head(ref.demul_head),
                  [T, A, X, tau], diff=diff, cotangents=cot, grad_names=["dT", "dA", "dX", "dscale"])
    assert all(o.dtype == torch.float32 for o in fo[:3])
    if not with_llm:
        assert float(fo[2].detach()) == 0.0


def test_head_noncontiguous_and_mixed_dtypes(gen):
    """Strided T and X, prompt logits / phi / E in float64 beside float32 features."""
    C, M, D, B, K = 6, 3, 20, 4, 16
    T, A, X, y, E, W, b = make_inputs(gen, C=C, M=M, D=D, B=B, K=K)
    T_strided = T.float().permute(2, 0, 1).contiguous().permute(1, 2, 0)  # same values, D-stride C*M
    X_strided = X.float().t().contiguous().t()
    assert not T_strided.is_contiguous() and not X_strided.is_contiguous()
    T_strided.requires_grad_(True)
    A64 = A.clone().requires_grad_(True)
    out = F.demul_head(T_strided, A64, X_strided, y.int(), 9.0, E, W, b, alpha=0.5, backend="triton")
    out.loss.backward()
    T64, A_ref = T.clone().requires_grad_(True), A.clone().requires_grad_(True)
    r = ref.demul_head(T64, A_ref, X, y, 9.0, E, W, b, alpha=0.5)
    r.loss.backward()
    torch.testing.assert_close(out.loss.double(), r.loss, rtol=1e-5, atol=1e-6)
    assert A64.grad.dtype == torch.float64 and T_strided.grad.dtype == torch.float32
    torch.testing.assert_close(T_strided.grad.double(), T64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(A64.grad, A_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_half_inputs_interpreted(gen, dtype):
    """Half inputs: outputs in the input dtype, losses in float32, error rule vs the plain
    path on the same half inputs accumulated in float32 (the interpreter's dots run in fp32)."""
    shape = dict(C=9, M=3, D=24, B=6, K=20)
    T, A, X, y, E, W, b = make_inputs(gen, **shape)
    E, W, b = round_trip(dtype, E, W, b)

    def head(fn):
        def call(t, a, x):
            out = fn(t, a, x, y, 12.0, E.to(t.dtype), W.to(t.dtype), b.to(t.dtype), alpha=1.0,
                     label_smoothing=0.1, return_logits=True)
            return tuple(out)
        return call

    cot = [torch.tensor(1.0, dtype=torch.float64, device=DEVICE)] * 3 + [rand_like(gen, torch.empty(6, 9)) / 54]
    fo, fg = check(f"head {dtype}", head(lambda *a, **k: F.demul_head(*a, **k, backend="triton")),
                   head(ref.demul_head), [T, A, X], diff=[0, 1, 2], dtype=dtype, cotangents=cot,
                   grad_names=["dT", "dA", "dX"])
    assert [o.dtype for o in fo] == [torch.float32] * 3 + [dtype]
    assert all(g.dtype == dtype for g in fg)


def test_labels_out_of_range_read_nothing(gen):
    """Validation is bypassed here: a label outside [0, C) must only fail to match a class
    (no out-of-bounds read), leaving lse - (ls/C) sum_c s for that row."""
    B, C, D = 3, 5, 16
    X = torch.randn(B, D, generator=gen).to(DEVICE)
    U = ref.l2_normalize(torch.randn(C, D, generator=gen)).to(DEVICE)
    y = torch.tensor([C + 1000, -7, 2], device=DEVICE)
    scale = torch.full((), 5.0, device=DEVICE)
    rows, lse, logits = cosine_ce.ce_forward(X, U, y, scale, 0.1, True)
    s = ref.cosine_logits(X, U, 5.0)
    torch.testing.assert_close(logits, s)
    expect = torch.logsumexp(s, -1) - 0.1 / C * s.sum(-1)
    expect[2] -= 0.9 * s[2, 2]
    torch.testing.assert_close(rows, expect)


def test_frozen_parameters_refuse_grad(gen):
    T, A, X, y, E, W, b = make_inputs(gen, C=4, M=2, D=8, B=2, K=8)
    W = W.float().requires_grad_(True)
    # refused by the backend's `unsupported` hook before any kernel: an explicit request raises
    with pytest.raises(BackendUnavailable, match="phi_weight"):
        F.demul_head(T.float(), A.float(), X.float(), y, 5.0, E.float(), W, None, backend="triton")
    with pytest.raises(BackendUnavailable, match="llm_embeddings"):
        F.prompt_distill_loss(T.float(), W.detach(), None, E.float().requires_grad_(True), backend="triton")
    # and the module refuses a direct call too
    with pytest.raises(ValueError, match="phi_weight"):
        triton_ops.demul_head(T.float(), A.float(), X.float(), y, 5.0, E.float(), W, None)
    with torch.no_grad():  # nothing to differentiate: fine
        F.prompt_distill_loss(T.float(), W, None, E.float(), backend="triton")


def test_ops_registered():
    names = {str(op) for op in triton_ops.OPS}
    for base in ("triton_aggregate", "triton_distill", "triton_cosine_ce", "triton_head"):
        assert f"demul_fast.{base}.default" in names and f"demul_fast.{base}_bwd.default" in names
    assert all(isinstance(op, torch._ops.OpOverload) for op in triton_ops.OPS)


def test_double_backward_refused(gen):
    T, A, X, y, E, W, b = make_inputs(gen, C=4, M=2, D=8, B=2, K=8)
    T = T.float().requires_grad_(True)
    out = F.demul_head(T, A.float(), X.float(), y, 5.0, E.float(), W.float(), b.float(), backend="triton")
    (dT,) = torch.autograd.grad(out.loss, [T], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        dT.sum().backward()


def test_shared_memory_guard(monkeypatch):
    """On a GPU, tiles estimated (from sizes measured by compiling for sm_90) to exceed the
    shared memory of a block are refused with a clear error; the sizes the GPU tests use fit."""
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "_smem_limit", lambda device: 232448)
    f32, bf16 = torch.float32, torch.bfloat16
    _common.check_fits("text", f32, 16, 512, "cuda")     # C=1000, M=8, D=512: 101,376 B measured
    _common.check_fits("ce", f32, 16, 512, "cuda")       # 134,528 B measured
    _common.check_fits("ce", f32, 64, 128, "cuda")       # D=100: 181,760 B measured
    _common.check_fits("text", bf16, 32, 1024, "cuda")   # 106,496 B measured
    _common.check_fits("ce", bf16, 16, 1024, "cuda")     # 164,352 B measured
    with pytest.raises(ValueError, match="cross-entropy"):
        _common.check_fits("ce", f32, 16, 1024, "cuda")  # 265,600 B measured
    with pytest.raises(ValueError, match="text kernels"):
        _common.check_fits("text", f32, 32, 1024, "cuda")  # 268,288 B measured
    with pytest.raises(ValueError, match="D <= 1024"):
        _common.block_d(1025)
