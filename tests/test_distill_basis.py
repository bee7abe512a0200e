"""The K-free distillation (SPEC 4.3) on the torch backend: numerics against the float64
direct form of SPEC 4.1, the hard case ||z|| << ||b|| (where the Gram form fails), the
basis cache and its invalidation, the direct form when phi/E require grad, and that a
training step never makes a K-sized tensor.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import demul_fast as df
from backend_cases import DTYPE_IDS, KERNEL_DTYPES, assert_head_matches_reference, make_head_inputs
from demul_fast import reference
from demul_fast.ops import distill_basis as db
from demul_fast.common import l2_normalize
from demul_fast.nn import DeMulHead
from numerics import assert_error_rule

pytestmark = pytest.mark.usefixtures("one_thread")

C, M, D = 7, 3, 16
RANKS = {"K>D": 24, "K=D": D, "K<D": 9}  # K < D: e.g. a 384-d MiniLM with a 768-d ViT-L


def _distill_and_grad(t, w, b, e, fn):
    t = t.detach().clone().requires_grad_()
    loss = fn(t, w, b, e)
    return loss.detach(), torch.autograd.grad(loss, t)[0]


def _assert_distill_rule(t, w, b, e, fast_fn, name):
    """fast_fn's L_dist and dT against the float64 reference, the plain reference in t's dtype."""
    dtype = t.dtype
    fast = _distill_and_grad(t, w, b, e, fast_fn)
    ref64 = _distill_and_grad(t.double(), w.double(), None if b is None else b.double(), e.double(),
                              reference.prompt_distill_loss)
    up = torch.float64 if dtype == torch.float64 else torch.float32  # the same inputs, float32 accumulation
    plain = _distill_and_grad(t.to(up), w.to(up), None if b is None else b.to(up), e.to(up),
                              reference.prompt_distill_loss)
    assert fast[1].dtype == dtype
    assert_error_rule(f"{name} L_dist", fast[0], ref64[0], plain[0], k=2.0, dtype=dtype)
    assert_error_rule(f"{name} dT", fast[1], ref64[1], plain[1], k=3.0, dtype=dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("rank", list(RANKS), ids=list(RANKS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_kfree_head_matches_reference(dtype, rank, bias, gen):
    """The whole head on the torch backend (frozen phi -> the K-free form) under the error rule."""
    inputs = make_head_inputs(gen, C=C, M=M, D=D, B=5, K=RANKS[rank], dtype=dtype, bias=bias)
    assert_head_matches_reference(inputs, "torch", alpha=0.8, label_smoothing=0.1, return_logits=True)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("rank", list(RANKS), ids=list(RANKS))
def test_kfree_distill_loss_matches_reference(dtype, rank, gen):
    k = RANKS[rank]
    t, w, b, e = (torch.randn(*s, generator=gen).to(dtype) for s in ((C, M, D), (k, D), (k,), (C, k)))
    _assert_distill_rule(t, w, b, e, lambda *a: df.prompt_distill_loss(*a, backend="torch"), f"{rank} {dtype}")


def test_explicit_basis_is_the_same_loss(gen):
    t, w, b, e = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((C, M, D), (20, D), (20,), (C, 20)))
    basis = df.build_distill_basis(w, b, e)
    assert basis.R.shape == (D, D) and basis.F.shape == (C, D) and basis.beta.dim() == 0
    with_basis = df.prompt_distill_loss(t, distill_basis=basis, backend="torch")
    torch.testing.assert_close(with_basis, reference.prompt_distill_loss(t, w, b, e), rtol=0, atol=1e-14)


# ---- the hard case: W t^ close to -b ---------------------------------------------------------

def _hard_case(gen, dtype, classes=32, k=24, ratio=1e-3):
    """T [classes, 2, D] whose rows (c, 0) have z = W t^ + b of norm ~ ratio * ||b||:
    b = -W t^0 + a residual of norm ratio * ||b||, t[c, 0] = t^0 + (ratio / 10) noise."""
    t = torch.randn(classes, 2, D, generator=gen, dtype=torch.float64)
    t0 = l2_normalize(torch.randn(D, generator=gen, dtype=torch.float64))
    t[:, 0] = t0 + 0.1 * ratio * torch.randn(classes, D, generator=gen, dtype=torch.float64) / D ** 0.5
    w = torch.randn(k, D, generator=gen, dtype=torch.float64)
    b = -w @ t0
    residual = torch.randn(k, generator=gen, dtype=torch.float64)
    b = b + ratio * b.norm() * residual / residual.norm()
    e = torch.randn(classes, k, generator=gen, dtype=torch.float64)
    z = l2_normalize(t[:, 0]) @ w.t() + b
    assert (z.norm(dim=-1) < 3 * ratio * b.norm()).all()
    return t.to(dtype), w.to(dtype), b.to(dtype), e.to(dtype)


def _gram_distill_loss(t, w, b, e):
    """The Gram form of SPEC 4.3 (what not to do): ||z||^2 = t^'W'W t^ + 2 b'W t^ + ||b||^2."""
    t_hat, e_hat = l2_normalize(t), l2_normalize(e)
    z_sq = (t_hat @ (w.t() @ w) * t_hat).sum(-1) + 2 * t_hat @ (w.t() @ b) + b @ b  # [C, M]
    dot = torch.einsum("cmd,cd->cm", t_hat, e_hat @ w) + (e_hat @ b).unsqueeze(1)
    return (1.0 - dot / z_sq.clamp_min(0).sqrt().clamp_min(1e-6)).mean()


