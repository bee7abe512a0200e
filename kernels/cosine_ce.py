"""Cosine logits + label-smoothed cross-entropy without storing the [B, C] logits.

SPEC.md sections 4, 4.1, 4.2. x^ = x / max(|x|, eps), s = tau <x^, u> for class features
u [C, D] used as given, L_ce = (1/B) sum_b (lse_b - (1 - ls) s[b, y_b] - (ls/C) sum_c s[b, c]).

* forward: one program per BLOCK_B images sweeps the classes in BLOCK_C tiles with an
  online log-sum-exp; it stores lse [B] and the per-image loss [B] (logits only on request);
* backward, a second sweep that recomputes each tile's logits:
  G = g_ce/B (softmax(s) - q) (+ an incoming logits gradient; 1/B applied after the dots),
  dU = tau G^T x^ (one program per class tile, sweeping B; it also sums G * s/tau for
  d tau), dX = nb(x^, tau G U, |x|) (one program per image tile, sweeping C).
A label outside [0, C) is never used as an address: it only fails to match a class.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from demul_fast import common

from . import _common

EPS = tl.constexpr(common.EPS)  # the norm floor, defined once in demul_fast.common


@triton.jit
def _dot(a, b, EMULATE: tl.constexpr, DTYPE: tl.constexpr):
    """a @ b in fp32 with operands in DTYPE (float32: IEEE, no TF32). EMULATE (interpreter):
    operands rounded to DTYPE, multiplied in fp32 (see _common.emulate_dot)."""
    if EMULATE:
        return tl.dot(a.to(DTYPE).to(tl.float32), b.to(DTYPE).to(tl.float32), input_precision="ieee")
    elif DTYPE == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DTYPE), b.to(DTYPE))


@triton.jit
def _load_rows_normalized(X, offs, N, D, BLOCK_D: tl.constexpr):
    """x^ [len(offs), BLOCK_D] fp32 and |x| of the rows ``offs`` of X [N, D]."""
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(X + offs[:, None] * D + offs_d[None, :],
                mask=(offs[:, None] < N) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    xn = tl.sqrt(tl.sum(x * x, axis=1))
    return x / tl.maximum(xn, EPS)[:, None], xn


@triton.jit
def _load_rows(U, offs, N, D, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(U + offs[:, None] * D + offs_d[None, :],
                   mask=(offs[:, None] < N) & (offs_d[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def _grad_logits(cos, tau, lse, y, offs_b, offs_c, GL, g, ls, B, C, HAS_GL: tl.constexpr):
    """B G = g (softmax(s) - q) [+ B GL tile], zero outside [B, C]: the 1/B is applied after
    the dots that consume it (in float16, G itself would be mostly subnormal)."""
    ok = (offs_b[:, None] < B) & (offs_c[None, :] < C)
    p = tl.exp(tau * cos - lse[:, None])
    q = tl.where(offs_c[None, :] == y[:, None], 1.0 - ls, 0.0) + ls / C
    G = g * (p - q)
    if HAS_GL:
        G += B * tl.load(GL + offs_b[:, None] * C + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, G, 0.0)


@triton.jit
def _ce_fwd_kernel(
    X, U, Y, SCALE,            # X [B, D], U [C, D], Y [B] int, SCALE [1]
    LSE, LOSS, LOGITS,         # LSE [B] fp32, LOSS [B] fp32 (per image), LOGITS [B, C]
    B, C, D, ls,
    STORE_LOGITS: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    x_hat, _ = _load_rows_normalized(X, offs_b, B, D, BLOCK_D)
    y = tl.load(Y + offs_b, mask=b_ok, other=-1).to(tl.int32)
    tau = tl.load(SCALE).to(tl.float32)
    m_i = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    target = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        u = _load_rows(U, offs_c, C, D, BLOCK_D)
        s = tau * _dot(x_hat, tl.trans(u), EMULATE, X.dtype.element_ty)
        s_m = tl.where(c_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_m, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_m - m_new[:, None]), axis=1)
        m_i = m_new
        target += tl.sum(tl.where(offs_c[None, :] == y[:, None], s, 0.0), axis=1)
        s_sum += tl.sum(tl.where(c_ok[None, :], s, 0.0), axis=1)
        if STORE_LOGITS:
            tl.store(LOGITS + offs_b[:, None] * C + offs_c[None, :], s.to(LOGITS.dtype.element_ty),
                     mask=b_ok[:, None] & c_ok[None, :])
    lse = m_i + tl.log(l_i)
    loss = lse - (1.0 - ls) * target - (ls / C) * s_sum
    tl.store(LSE + offs_b, lse, mask=b_ok)
    tl.store(LOSS + offs_b, loss, mask=b_ok)


@triton.jit
def _ce_bwd_du_kernel(
    X, U, Y, SCALE, LSE, GRAD, GL,   # GRAD [1] fp32 = dL/dL_ce; GL [B, C] logits grad
    DU, DSCALE,                      # DU [C, D], DSCALE [num programs] fp32 partial sums
    B, C, D, ls,
    HAS_GL: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    u = _load_rows(U, offs_c, C, D, BLOCK_D)
    tau = tl.load(SCALE).to(tl.float32)
    g = tl.load(GRAD).to(tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_C], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        x_hat, _ = _load_rows_normalized(X, offs_b, B, D, BLOCK_D)
        y = tl.load(Y + offs_b, mask=offs_b < B, other=-1).to(tl.int32)
        lse = tl.load(LSE + offs_b, mask=offs_b < B, other=0.0)
        cos = _dot(x_hat, tl.trans(u), EMULATE, X.dtype.element_ty)
        G = _grad_logits(cos, tau, lse, y, offs_b, offs_c, GL, g, ls, B, C, HAS_GL)
        acc += _dot(tl.trans(G), x_hat, EMULATE, X.dtype.element_ty)
        dscale += tl.sum(G * cos, axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(DU + offs_c[:, None] * D + offs_d[None, :], ((tau / B) * acc).to(DU.dtype.element_ty),
             mask=(offs_c[:, None] < C) & (offs_d[None, :] < D))
    tl.store(DSCALE + pid, tl.sum(dscale, axis=0) / B)


@triton.jit
def _ce_bwd_dx_kernel(
    X, U, Y, SCALE, LSE, GRAD, GL,
    DX,                              # DX [B, D]
    B, C, D, ls,
    HAS_GL: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    x_hat, xn = _load_rows_normalized(X, offs_b, B, D, BLOCK_D)
    y = tl.load(Y + offs_b, mask=offs_b < B, other=-1).to(tl.int32)
    lse = tl.load(LSE + offs_b, mask=offs_b < B, other=0.0)
    tau = tl.load(SCALE).to(tl.float32)
    g = tl.load(GRAD).to(tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        u = _load_rows(U, offs_c, C, D, BLOCK_D)
        cos = _dot(x_hat, tl.trans(u), EMULATE, X.dtype.element_ty)
        G = _grad_logits(cos, tau, lse, y, offs_b, offs_c, GL, g, ls, B, C, HAS_GL)
        acc += _dot(G, u, EMULATE, X.dtype.element_ty)
    dx_hat = (tau / B) * acc
    proj = tl.where(xn >= EPS, tl.sum(x_hat * dx_hat, axis=1), 0.0)
    dx = (dx_hat - x_hat * proj[:, None]) / tl.maximum(xn, EPS)[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(DX + offs_b[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty),
             mask=(offs_b[:, None] < B) & (offs_d[None, :] < D))


def _meta(D, dtype, device):
    bd = _common.block_d(D)
    rows = _common.tile_rows(bd)
    _common.check_fits("ce", dtype, rows, bd, device)
    return dict(BLOCK_B=rows, BLOCK_C=rows, BLOCK_D=bd, num_warps=_common.num_warps(rows * bd))


def check_shape(D, dtype, device) -> None:
    """Raise ValueError if feature dimension D in ``dtype`` is beyond these kernels' tiles."""
    _meta(D, dtype, device)


