"""The Triton head's step as training calls it (issue 26), against the float64 reference:

* ``loss.backward()`` alone: autograd hands the backward None for ce, dist and the saved
  statistics (set_materialize_grads(False), no zero-filled tensors); the gradients must
  still be those of the loss;
* the text forward's two paths, the [rows, D] tile read once (RESIDENT) and D streamed in
  chunks, both against the reference, on the same inputs (RESIDENT_BYTES moved);
* the cast of the basis to the compute dtype is made once per basis and redone when R
  changes in place;
* the 128-row forward with R triangular (its zero blocks skipped) on the package's basis
  and on one whose R is not triangular (turned back by triton_ops.triangular_basis);
* a frozen scale gets no d-scale work (the kernel's partials are not even stored).
"""

import math

import pytest
import torch

from demul_fast import reference as ref
from demul_fast.ops.distill_basis import DistillBasis, build_distill_basis
from demul_fast.ops import triton_ops

if triton_ops.UNAVAILABLE_REASON:
    pytest.skip(triton_ops.UNAVAILABLE_REASON, allow_module_level=True)
from demul_fast.kernels import cosine_ce, launch, text_head  # noqa: E402


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


def inputs(seed, C=9, M=3, D=40, B=6, K=24):
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(C, M, D, generator=g, dtype=torch.float64)
    A = torch.randn(C, M, generator=g, dtype=torch.float64)
    X = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    E = torch.randn(C, K, generator=g, dtype=torch.float64)
    W = torch.randn(K, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    b = torch.randn(K, generator=g, dtype=torch.float64) * 0.3
    return T, A, X, y, E, W, b


def grads_of_loss(fn, T, A, X, dtype):
    t, a, x = (v.detach().to(dtype).requires_grad_(True) for v in (T, A, X))
    loss = fn(t, a, x)
    loss.backward()
    return loss.detach().double(), t.grad.double(), a.grad.double(), x.grad.double()


def reference_step(T, A, X, y, E, W, b, alpha=0.7):
    return grads_of_loss(lambda t, a, x: ref.demul_head(t, a, x, y, 13.0, E, W, b, alpha=alpha).loss,
                         T, A, X, torch.float64)


def assert_close(got, want, tol, what):
    for name, g, w in zip(("loss", "dT", "dA", "dX"), got, want):
        err = (g - w).abs().max().item()
        scale = w.abs().max().item()
        assert err <= tol * scale, f"{what} {name}: max error {err:.3g} vs {tol} x {scale:.3g}"


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_backward_alone(seed):
    """Only the total loss is differentiated: ce and dist gradients arrive as None."""
    T, A, X, y, E, W, b = inputs(seed)
    basis = build_distill_basis(W, b, E)
    got = grads_of_loss(lambda t, a, x: triton_ops.demul_head(t, a, x, y, 13.0, basis, alpha=0.7).loss,
                        T, A, X, torch.float32)
    assert_close(got, reference_step(T, A, X, y, E, W, b), 2e-5, "loss.backward()")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("resident", [True, False], ids=["tile-once", "streamed"])
def test_text_forward_paths(monkeypatch, dtype, resident):
    """Both paths of the text forward (D=100: two 64-column chunks when streamed) against the
    reference, in three dtypes; the path taken is checked."""
    monkeypatch.setattr(text_head, "RESIDENT_BYTES", 1 << 30 if resident else 0)
    T, A, X, y, E, W, b = inputs(3, C=11, M=5, D=100, B=5, K=70)
    assert text_head.text_config(11, 5, 100, 70, 2)["RESIDENT"] == resident
    _head_matches_reference(T, A, X, y, E, W, b, dtype, f"{dtype} resident={resident}")


def _head_matches_reference(T, A, X, y, E, W, b, dtype, label, basis=None):
    """The Triton head's loss gradients against the float64 reference on the same rounded
    inputs (the error rule's yardstick is in test_mutations / test_error_rule: this checks the
    paths taken, at the tolerances of this file)."""
    basis = build_distill_basis(W, b, E) if basis is None else basis
    got = grads_of_loss(lambda t, a, x: triton_ops.demul_head(t, a, x, y, 13.0, basis, alpha=0.7).loss,
                        T, A, X, dtype)
    Tr, Ar, Xr = (v.to(dtype).double() for v in (T, A, X))
    want = reference_step(Tr, Ar, Xr, y, E, W, b)
    tol = 2e-5 if dtype == torch.float32 else (3e-2 if dtype == torch.bfloat16 else 5e-3)
    assert_close(got, want, tol, label)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("wide", [True, False], ids=["128-rows", "64-rows"])
@pytest.mark.parametrize("C,M", [(7, 20), (37, 3)], ids=["4-classes-per-tile", "many-classes"])
def test_row_tiles(monkeypatch, dtype, wide, C, M):
    """The forward's 128-row tiles (aggregation in two parts after the product) and the
    64-row ones a GPU without the shared memory takes; the backward's 128-row tile of 4
    classes of M=20 (its w du product padded to 16 classes) and its 64-row tile of 16
    classes of M=3; each against the reference in three dtypes, with two tiles or more."""
    monkeypatch.setattr(text_head, "wide_tiles_fit", lambda device: wide)
    T, A, X, y, E, W, b = inputs(7, C=C, M=M, D=100, B=5, K=70)
    cfg = text_head.text_config(C, M, 100, 70, 2, wide)
    assert bool(cfg["AGG_PARTS"]) == wide and cfg["bwd_tiles"] >= 2 and cfg["fwd_tiles"] >= 2
    _head_matches_reference(T, A, X, y, E, W, b, dtype, f"{dtype} wide={wide} C={C} M={M}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D,K", [(100, 70), (128, 200), (300, 320)], ids=["3-groups", "4-groups", "2-bwd-chunks"])
@pytest.mark.parametrize("turned", [False, True], ids=["triangular-R", "full-R"])
def test_triangular_forward(monkeypatch, dtype, D, K, turned):
    """The 128-row forward with R triangular: the r columns in groups of a quarter of the tile,
    each group's product over the pieces of the tile at or right of its diagonal only, whole
    groups per split (two splits here, so that a split owns two groups); D=300, r=300 also
    takes the backward's two output chunks. On the package's
    basis (R the QR factor of phi's W) and on the same basis turned by a random orthogonal P
    (R, c, F -> P R, P c, F P^T: the same loss, R not triangular, which the op turns back);
    both against the reference in three dtypes."""
    monkeypatch.setattr(text_head, "TARGET_PROGRAMS", 4)  # 2 row tiles x 2 splits
    C, M = 7, 20
    T, A, X, y, E, W, b = inputs(11, C=C, M=M, D=D, B=5, K=K)
    rank = min(K, D)
    cfg = text_head.text_config(C, M, D, rank, 2, True)
    groups = -(-rank // (cfg["BLOCK_D"] // 4))
    assert cfg["TRI"] and cfg["fwd_tiles"] == 2 and cfg["splits"] == 2 < groups
    assert {(cfg["OWNERS"] >> (2 * g)) & 3 for g in range(groups)} == {0, 1}
    assert cfg["out_chunks"] == (2 if D > 256 else 1) and (D <= 256 or rank > cfg["BLOCK_DO"])
    basis = build_distill_basis(W, b, E)
    if turned:
        g = torch.Generator().manual_seed(5)
        P = torch.linalg.qr(torch.randn(rank, rank, generator=g, dtype=torch.float64))[0]
        R, c, F = (t.double() for t in basis[:3])
        basis = DistillBasis((P @ R).float(), (P @ c).float(), (F @ P.T).float(), basis.delta, basis.beta)
        assert (basis.R.tril(-1).abs() > 1e-3).any()  # not triangular
    _head_matches_reference(T, A, X, y, E, W, b, dtype, f"{dtype} D={D} K={K} turned={turned}", basis)


def test_triangular_basis_once_per_basis():
    """The turn is made once per basis (kept), its R upper triangular, and redone when F changes in place."""
    g = torch.Generator().manual_seed(3)
    R, c, F = torch.randn(6, 9, generator=g), torch.randn(6, generator=g), torch.randn(4, 6, generator=g)
    first = triton_ops.triangular_basis(R, c, F)
    assert triton_ops.triangular_basis(R, c, F) is first
    R2, c2, F2 = (t.double() for t in first)
    assert torch.equal(R2.tril(-1), torch.zeros_like(R2)) and R2.is_contiguous()
    # the same |v| and <v, F> for any row: R2 t + c2 = P^T (R t + c), F2 = F P
    t = torch.randn(9, 5, generator=g, dtype=torch.float64)
    v, v2 = R.double() @ t + c.double()[:, None], R2 @ t + c2[:, None]
    assert torch.allclose(v.norm(dim=0), v2.norm(dim=0), rtol=1e-5)
    assert torch.allclose(F.double() @ v, F2 @ v2, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        F.mul_(2.0)
    assert triton_ops.triangular_basis(R, c, F) is not first


def test_basis_cast_once_per_basis():
    R = torch.randn(8, 16, dtype=torch.float32)
    first = triton_ops._basis_r(R, torch.bfloat16)
    assert triton_ops._basis_r(R, torch.bfloat16) is first  # kept
    with torch.no_grad():
        R.mul_(2.0)  # in place: a new version, a new cast
    again = triton_ops._basis_r(R, torch.bfloat16)
    assert again is not first and torch.equal(again, (R.to(torch.bfloat16)))
    assert triton_ops._basis_r(first, torch.bfloat16) is first  # already the compute dtype


def test_frozen_scale_gets_no_dscale_work():
    T, A, X, y, E, W, b = inputs(5)
    X32, U = X.float(), torch.nn.functional.normalize(torch.randn(9, 40), dim=-1)
    s = torch.tensor([13.0])
    rows, lse, xn, _ = cosine_ce.ce_forward(X32, U, y, s, 0.0, False)
    g = torch.ones(1)
    dU, dscale, dX = cosine_ce.ce_backward(X32, U, y, s, lse, xn, g, None, 0.0, False, need_scale=False)
    assert dscale is None and dX is None and torch.isfinite(dU).all()
    dU2, dscale2, _ = cosine_ce.ce_backward(X32, U, y, s, lse, xn, g, None, 0.0, False, need_scale=True)
    assert torch.equal(dU, dU2) and torch.isfinite(dscale2)