def _row_losses(t, w, b, e, fn):
    """fn's L_dist of every row (c, m) on its own: [C * M] (a max over rows is a steadier
    statistic than the mean over them)."""
    return torch.stack([fn(t[c:c + 1, m:m + 1], w, b, e[c:c + 1]) for c in range(t.shape[0])
                        for m in range(t.shape[1])])


def _assert_hard_rule(t, w, b, e, fast_fn, name):
    ref_args = (t.double(), w.double(), b.double(), e.double())
    up = torch.float64 if t.dtype == torch.float64 else torch.float32  # the yardstick accumulates in float32
    plain_args = tuple(x.to(up) for x in (t, w, b, e))
    rows = [_row_losses(*args, fn) for args, fn in [((t, w, b, e), fast_fn), (ref_args, reference.prompt_distill_loss),
                                                      (plain_args, reference.prompt_distill_loss)]]
    assert_error_rule(f"{name} per-row L_dist", *rows, k=2.0, dtype=t.dtype)
    grads = [_distill_and_grad(*args, fn)[1] for args, fn in [((t, w, b, e), fast_fn),
                                                              (ref_args, reference.prompt_distill_loss),
                                                              (plain_args, reference.prompt_distill_loss)]]
    assert_error_rule(f"{name} dT", *grads, k=3.0, dtype=t.dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_hard_case_kfree_keeps_the_direct_conditioning(dtype, gen):
    t, w, b, e = _hard_case(gen, dtype)
    _assert_hard_rule(t, w, b, e, lambda *a: df.prompt_distill_loss(*a, backend="torch"), f"hard {dtype}")


def test_hard_case_gram_form_fails_the_rule(gen):
    """The same check on the Gram form fails: the test above can fail."""
    t, w, b, e = _hard_case(gen, torch.float32)
    with pytest.raises(AssertionError, match="exceeds"):
        _assert_hard_rule(t, w, b, e, _gram_distill_loss, "gram")


# ---- the cache --------------------------------------------------------------------------------

def _frozen(gen, k=12):
    return (torch.randn(k, D, generator=gen), torch.randn(k, generator=gen), torch.randn(C, k, generator=gen))


def test_cache_reuses_and_rebuilds_on_every_in_place_edit(gen):
    db.clear_distill_basis_cache()
    t = torch.randn(C, M, D, generator=gen)
    w, b, e = _frozen(gen)
    df.prompt_distill_loss(t, w, b, e, backend="torch")  # builds and caches the float32 basis
    first = db.cached_distill_basis(w, b, e, torch.float32)
    assert db.cached_distill_basis(w, b, e, torch.float32) is first
    edits = [lambda: w.mul_(2.0), lambda: b[3].fill_(5.0), lambda: e.copy_(torch.randn(C, 12, generator=gen)),
             lambda: w.detach().add_(1.0), lambda: w[:, 2].zero_()]
    for i, edit in enumerate(edits):
        with torch.no_grad():
            edit()
        got = df.prompt_distill_loss(t, w, b, e, backend="torch")
        want = reference.prompt_distill_loss(t.double(), w.double(), b.double(), e.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=f"edit {i}: stale basis")
        assert db.cached_distill_basis(w, b, e, torch.float32) is not first
        first = db.cached_distill_basis(w, b, e, torch.float32)


def test_cache_keys_on_the_tensor_not_its_address(gen):
    """A new tensor with other values never hits a dead tensor's entry, even at the same address."""
    db.clear_distill_basis_cache()
    t = torch.randn(C, M, D, generator=gen)
    for _ in range(3):
        w, b, e = _frozen(gen)
        got = df.prompt_distill_loss(t, w, b, e, backend="torch")
        torch.testing.assert_close(got, reference.prompt_distill_loss(t, w, b, e), rtol=1e-5, atol=1e-6)
        del w, b, e
    assert len(db._CACHE) <= db._CACHE.size


def test_cache_sees_no_write_through_data_until_cleared(gen):
    """The documented limit: ``.data`` writes bypass the version counter."""
    db.clear_distill_basis_cache()
    w, b, e = _frozen(gen)
    first = db.cached_distill_basis(w, b, e)
    w.data.mul_(3.0)
    assert db.cached_distill_basis(w, b, e) is first
    db.clear_distill_basis_cache()
    torch.testing.assert_close(db.cached_distill_basis(w, b, e).R, db.build_distill_basis(w, b, e).R)


def test_phi_that_requires_grad_runs_the_direct_form(gen):
    t = torch.randn(C, M, D, generator=gen, dtype=torch.float64)
    w, b, e = (x.double().requires_grad_() for x in _frozen(gen))
    got = df.prompt_distill_loss(t, w, b, e, backend="torch")
    want = reference.prompt_distill_loss(t, w, b, e)
    for g, r in zip(torch.autograd.grad(got, [w, b, e]), torch.autograd.grad(want, [w, b, e])):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-13)


