"""demul_fast.nn.DeMulHead against reference.demul_head (SPEC 4): loss and gradients."""

import copy

import pytest
import torch

from demul_fast import reference
from demul_fast.nn import DeMulHead
from numerics import assert_error_rule

C, M, D, B, K = 37, 3, 100, 5, 70
ALPHA, LS, SCALE = 0.7, 0.1, 50.0


def make_phi(kind, gen):
    w = torch.randn(K, D, generator=gen, dtype=torch.float64) / D ** 0.5
    b = 0.1 * torch.randn(K, generator=gen, dtype=torch.float64)
    if kind == "linear":
        lin = torch.nn.Linear(D, K).double()
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        return lin
    if kind == "pair":
        return (w, b)
    if kind == "mlp":
        first = torch.nn.Linear(D, 40).double()
        last = torch.nn.Linear(40, K).double()
        return torch.nn.Sequential(first, torch.nn.GELU(), last)
    return None


def inputs(gen, dtype):
    t = torch.randn(C, M, D, generator=gen, dtype=torch.float64)
    a = torch.randn(C, M, generator=gen, dtype=torch.float64)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=gen)
    e = torch.randn(C, K, generator=gen, dtype=torch.float64)
    return t, a, x, y, e


def reference_loss(t, a, x, y, e, phi, kind):
    """The head written with reference functions only (an MLP phi's distillation spelled out)."""
    if kind in ("linear", "pair"):
        w, b = (phi.weight, phi.bias) if kind == "linear" else phi
        return reference.demul_head(t, a, x, y, SCALE, e, w.to(t.dtype), b.to(t.dtype), ALPHA, LS).loss
    ce = reference.demul_head(t, a, x, y, SCALE, label_smoothing=LS).loss
    if kind == "none":
        return ce
    z = copy.deepcopy(phi).to(t.dtype)(reference.l2_normalize(t))
    cos = torch.nn.functional.cosine_similarity(z, e.unsqueeze(1), dim=-1)
    return ce + ALPHA * (1 - cos).mean()


def run(head_or_ref, t, a, x, y, e, phi, kind):
    t = t.detach().clone().requires_grad_()
    if isinstance(head_or_ref, DeMulHead):
        loss = head_or_ref(t, x.to(t.dtype), y, scale=SCALE).loss
        a_param = head_or_ref.prompt_logits
    else:
        a_param = a.detach().clone().requires_grad_()
        loss = reference_loss(t, a_param, x.to(t.dtype), y, e.to(t.dtype), phi, kind)
    gt, ga = torch.autograd.grad(loss, [t, a_param])
    return loss.detach(), gt, ga


@pytest.mark.parametrize("kind", ["linear", "pair", "mlp", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_matches_reference(kind, dtype, gen):
    t, a, x, y, e = inputs(gen, dtype)
    phi = make_phi(kind, gen)
    head = DeMulHead(C, M, e if kind != "none" else None, phi, alpha=ALPHA, label_smoothing=LS).to(dtype)
    with torch.no_grad():
        head.prompt_logits.copy_(a)
    fast = run(head, t.to(dtype), a, x, y, e, phi, kind)
    ref64 = run(None, t, a, x, y, e, phi, kind)
    plain = run(None, t.to(dtype), a.to(dtype), x, y, e, phi, kind)
    for name, f, r, p, k in zip(["loss", "dT", "dA"], fast, ref64, plain, [2.0, 3.0, 3.0]):
        assert_error_rule(f"{kind} {dtype} {name}", f.to(r.dtype), r, p, k=k, dtype=dtype)


def test_uniform_weights_logits_and_entropy(gen):
    t, a, x, y, e = inputs(gen, torch.float64)
    head = DeMulHead(C, M, learn_weights=False)
    assert "prompt_logits" in dict(head.named_buffers()) and len(list(head.parameters())) == 0
    u = reference.l2_normalize(reference.l2_normalize(t).mean(1))
    torch.testing.assert_close(head.class_features(t), u)
    out = head(t, x, scale=SCALE)  # no labels: logits only
    assert out.loss is None
    torch.testing.assert_close(out.logits, SCALE * reference.l2_normalize(x) @ u.T)

    lam = 0.3
    head = DeMulHead(C, M, entropy_weight=lam).double()
    with torch.no_grad():
        head.prompt_logits.copy_(a)
    w = torch.softmax(a, -1)
    expected = reference.demul_head(t, a, x, y, SCALE).loss + lam * (w * w.log()).sum(-1).mean()
    torch.testing.assert_close(head(t, x, y, scale=SCALE).loss, expected)


def test_head_arguments(gen):
    e = torch.randn(C, K, dtype=torch.float64)
    with pytest.raises(ValueError, match="phi is required"):
        DeMulHead(C, M, e)
    with pytest.raises(TypeError, match="phi must be"):
        DeMulHead(C, M, e, phi="linear")
    with pytest.raises(ValueError, match="must end with an nn.Linear"):
        DeMulHead(C, M, e, phi=torch.nn.Sequential(torch.nn.Linear(D, K), torch.nn.GELU()))
    with pytest.raises(ValueError, match="K=71"):
        DeMulHead(C, M, e, phi=torch.nn.Linear(D, 71))
    with pytest.raises(ValueError, match=r"llm_embeddings must be \[C=36"):
        DeMulHead(C - 1, M, e, phi=torch.nn.Linear(D, K))