def ce_forward(X, U, y, scale, ls: float, return_logits: bool):
    """X [B, D], U [C, D] (same dtype), y [B] int, scale [1] fp32, all contiguous.
    Returns (per-image loss [B] fp32, lse [B] fp32, logits [B, C] in X.dtype or None)."""
    B, D = X.shape
    C = U.shape[0]
    meta = _meta(D, X.dtype, X.device)
    dev = X.device
    lse = _common.new_output((B,), torch.float32, dev)
    loss = _common.new_output((B,), torch.float32, dev)
    logits = _common.new_output((B, C), X.dtype, dev) if return_logits else None
    _ce_fwd_kernel[(triton.cdiv(B, meta["BLOCK_B"]),)](
        X, U, y, scale, lse, loss, logits if return_logits else lse, B, C, D, _common.fp32_scalar(ls),
        STORE_LOGITS=return_logits, EMULATE=_common.emulate_dot(X.dtype), **meta)
    return loss, lse, logits


def ce_backward(X, U, y, scale, lse, grad, grad_logits, ls: float, need_dx: bool, du_dtype=None):
    """grad [1] fp32 = dL/dL_ce; grad_logits [B, C] contiguous or None.
    Returns (dU [C, D] in du_dtype (default U.dtype), d scale [] fp32, dX [B, D] or None)."""
    B, D = X.shape
    C = U.shape[0]
    meta = _meta(D, X.dtype, X.device)
    dev = X.device
    has_gl = grad_logits is not None
    gl = grad_logits if has_gl else lse
    emulate = _common.emulate_dot(X.dtype)
    n_c = triton.cdiv(C, meta["BLOCK_C"])
    dU = _common.new_output((C, D), du_dtype or U.dtype, dev)
    dscale = _common.new_output((n_c,), torch.float32, dev)
    _ce_bwd_du_kernel[(n_c,)](X, U, y, scale, lse, grad, gl, dU, dscale, B, C, D, _common.fp32_scalar(ls),
                              HAS_GL=has_gl, EMULATE=emulate, **meta)
    dX = None
    if need_dx:
        dX = _common.new_output((B, D), X.dtype, dev)
        _ce_bwd_dx_kernel[(triton.cdiv(B, meta["BLOCK_B"]),)](
            X, U, y, scale, lse, grad, gl, dX, B, C, D, _common.fp32_scalar(ls), HAS_GL=has_gl, EMULATE=emulate, **meta)
    return dU, dscale.sum(), dX