def test_bad_basis_is_refused_naming_the_field(gen):
    t = torch.randn(C, M, D, generator=gen)
    basis = df.build_distill_basis(*_frozen(gen))
    with pytest.raises(ValueError, match="distill_basis.F"):
        df.prompt_distill_loss(t[:-1], distill_basis=basis)
    with pytest.raises(ValueError, match="distill_basis.R"):
        df.prompt_distill_loss(t[..., :-1], distill_basis=basis)
    with pytest.raises(TypeError, match="distill_basis"):
        df.prompt_distill_loss(t, distill_basis=tuple(basis))


# ---- the module ---------------------------------------------------------------------------

def test_head_rebuilds_its_basis_when_buffers_change(gen):
    k = 12
    w, b, e = _frozen(gen, k)
    head = DeMulHead(C, M, e, (w, b), alpha=1.0)
    keys = set(head.state_dict())
    t, x, y = torch.randn(C, M, D, generator=gen), torch.randn(5, D, generator=gen), torch.randint(0, C, (5,))

    def check(msg):
        dtype = torch.float64 if head.phi_weight.dtype == torch.float64 else torch.float32
        got = head(t.to(dtype), x.to(dtype), y, scale=30.0).distill_loss
        want = reference.prompt_distill_loss(t.double(), head.phi_weight.double(), head.phi_bias.double(),
                                             head.llm_embeddings.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=msg)

    check("initial")
    first = head.distill_basis()
    assert head.distill_basis() is first
    with torch.no_grad():
        head.phi_weight.mul_(-1.5)
    check("in-place edit")
    state = {k_: v.clone() for k_, v in head.state_dict().items()}
    state["llm_embeddings"] = torch.randn(C, k, generator=gen)
    head.load_state_dict(state)
    check("load_state_dict")
    head.phi_bias = torch.randn(k, generator=gen)
    check("replaced buffer")
    head.double()
    check("moved to float64")
    assert set(head.state_dict()) == keys


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.shapes.append((str(func), tuple(o.shape)))
        return out


