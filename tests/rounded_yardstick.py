"""A yardstick that rounds what the kernels round (tests/numerics.py, "rounded operands").

A kernel path in half precision rounds some intermediate values to the input dtype by
design: the tensor cores' operands (the normalised features, the basis, the gradient tiles)
and the tensors it saves for the backward. A float32 reference on the same inputs does not,
so against it such a path differs by about one half-precision rounding of those operands
(2^-9 relative in bfloat16), which is larger than a 1 % bug at tau = 100. This module
computes the head *as one kernel family computes it*: the same algebra (forward and
backward, written out, not autograd), each of the family's rounding sites applied to the
value it rounds, everything else in the compute dtype (float64 for the exact value, float32
for the yardstick's own error), so that the fast path can then be held to float32-level
floors with no operand allowance.

The rounding sites (``site(name, value)``) of the Triton head (demul_fast/kernels/):

* ``u_hat``   u^ (float32, saved) rounded to the dtype as the CE dot's operand (_cosines);
* ``v``       v = R t^ + c saved in T's dtype for the backward (the forward's |z|, cos and
              the backward's <v - c, dv |z|> use the unrounded float32 v);
* ``bg``      B G = g (softmax(s) - q) + B dL/dlogits stored in X's dtype (_ce_grad_kernel);
* ``x_hat``   x^ rounded as the dU dot's operand (_ce_du_kernel);
* ``dvz``     dv |z| = F - (cos/|z|) v rounded as the dT dot's operand (_text_bwd_kernel);

and the inputs themselves (T, X and R in T's dtype, which are exact here: the yardstick gets
them already rounded). Under the interpreter a float32 -> bfloat16 conversion truncates
(``mode="truncate"``); on a GPU it rounds to nearest.

Values near a rounding boundary. The kernel computes each site's value in float32, the
yardstick in float64: where the two lie on either side of a rounding boundary, the two
round one unit apart. ``site`` marks an element *ambiguous* when rounding (value -+ window)
gives two results, with ``window`` the float32 evaluation error of that value: for an
n-term sum, ``ERR(n) = 8 sqrt(n + 4) eps32`` x the sum of |terms| (rounding errors of
independent operations add like a random walk, sqrt(n) eps; the factor 8 is the margin;
the worst case n eps would mark most elements of a float16 gradient tile ambiguous and
multiply the reruns by ~10). Each site's window is written next to it. A kernel value
outside its window fails the check loudly (it cannot make a wrong kernel pass).
``flip_allowance`` reruns the yardstick once per ambiguous element with that element
rounded the other way and returns, per output element, the sum of |change|: the most those
roundings can move the result to first order (their interactions are second order, 2^-16
relative). It is added to the rule's floor for that check only.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Optional, Tuple

import torch

EPS = None  # set from demul_fast.common on first use
EPS32 = torch.finfo(torch.float32).eps
MAX_FLIPS = 20000  # a test whose inputs put more elements on a boundary is mis-sized
# on a GPU the reruns cost little: the GPU tests' primes shape (C=67, M=5, D=131, B=97, K=193)
# has 21,776 boundary elements in float16 on the CUDA family (counted on the CPU); their
# ImageNet-scale shape has 0.27 M (Triton, bf16) to 2.9 M (CUDA, fp16): beyond any cap
MAX_FLIPS_CUDA = 100000


class TooManyBoundaryElements(AssertionError):
    """A yardstick whose inputs put more operand elements on a rounding boundary than the
    cap: its boundary allowance would cost one rerun of the op per element. The check cannot
    be made at this shape (the GPU tests skip it, naming the counts)."""


def max_flips(device) -> int:
    """The cap on boundary elements for a yardstick computed on ``device``."""
    return MAX_FLIPS_CUDA if torch.device(device).type == "cuda" else MAX_FLIPS
CHUNK = 128  # boundary elements rerun at once (memory: that many copies of each tensor downstream)


def ERR(n: int) -> float:
    """Relative float32 evaluation error allowed for an n-term sum (module docstring)."""
    return 8 * (n + 4) ** 0.5 * EPS32


def _eps():
    global EPS
    if EPS is None:
        from demul_fast import common  # noqa: PLC0415
        EPS = float(common.EPS)
    return EPS


def round_to(z: torch.Tensor, dtype: torch.dtype, mode: str = "nearest") -> torch.Tensor:
    """z rounded to dtype as a float32 kernel value is (float32 first, then the conversion),
    returned in z's dtype. mode "truncate": the interpreter's float32 -> bfloat16."""
    if dtype == torch.float32:
        return z.float().to(z.dtype)
    z32 = z.float()
    if mode == "truncate" and dtype == torch.bfloat16:
        bits = z32.view(torch.int32) & -65536  # 0xFFFF0000: keep sign, exponent, 7 mantissa bits
        return bits.view(torch.float32).to(z.dtype)
    return z32.to(dtype).to(z.dtype)


class Sites:
    """The rounding of each site. The base run records, per site, the rounded value and the
    ambiguous elements with the other rounding of each; a flip run (``flip=name``) replaces
    that site's value by a batch [N, ...] of the base value with one ambiguous element
    rounded the other way per batch entry, and everything downstream runs batched."""

    def __init__(self, dtype: torch.dtype, mode: str, base: Optional["Sites"] = None, flip: Optional[str] = None,
                 chunk: slice = slice(None)):
        self.dtype, self.mode, self.base, self.flip, self.chunk = dtype, mode, base, flip, chunk
        self.ambiguous: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.scales: Dict[str, float] = {}

    def __call__(self, name: str, z: torch.Tensor, window: torch.Tensor, relative: bool = False) -> torch.Tensor:
        """z rounded; ``relative``: float16 values scaled by a power of two first (no subnormals)."""
        if self.dtype == torch.float32:
            return z
        if relative and self.dtype == torch.float16:
            up = self.base.scales[name] if self.base is not None else self.scales.setdefault(name, _storage_scale(z))
            return self(name, z * up, window * up) / up
        if self.base is not None and self.flip == name:
            rounded, idx, other = self.base.ambiguous[name]
            idx, other = idx[self.chunk], other[self.chunk]
            batch = rounded.flatten().repeat(len(idx), 1)
            batch[torch.arange(len(idx)), idx] = other
            return batch.view(len(idx), *rounded.shape)
        r = round_to(z, self.dtype, self.mode)
        if self.base is None:
            lo, hi = round_to(z - window, self.dtype, self.mode), round_to(z + window, self.dtype, self.mode)
            idx = (lo != hi).flatten().nonzero().flatten()
            other = torch.where(lo.flatten()[idx] == r.flatten()[idx], hi.flatten()[idx], lo.flatten()[idx])
            self.ambiguous[name] = (r, idx, other)
        return r


def _storage_scale(z: torch.Tensor) -> float:
    """csrc/sweep.cuh storage_scale: 2^(14 - e) for the largest |z| = f 2^e, f in [0.5, 1)
    (the tests' shapes have one 64 x 64 tile, whose maximum is the whole tensor's)."""
    m = float(z.abs().max()) if z.numel() else 0.0
    if not m > 0 or m == float("inf"):
        return 1.0
    import math  # noqa: PLC0415
    e = math.frexp(m)[1]
    return 2.0 ** min(max(14 - e, -100), 100)


def _ce_forward(x, u, y, tau: float, ls: float, eps: float):
    """The cosine cross-entropy's forward on the class features as the kernels' dot takes them
    (u: u^ rounded at its site in ``head``, U as given in ``cross_entropy``): |x|, 1/|x|, cos,
    the logits s, their logsumexp, the smoothed targets q and the per-image losses."""
    C = u.shape[-2]
    xn = torch.linalg.vector_norm(x, dim=-1)
    inv_x = 1 / xn.clamp_min(eps)
    cos = (x @ u.mT) * inv_x[..., None]
    s = tau * cos
    lse = torch.logsumexp(s, dim=-1)
    onehot = torch.nn.functional.one_hot(y, C).to(x.dtype)
    q = onehot * (1 - ls) + ls / C
    rows = lse - (1 - ls) * (s * onehot).sum(-1) - (ls / C) * s.sum(-1)
    return xn, inv_x, cos, s, lse, q, rows


def _ce_backward(family, x, u, xn, inv_x, cos, s, lse, q, tau: float, g: float, GL, sites: Sites):
    """The cosine cross-entropy's backward of one kernel family, for the values of
    ``_ce_forward`` on the class features u as the kernels' dot takes them (the head's u^
    rounded at its site; the standalone op's U as given; |u| = 1 up to the input's rounding,
    |x^||u| <= 1 + 2^-8), the cross-entropy's total cotangent g and the logits' cotangent GL
    ([B, C] in the logits' dtype, or None). Its sites: Triton ``bg``, ``x_hat``; CUDA
    ``tau_g``, ``tau_g_over_x``. Returns dX, dU (w.r.t. u), d tau."""
    B, D, C = x.shape[-2], x.shape[-1], u.shape[-2]
    p = torch.exp(s - lse[..., None])
    bg = g * (p - q)
    if GL is not None:
        bg = bg + B * GL.to(x.dtype)
    # B G: p = exp(s - lse): s = tau cos with cos a D-term sum (|x^||u^| <= 1, ERR(2 D) with
    # the norm), lse a C-term sum of such: p's relative error ERR(2 D) (2 tau) + ERR(C)
    win_bg = abs(g) * p * (2 * abs(tau) * ERR(2 * D) + ERR(C))
    if GL is not None:
        win_bg = win_bg + B * GL.to(x.dtype).abs() * ERR(1)
    win_bg = win_bg + ERR(1) * bg.abs()
    dscale = (bg * cos).sum((-2, -1)) / B
    x_hat = x * inv_x[..., None]
    if family == "triton":
        BG = sites("bg", bg, win_bg)                        # stored in X's dtype (_ce_grad_kernel)
        X_op = sites("x_hat", x_hat, ERR(D) * x_hat.abs())  # the dU dot's operand (_ce_du_kernel): a D-term norm,
        dU = (tau / B) * BG.mT @ X_op                       # then a quotient
        dx_hat = (tau / B) * BG @ u
    else:
        # csrc/cross_entropy.cu: the dX sweep rounds tau G as its tile operand; the dU pass
        # stores tau G / |x| (bfloat16: as bf16; float16: float32, rounded as the operand)
        # and multiplies it by x itself. float16 tiles are scaled by a power of two first
        # (exact: it only keeps small values out of the subnormals), hence ``relative``.
        G_x = sites("tau_g", (tau / B) * bg, (abs(tau) / B) * win_bg, relative=True)
        G_u = sites("tau_g_over_x", (tau / B) * bg * inv_x[..., None], (abs(tau) / B) * win_bg * inv_x[..., None],
                    relative=True)
        dU = G_u.mT @ x
        dx_hat = G_x @ u
    proj = torch.where(xn >= _eps(), (x_hat * dx_hat).sum(-1), torch.zeros_like(xn))
    dX = (dx_hat - x_hat * proj[..., None]) * inv_x[..., None]
    return dX, dU, dscale


def head(family: str, T, A, X, y, tau: float, basis, alpha: float, ls: float, cot, sites: Sites,
         cd: torch.dtype = torch.float64) -> Dict[str, torch.Tensor]:
    """The head of one kernel family (``"triton"``: triton_ops.demul_head and its backward;
    ``"cuda"``: cuda_ops.demul_head on csrc/) in compute dtype ``cd`` with the family's
    roundings (module docstring). basis: DistillBasis as the op gets it (float32) or None.
    cot = (g_loss, g_ce, g_dist, G_logits [B, C] or None): the cotangents autograd hands the
    op (G_logits already in the logits' dtype). Returns the outputs and gradients in ``cd``."""
    eps = _eps()
    g_loss, g_ce, g_dist, GL = cot
    t, x, a = T.to(cd), X.to(cd), A.to(cd)
    C, M, D = t.shape
    # written for a leading batch of flips (Sites): reductions over named trailing dims only
    n = torch.linalg.vector_norm(t, dim=-1)                      # [C, M]
    inv_n = 1 / n.clamp_min(eps)
    w = torch.softmax(a, dim=-1)
    u = (t * (w * inv_n)[..., None]).sum(-2)                     # [C, D]
    r = torch.linalg.vector_norm(u, dim=-1)
    inv_r = 1 / r.clamp_min(eps)
    u_hat = u * inv_r[..., None]
    # u^ in float32: u sums M terms w t/n, |u| sums D squares: ERR(M + D) x (the terms' sum / |u| + |u^|)
    terms_u = (t.abs() * (w * inv_n)[..., None]).sum(-2) * inv_r[..., None]
    U_op = sites("u_hat", u_hat, ERR(M + D) * (terms_u + u_hat.abs()))
    xn, inv_x, cos, s, lse, q, rows = _ce_forward(x, U_op, y, tau, ls, eps)
    ce = rows.mean(-1)
    dist_on = basis is not None
    if dist_on:
        R32, c32, F32, delta32, beta32 = (b.detach().float() for b in basis)
        R_h = R32.to(sites.dtype).to(cd)  # the kernels' operand: R in T's dtype (float32: none)
        c, F, delta, beta = c32.to(cd), F32.to(cd), delta32.to(cd), beta32.to(cd)
        acc = torch.einsum("cmd,kd->cmk", t, R_h)
        v = acc * inv_n[..., None] + c
        # v (triton) or p = v - c (cuda): a D-term dot over |t| (a D-term norm): ERR(2 D) x its terms
        terms_p = torch.einsum("cmd,kd->cmk", t.abs(), R_h.abs()) * inv_n[..., None]
        if family == "triton":   # v saved in T's dtype
            v_h = sites("v", v, ERR(2 * D) * (terms_p + c.abs()))
            p_h = v_h - c
        else:                    # p = R t^ saved in T's dtype (csrc/distill.cu)
            p_h = sites("p", acc * inv_n[..., None], ERR(2 * D) * terms_p)
            v_h = p_h + c
        zn = torch.sqrt((v * v).sum(-1) + beta)
        cos_d = ((v * F[:, None, :]).sum(-1) + delta[:, None]) / zn.clamp_min(eps)
        dist = (1 - cos_d).mean((-2, -1))
    else:
        dist = torch.zeros((), dtype=cd)
    loss = ce + alpha * dist
    out = dict(loss=loss, ce_loss=ce, distill_loss=dist, logits=s)

    # ---- backward
    g_ce_tot = float(g_loss) + float(g_ce)
    g_dist_tot = alpha * float(g_loss) + float(g_dist)
    dX, dU, dscale = _ce_backward(family, x, U_op, xn, inv_x, cos, s, lse, q, tau, g_ce_tot, GL, sites)
    # text backward: u^ and dL/du^ in float32 (no rounding)
    a_tg = torch.einsum("...cmd,...cd->...cm", t, dU)
    a_ut = torch.einsum("...cmd,...cd->...cm", t, u_hat)
    a_ug = (u_hat * dU).sum(-1)
    proj_u = torch.where(r >= eps, a_ug, torch.zeros_like(a_ug))
    dw = (a_tg - proj_u[..., None] * a_ut) * inv_r[..., None] * inv_n
    dA = w * (dw - (w * dw).sum(-1, keepdim=True))
    proj_t = w * dw
    du = (dU - u_hat * proj_u[..., None]) * inv_r[..., None]
    dt_hat = w[..., None] * du[..., None, :]
    if dist_on:
        cos_z = torch.where(zn >= eps, cos_d, torch.zeros_like(cos_d))
        inv_z = 1 / zn.clamp_min(eps)
        g = -g_dist_tot / (C * M)
        dvz = F[:, None, :] - (cos_z * inv_z)[..., None] * v_h
        if family == "triton":  # <v - c, dv|z|> from the forward's unrounded v (_distill_finish's PV)
            proj_v = ((v - c) * (F[:, None, :] - (cos_z * inv_z)[..., None] * v)).sum(-1)
        else:
            proj_v = (p_h * dvz).sum(-1)
        # dv|z|: F minus cos/|z| (r-term sums of v F and |v|^2 over a v with ERR(2 D)) times v:
        # ERR(2 D + r) x (|F| + 2 |cos/|z|| |v|)
        rank = R_h.shape[0]
        win = ERR(2 * D + rank) * (F[:, None, :].abs() + 2 * (cos_z * inv_z).abs()[..., None] * v_h.abs())
        dvz_op = sites("dvz", dvz, win)  # |dv|z|| <= 2: no scaling in either family
        acc_b = torch.einsum("...cmk,kd->...cmd", dvz_op, R_h)
        dt_hat = dt_hat + (g * inv_z)[..., None] * acc_b
        proj_t = proj_t + g * inv_z * proj_v
    proj_t = torch.where(n >= eps, proj_t, torch.zeros_like(proj_t))
    dT = (dt_hat - (t * inv_n[..., None]) * proj_t[..., None]) * inv_n[..., None]
    out.update(text_features=dT, prompt_logits=dA, image_features=dX, scale=dscale)
    return out




def cross_entropy(family: str, X, U, y, tau: float, ls: float, g: float, sites: Sites,
                  cd: torch.dtype = torch.float64) -> Dict[str, torch.Tensor]:
    """The standalone cosine cross-entropy (ops ``cosine_cross_entropy``: class features U
    used as given, no normalisation) of one kernel family in compute dtype ``cd``, with the
    family's roundings; g: the loss's cotangent. Its sites are the head's cross-entropy
    sites (``head``) except u^: U is an input, already in the dtype, so the forward's dot
    takes both operands as given (x itself, then times 1/|x|) and rounds nothing. Returns
    ce_loss and the gradients image_features (dX), class_features (dU), scale (d tau)."""
    eps = _eps()
    x, u = X.to(cd), U.to(cd)
    xn, inv_x, cos, s, lse, q, rows = _ce_forward(x, u, y, tau, ls, eps)
    out = dict(ce_loss=rows.mean(-1))
    dX, dU, dscale = _ce_backward(family, x, u, xn, inv_x, cos, s, lse, q, tau, g, None, sites)
    out.update(image_features=dX, class_features=dU, scale=dscale)
    return out


def aggregate(family: str, T, A, cot, sites: Sites, cd: torch.dtype = torch.float64) -> Dict[str, torch.Tensor]:
    """The standalone aggregation (ops ``aggregate_prompts``) of one kernel family: forward in
    float32 (no dot: a weighted sum and norms), output u^ stored in T's dtype; cot: the
    cotangent of u^ as autograd hands it (in u^'s dtype). Its one site: the Triton op saves
    its output, u^ in T's dtype, and its backward (text_backward, agg) reads that rounded u^
    back for <u^, t>, <u^, du^> and the projection (the head saves u^ in float32: no site
    there); csrc/ keeps u^ in float32 (u32) for the backward: no site. Returns
    class_features (u^) and the gradients text_features (dT), prompt_logits (dA)."""
    eps = _eps()
    t, a = T.to(cd), A.to(cd)
    C, M, D = t.shape
    n = torch.linalg.vector_norm(t, dim=-1)
    inv_n = 1 / n.clamp_min(eps)
    w = torch.softmax(a, dim=-1)
    u = (t * (w * inv_n)[..., None]).sum(-2)
    r = torch.linalg.vector_norm(u, dim=-1)
    inv_r = 1 / r.clamp_min(eps)
    u_hat = u * inv_r[..., None]
    out = dict(class_features=u_hat)
    if family == "triton":
        # u^ in float32 as in ``head``: ERR(M + D) x (the terms' sum / |u| + |u^|)
        terms_u = (t.abs() * (w * inv_n)[..., None]).sum(-2) * inv_r[..., None]
        U_b = sites("u_hat", u_hat, ERR(M + D) * (terms_u + u_hat.abs()))
    else:
        U_b = u_hat
    dU = cot.to(cd)
    a_tg = torch.einsum("...cmd,...cd->...cm", t, dU)
    a_ut = torch.einsum("...cmd,...cd->...cm", t, U_b)
    a_ug = (U_b * dU).sum(-1)
    proj_u = torch.where(r >= eps, a_ug, torch.zeros_like(a_ug))
    dw = (a_tg - proj_u[..., None] * a_ut) * inv_r[..., None] * inv_n
    dA = w * (dw - (w * dw).sum(-1, keepdim=True))
    du = (dU - U_b * proj_u[..., None]) * inv_r[..., None]
    proj_t = torch.where(n >= eps, w * dw, torch.zeros_like(dw))
    dT = (w[..., None] * du[..., None, :] - (t * inv_n[..., None]) * proj_t[..., None]) * inv_n[..., None]
    out.update(text_features=dT, prompt_logits=dA)
    return out


def distillation(family: str, T, basis, g: float, sites: Sites, cd: torch.dtype = torch.float64):
    """The standalone distillation (ops ``prompt_distill_loss``) of one kernel family: the
    head's distillation part (``head`` with the cross-entropy's cotangents zero; the kernels
    are the same: triton text_forward/text_backward with dist=True, csrc/distill.cu), its
    sites v or p and dvz. g: the loss's cotangent. Returns distill_loss and text_features."""
    C, M, D = T.shape
    A = torch.zeros(C, M, dtype=torch.float64, device=T.device)
    X = torch.ones(1, D, dtype=torch.float64, device=T.device)
    y = torch.zeros(1, dtype=torch.long, device=T.device)
    out = head(family, T, A, X, y, 1.0, basis, 1.0, 0.0, (0.0, 0.0, g, None), sites, cd)
    return dict(distill_loss=out["distill_loss"], text_features=out["text_features"])


def yardstick(family: str, dtype: torch.dtype, mode: str, *args, op=None, **kwargs):
    """(exact, plain, allowance, ambiguous counts): the family's head (or ``op``:
    ``cross_entropy``, ``distillation``) in float64 and in float32 with its roundings, and
    per output the boundary allowance (module docstring): one batched rerun per site, each
    ambiguous element rounded the other way."""
    def fn(*a, **k):
        return (op or head)(family, *a, **k)
    started = time.perf_counter()
    base = Sites(dtype, mode)
    exact = fn(*args, sites=base, cd=torch.float64, **kwargs)
    plain = fn(*args, sites=Sites(dtype, mode), cd=torch.float32, **kwargs)
    evaluated = time.perf_counter()
    allowance = {k: torch.zeros_like(v) for k, v in exact.items()}
    counts = {name: len(amb[1]) for name, amb in base.ambiguous.items()}
    cap = max_flips(next(iter(exact.values())).device)
    if sum(counts.values()) > cap:
        raise TooManyBoundaryElements(f"{counts} operand elements lie on a rounding boundary (> {cap} in all)")
    for name, count in counts.items():
        for start in range(0, count, CHUNK):
            sites = Sites(dtype, mode, base, name, slice(start, start + CHUNK))
            other = fn(*args, sites=sites, cd=torch.float64, **kwargs)
            for k in allowance:
                allowance[k] = allowance[k] + (other[k] - exact[k]).abs().reshape(-1, *exact[k].shape).sum(0)
    _record(evaluated - started, time.perf_counter() - evaluated)
    return exact, plain, allowance, counts


# Seconds spent in ``yardstick`` per test (pytest's PYTEST_CURRENT_TEST): [calls, the float64 and
# float32 evaluations, the boundary reruns]. The two evaluations are what the former yardstick (the
# reference in float64 and in float32) also paid; the reruns are this yardstick's own cost. With
# DEMUL_FAST_YARDSTICK_TIMES=FILE, tests/conftest.py writes them to FILE at the end of the run.
TIMES: Dict[str, list] = {}


def _record(evaluations: float, reruns: float) -> None:
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    row = TIMES.setdefault(test, [0, 0.0, 0.0])
    row[0] += 1
    row[1] += evaluations
    row[2] += reruns


def _memoised(memo: Optional[dict], compute):
    """compute() once per ``memo`` (a dict the caller keeps while the yardstick's arguments
    stay the same, e.g. across the mutations of one result); None: every call computes."""
    if memo is None:
        return compute()
    if "yardstick" not in memo:
        memo["yardstick"] = compute()
    return memo["yardstick"]


def check_op(name: str, op, family: str, dtype: torch.dtype, mode: str, fast: Dict[str, torch.Tensor], args: tuple,
             magnitudes: Dict[str, object], stored_ulps: float = 0.5, memo: Optional[dict] = None) -> None:
    """``check_head`` for a standalone op's yardstick (``cross_entropy``, ``distillation``):
    args are its arguments after ``family``, without ``sites`` and ``cd``."""
    from numerics import assert_error_rule  # noqa: PLC0415

    exact, plain, allowance, counts = _memoised(memo, lambda: yardstick(family, dtype, mode, *args, op=op))
    print(f"{name}: rounded yardstick ({op.__name__}, {family}, {dtype}, {mode}); elements on a rounding boundary: "
          f"{counts}")
    for key, f in fast.items():
        grad = key in ("text_features", "prompt_logits", "image_features", "class_features", "scale")
        assert_error_rule(f"{name} {key}", f, exact[key].to(f.device), plain[key].to(f.device), k=3.0 if grad else 2.0,
                          dtype=dtype, magnitude=magnitudes.get(key), stored_ulps=stored_ulps,
                          extra=allowance[key].to(f.device))


def check_head(name: str, family: str, dtype: torch.dtype, mode: str, fast: Dict[str, torch.Tensor], T, A, X, y,
               tau: float, basis, alpha: float, ls: float, cot, magnitudes: Dict[str, object],
               stored_ulps: float = 0.5, memo: Optional[dict] = None) -> None:
    """The error rule (tests/numerics.py; k = 2 outputs, 3 gradients) for every entry of
    ``fast`` (keys as ``head`` returns them: loss, ce_loss, distill_loss, logits,
    text_features, prompt_logits, image_features, scale) against this yardstick: float32
    floors on ``magnitudes`` (same keys), no operand allowance, plus the boundary allowance.
    ``memo``: see ``_memoised`` (the yardstick depends on the inputs only, not on ``fast``)."""
    from numerics import assert_error_rule  # noqa: PLC0415

    exact, plain, allowance, counts = _memoised(
        memo, lambda: yardstick(family, dtype, mode, T, A, X, y, float(tau), basis, alpha, ls, cot))
    print(f"{name}: rounded yardstick ({family}, {dtype}, {mode}); elements on a rounding boundary: {counts}")
    for key, f in fast.items():
        grad = key in ("text_features", "prompt_logits", "image_features", "scale")
        assert_error_rule(f"{name} {key}", f, exact[key].to(f.device), plain[key].to(f.device), k=3.0 if grad else 2.0,
                          dtype=dtype, magnitude=magnitudes.get(key), stored_ulps=stored_ulps,
                          extra=allowance[key].to(f.device))
