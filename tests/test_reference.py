"""demul_fast.reference against the SPEC: hand-computed tiny cases, an independent
loop-and-formula implementation with hand-derived gradients (tests/spec_manual.py),
and gradcheck in float64."""

import math

import pytest
import torch

from demul_fast import reference as ref
from spec_manual import head_forward_backward


def _inputs(gen, C=5, M=3, D=7, B=4, K=6, dtype=torch.float64, bias=True):
    T = torch.randn(C, M, D, generator=gen, dtype=dtype)
    A = torch.randn(C, M, generator=gen, dtype=dtype)
    X = torch.randn(B, D, generator=gen, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=gen)
    E = torch.randn(C, K, generator=gen, dtype=dtype)
    W = torch.randn(K, D, generator=gen, dtype=dtype) / math.sqrt(D)
    b = torch.randn(K, generator=gen, dtype=dtype) if bias else None
    return T, A, X, y, E, W, b


def test_aggregate_tiny_by_hand():
    # C=1, M=2, D=2: t0 = (3, 4) -> (0.6, 0.8); t1 = (0, 2) -> (0, 1); equal weights.
    T = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]], dtype=torch.float64)
    A = torch.zeros(1, 2, dtype=torch.float64)
    u = torch.tensor([0.3, 0.9], dtype=torch.float64)
    expected = u / u.norm()
    torch.testing.assert_close(ref.aggregate_prompts(T, A)[0], expected, rtol=0, atol=1e-15)
    # weights softmax(log 3, 0) = (0.75, 0.25)
    A = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    u = torch.tensor([0.45, 0.6 + 0.25], dtype=torch.float64)
    torch.testing.assert_close(ref.aggregate_prompts(T, A)[0], u / u.norm(), rtol=0, atol=1e-15)


def test_cross_entropy_tiny_by_hand():
    # x = (2, 0) -> (1, 0); classes e1, e2; tau = 10: logits (10, 0).
    X = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    U = torch.eye(2, dtype=torch.float64)
    y = torch.tensor([1])
    lse = math.log(math.exp(10.0) + 1.0)
    assert ref.cosine_cross_entropy(X, U, y, 10.0).item() == pytest.approx(lse - 0.0, abs=1e-12)
    # label smoothing 0.1: q = (0.05, 0.95)
    expect = lse - (0.05 * 10.0 + 0.95 * 0.0)
    assert ref.cosine_cross_entropy(X, U, y, 10.0, 0.1).item() == pytest.approx(expect, abs=1e-12)
    # agrees with torch's own cross_entropy on the logits
    logits = 10.0 * X / X.norm() @ U.T
    torch_ce = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    assert ref.cosine_cross_entropy(X, U, y, 10.0, 0.1).item() == pytest.approx(torch_ce.item(), abs=1e-12)


def test_distill_tiny_by_hand():
    # W = I, no bias: z = t^; e along z -> cos 1, loss 0; e orthogonal -> loss 1.
    T = torch.tensor([[[5.0, 0.0]]], dtype=torch.float64)
    W = torch.eye(2, dtype=torch.float64)
    assert ref.prompt_distill_loss(T, W, None, torch.tensor([[7.0, 0.0]], dtype=torch.float64)).item() == 0.0
    assert ref.prompt_distill_loss(T, W, None, torch.tensor([[0.0, 3.0]], dtype=torch.float64)).item() == 1.0
    # bias (0, 1): z = (1, 1), e = (0, 1): cos = 1/sqrt(2)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    got = ref.prompt_distill_loss(T, W, b, torch.tensor([[0.0, 1.0]], dtype=torch.float64)).item()
    assert got == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-15)


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("with_llm", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.5])
def test_head_matches_independent_spec_implementation(gen, ls, with_llm, bias, alpha):
    T, A, X, y, E, W, b = _inputs(gen, bias=bias)
    T.requires_grad_(True), A.requires_grad_(True), X.requires_grad_(True)
    tau = 13.5
    out = ref.demul_head(T, A, X, y, tau, E if with_llm else None, W if with_llm else None,
                         b if with_llm else None, alpha=alpha, label_smoothing=ls, return_logits=True)
    out.loss.backward()
    man = head_forward_backward(T.detach(), A.detach(), X.detach(), y, tau, E if with_llm else None, W,
                                b, alpha, ls)
    tol = dict(rtol=0, atol=1e-12)
    assert out.loss.item() == pytest.approx(man["loss"], abs=1e-12)
    assert out.ce_loss.item() == pytest.approx(man["ce"], abs=1e-12)
    assert out.distill_loss.item() == pytest.approx(man["dist"], abs=1e-12)
    torch.testing.assert_close(out.logits, man["logits"], **tol)
    torch.testing.assert_close(T.grad, man["dT"], **tol)
    torch.testing.assert_close(A.grad, man["dA"], **tol)
    torch.testing.assert_close(X.grad, man["dX"], **tol)
    torch.testing.assert_close(ref.aggregate_prompts(T, A), man["class_features"], **tol)