def test_a_training_step_makes_no_k_sized_tensor(gen):
    """With the basis cached, forward and backward never touch the K-dimensional space."""
    k = 97
    inputs = make_head_inputs(gen, C=C, M=M, D=D, B=5, K=k)
    leaves = {n: inputs[n].requires_grad_() for n in ("text_features", "prompt_logits", "image_features")}
    df.demul_head(**inputs, backend="torch")  # builds and caches the basis
    with _ShapeRecorder() as rec:
        out = df.demul_head(**inputs, backend="torch")
        torch.autograd.grad(out.loss, list(leaves.values()))
    assert rec.shapes, "nothing recorded"
    assert not [s for s in rec.shapes if k in s[1]], [s for s in rec.shapes if k in s[1]]


def test_torch_backend_is_not_the_reference(gen, monkeypatch):
    """The torch backend computes the head itself: it runs with the reference disabled."""
    inputs = make_head_inputs(gen, C=C, M=M, D=D, B=5, K=11)
    want = reference.demul_head(**inputs).loss
    for name in ("demul_head", "prompt_distill_loss", "aggregate_prompts", "cosine_cross_entropy"):
        monkeypatch.setattr(reference, name, lambda *a, **k: pytest.fail("the reference ran"))
    torch.testing.assert_close(df.demul_head(**inputs, backend="torch").loss, want, rtol=1e-5, atol=1e-6)


def test_double_backward_matches_reference(gen):
    """Under create_graph=True the gradient made in the forward is recomputed differentiably."""
    t = torch.randn(C, M, D, generator=gen, dtype=torch.float64, requires_grad=True)
    w, b, e = (x.double() for x in _frozen(gen))
    second = []
    for fn in (lambda: df.prompt_distill_loss(t, w, b, e, backend="torch"),
               lambda: reference.prompt_distill_loss(t, w, b, e)):
        (g,) = torch.autograd.grad(fn(), t, create_graph=True)
        second.append(torch.autograd.grad(g.square().sum(), t)[0])
    torch.testing.assert_close(second[0], second[1], rtol=1e-9, atol=1e-12)


def test_mlp_phi_runs_its_last_layer_in_the_basis(gen, monkeypatch):
    """An MLP phi: earlier layers on t^, the last linear layer K-free (the direct MLP loss never runs)."""

    k, hidden = 11, 20
    phi = torch.nn.Sequential(torch.nn.Linear(D, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, k)).double()
    e = torch.randn(C, k, generator=gen, dtype=torch.float64)
    head = DeMulHead(C, M, e, phi).double()
    t = torch.randn(C, M, D, generator=gen, dtype=torch.float64)
    x, y = torch.randn(5, D, generator=gen, dtype=torch.float64), torch.randint(0, C, (5,))
    want = reference.mlp_distill_loss(t, head.phi_pre, head.phi_weight, head.phi_bias, e)
    monkeypatch.setattr(reference, "mlp_distill_loss", lambda *a: pytest.fail("the direct MLP loss ran"))
    assert head.distill_basis(torch.float64).R.shape == (min(k, hidden), hidden)
    torch.testing.assert_close(head(t, x, y).distill_loss, want, rtol=0, atol=1e-13)