def test_head_without_llm_has_zero_distill(gen):
    T, A, X, y, *_ = _inputs(gen)
    out = ref.demul_head(T, A, X, y, 100.0)
    assert out.distill_loss.dim() == 0 and out.distill_loss.item() == 0.0
    assert out.logits is None
    assert out.loss.item() == out.ce_loss.item()


def test_alpha_zero_is_plain_ce(gen):
    T, A, X, y, E, W, b = _inputs(gen)
    out = ref.demul_head(T, A, X, y, 100.0, E, W, b, alpha=0.0)
    assert out.loss.item() == out.ce_loss.item()
    assert out.distill_loss.item() > 0


def test_head_parts_equal_the_separate_functions(gen):
    T, A, X, y, E, W, b = _inputs(gen)
    tau = torch.tensor(50.0, dtype=torch.float64)
    out = ref.demul_head(T, A, X, y, tau, E, W, b, alpha=0.7, label_smoothing=0.1)
    u = ref.aggregate_prompts(T, A)
    ce = ref.cosine_cross_entropy(X, u, y, tau, 0.1)
    dist = ref.prompt_distill_loss(T, W, b, E)
    assert out.ce_loss.item() == pytest.approx(ce.item(), abs=1e-14)
    assert out.distill_loss.item() == pytest.approx(dist.item(), abs=1e-14)
    assert out.loss.item() == pytest.approx(ce.item() + 0.7 * dist.item(), abs=1e-14)


def test_gradcheck_aggregate(gen):
    T, A, *_ = _inputs(gen)
    assert torch.autograd.gradcheck(ref.aggregate_prompts, (T.requires_grad_(), A.requires_grad_()))


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_gradcheck_cross_entropy(gen, ls):
    _, _, X, y, *_ = _inputs(gen)
    U = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    tau = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, u, t: ref.cosine_cross_entropy(x, u, y, t, ls),
                                    (X.requires_grad_(), U.requires_grad_(), tau))


def test_gradcheck_distill(gen):
    T, _, _, _, E, W, b = _inputs(gen)
    args = (T.requires_grad_(), W.requires_grad_(), b.requires_grad_(), E.requires_grad_())
    assert torch.autograd.gradcheck(ref.prompt_distill_loss, args)


def test_gradcheck_head(gen):
    T, A, X, y, E, W, b = _inputs(gen)

    def f(T, A, X):
        o = ref.demul_head(T, A, X, y, 20.0, E, W, b, alpha=0.8, label_smoothing=0.1, return_logits=True)
        return o.loss, o.logits

    assert torch.autograd.gradcheck(f, (T.requires_grad_(), A.requires_grad_(), X.requires_grad_()))


def test_norm_floor_is_a_constant(gen):
    # a zero vector stays zero (no NaN) and its gradient is dv^/eps (SPEC 4.1)
    v = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    out = ref.l2_normalize(v)
    assert torch.equal(out, torch.zeros_like(out))
    out.backward(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(v.grad, torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64) / ref.EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_runs_in_each_dtype(gen, dtype):
    T, A, X, y, E, W, b = _inputs(gen, dtype=dtype)
    out = ref.demul_head(T.requires_grad_(), A.requires_grad_(), X, y, 100.0, E, W, b, return_logits=True)
    out.loss.backward()
    assert out.loss.dtype == dtype and T.grad.dtype == dtype and out.logits.dtype == dtype
    assert torch.isfinite(out.loss) and torch.isfinite(T.grad).all()
