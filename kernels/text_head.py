"""Fused text-side kernels of the DeMul head: prompt aggregation and distillation.

SPEC.md sections 4, 4.1, 4.2. One program owns BLOCK_CLS whole classes, i.e. the rows
(c, m) of T [C, M, D] of those classes, as a [BLOCK_CLS, BLOCK_M, BLOCK_D] register tile
(all of D, all of M). From that single read of T it does both jobs:

* aggregation: t^ = t / max(|t|, eps), w = softmax_m(A), u = sum_m w t^, u^ = u / max(|u|, eps);
* distillation: z = t^ W^T + b as a GEMM over K tiles (tile [BLOCK_CLS*BLOCK_M, BLOCK_K]),
  epilogue per row: |z|^2, <z, e>, |e|^2 -> cos = <z, e> / (max(|z|, eps) max(|e|, eps)).
  z is never stored.

The backward kernel reads T once more and produces dT and dA: it recomputes t^, w, u^
(registers only), du from the class-feature gradient, and the distillation term W^T dz by
recomputing z tile by tile (dz of a row needs only that row's saved |z|, cos, |e|).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from demul_fast import common

from . import _common

EPS = tl.constexpr(common.EPS)  # the norm floor, defined once in demul_fast.common


@triton.jit
def _load_text_tile(T, pid, C, M, D, BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """t^ [BLOCK_CLS, BLOCK_M, BLOCK_D] (fp32, zero outside the tensor) and n = |t| [BLOCK_CLS, BLOCK_M]."""
    offs_c = pid * BLOCK_CLS + tl.arange(0, BLOCK_CLS)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (offs_c[:, None] < C) & (offs_m[None, :] < M)
    ptrs = T + (offs_c[:, None, None] * M + offs_m[None, :, None]) * D + offs_d[None, None, :]
    t = tl.load(ptrs, mask=row_ok[:, :, None] & (offs_d[None, None, :] < D), other=0.0).to(tl.float32)
    n = tl.sqrt(tl.sum(t * t, axis=2))
    return t / tl.maximum(n, EPS)[:, :, None], n


@triton.jit
def _prompt_weights(A, pid, C, M, BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr):
    """w = softmax_m(A[c, :]) [BLOCK_CLS, BLOCK_M], zero for m >= M."""
    offs_c = pid * BLOCK_CLS + tl.arange(0, BLOCK_CLS)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = (offs_c[:, None] < C) & (offs_m[None, :] < M)
    a = tl.load(A + offs_c[:, None] * M + offs_m[None, :], mask=row_ok, other=float("-inf")).to(tl.float32)
    a_max = tl.max(a, axis=1)
    # classes past C are all masked; a real class whose logits are all -inf gets NaN, as in the reference
    a_max = tl.where(offs_c < C, a_max, 0.0)
    ex = tl.exp(a - a_max[:, None])
    den = tl.sum(ex, axis=1)
    return ex / tl.where(den == 0.0, 1.0, den)[:, None]


@triton.jit
def _flat_rows(pid, C, M, BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """The program's tile flattened to BLOCK_R = BLOCK_CLS * BLOCK_M rows (c, m): returns the
    class row_c, the prompt row_m and row_ok (inside [C, M]), each [BLOCK_R]."""
    offs_r = tl.arange(0, BLOCK_R)
    row_c = pid * BLOCK_CLS + offs_r // BLOCK_M
    row_m = offs_r % BLOCK_M
    return row_c, row_m, (row_c < C) & (row_m < M)


@triton.jit
def _dot(a, b, LOWP: tl.constexpr, DTYPE: tl.constexpr):
    """a @ b accumulated in fp32; operands in DTYPE (the input's half type) when LOWP,
    else fp32 with IEEE precision (TF32 would break the error rule)."""
    if LOWP:
        return tl.dot(a.to(DTYPE), b.to(DTYPE))
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _project_tile(t2, W, Bias, k0, K, D, HAS_BIAS: tl.constexpr, LOWP: tl.constexpr, DOT_T: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """z[:, k0:k0+BLOCK_K] = t2 W[k0:k0+BLOCK_K]^T + b (fp32, zero past K) and the W tile."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    w_tile = tl.load(W + offs_k[:, None] * D + offs_d[None, :],
                     mask=(offs_k[:, None] < K) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    z = _dot(t2, tl.trans(w_tile), LOWP, DOT_T)
    if HAS_BIAS:
        z += tl.load(Bias + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
    return z, w_tile


@triton.jit
def _text_fwd_kernel(
    T, A, W, Bias, E,              # T [C, M, D], A [C, M], W [K, D], Bias [K], E [C, K]
    U, ZN, COS, EN,                # U [C, D] (u^), ZN/COS/EN [C*M] fp32: |z|, cos, |e| per row
    C, M, D, K,
    AGG: tl.constexpr, DIST: tl.constexpr, HAS_BIAS: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Forward of SPEC 4 for the text side, one read of T: u^ (if AGG) and per-row
    |z|, cos(z, e), |e| (if DIST)."""
    pid = tl.program_id(0)
    t_hat, n = _load_text_tile(T, pid, C, M, D, BLOCK_CLS, BLOCK_M, BLOCK_D)
    if AGG:
        w = _prompt_weights(A, pid, C, M, BLOCK_CLS, BLOCK_M)
        u = tl.sum(w[:, :, None] * t_hat, axis=1)
        r = tl.sqrt(tl.sum(u * u, axis=1))
        u_hat = u / tl.maximum(r, EPS)[:, None]
        offs_c = pid * BLOCK_CLS + tl.arange(0, BLOCK_CLS)
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(U + offs_c[:, None] * D + offs_d[None, :], u_hat.to(U.dtype.element_ty),
                 mask=(offs_c[:, None] < C) & (offs_d[None, :] < D))
    if DIST:
        t2 = tl.reshape(t_hat, [BLOCK_R, BLOCK_D])
        row_c, row_m, row_ok = _flat_rows(pid, C, M, BLOCK_CLS, BLOCK_M, BLOCK_R)
        zz = tl.zeros([BLOCK_R], dtype=tl.float32)
        ze = tl.zeros([BLOCK_R], dtype=tl.float32)
        ee = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            z, w_tile = _project_tile(t2, W, Bias, k0, K, D, HAS_BIAS, LOWP, T.dtype.element_ty, BLOCK_K, BLOCK_D)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            e = tl.load(E + row_c[:, None] * K + offs_k[None, :],
                        mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
            zz += tl.sum(z * z, axis=1)
            ze += tl.sum(z * e, axis=1)
            ee += tl.sum(e * e, axis=1)
        zn = tl.sqrt(zz)
        en = tl.sqrt(ee)
        cos = ze / (tl.maximum(zn, EPS) * tl.maximum(en, EPS))
        row = row_c * M + row_m
        tl.store(ZN + row, zn, mask=row_ok)
        tl.store(COS + row, cos, mask=row_ok)
        tl.store(EN + row, en, mask=row_ok)


@triton.jit
def _text_bwd_kernel(
    T, A, W, Bias, E, ZN, COS, EN,  # inputs as in the forward, plus its saved per-row stats
    GU,                             # GU [C, D]: dL/du^ (fp32 or any float dtype)
    GDIST,                          # GDIST [1] fp32: dL/dL_dist (already times alpha)
    DT, DA,                         # DT [C, M, D], DA [C, M]
    C, M, D, K, inv_cm,
    AGG: tl.constexpr, DIST: tl.constexpr, HAS_BIAS: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Backward of SPEC 4.1 for the text side, one read of T:
    du = nb(u^, GU, |u|), dw = <du, t^>, dA = w (dw - <w, dw>),
    dz = -(GDIST/(C M)) (e^ - cos z/|z|)/|z|, dt^ = w du + W^T dz, dT = nb(t^, dt^, |t|)."""
    pid = tl.program_id(0)
    t_hat, n = _load_text_tile(T, pid, C, M, D, BLOCK_CLS, BLOCK_M, BLOCK_D)
    offs_c = pid * BLOCK_CLS + tl.arange(0, BLOCK_CLS)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok2 = (offs_c[:, None] < C) & (offs_m[None, :] < M)
    dt_hat = tl.zeros([BLOCK_CLS, BLOCK_M, BLOCK_D], dtype=tl.float32)
    if AGG:
        w = _prompt_weights(A, pid, C, M, BLOCK_CLS, BLOCK_M)
        u = tl.sum(w[:, :, None] * t_hat, axis=1)
        r = tl.sqrt(tl.sum(u * u, axis=1))
        u_hat = u / tl.maximum(r, EPS)[:, None]
        gu = tl.load(GU + offs_c[:, None] * D + offs_d[None, :],
                     mask=(offs_c[:, None] < C) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        # normalize backward; below the floor the divisor is the constant eps (SPEC 4.1)
        proj = tl.where(r >= EPS, tl.sum(u_hat * gu, axis=1), 0.0)
        du = (gu - u_hat * proj[:, None]) / tl.maximum(r, EPS)[:, None]
        dw = tl.sum(du[:, None, :] * t_hat, axis=2)
        da = w * (dw - tl.sum(w * dw, axis=1)[:, None])
        tl.store(DA + offs_c[:, None] * M + offs_m[None, :], da.to(DA.dtype.element_ty), mask=row_ok2)
        dt_hat += w[:, :, None] * du[:, None, :]
    if DIST:
        t2 = tl.reshape(t_hat, [BLOCK_R, BLOCK_D])
        row_c, row_m, row_ok = _flat_rows(pid, C, M, BLOCK_CLS, BLOCK_M, BLOCK_R)
        row = row_c * M + row_m
        zn = tl.load(ZN + row, mask=row_ok, other=1.0)
        cos = tl.load(COS + row, mask=row_ok, other=0.0)
        en = tl.load(EN + row, mask=row_ok, other=1.0)
        coef = -tl.load(GDIST).to(tl.float32) * inv_cm
        zden = tl.maximum(zn, EPS)
        cos_p = tl.where(zn >= EPS, cos, 0.0)
        # dz = coef * (a_e e + a_z z): coef (~1/(C M)) is applied after the K sweep, so that
        # half-precision dot operands stay far from float16's subnormal range
        a_e = 1.0 / (tl.maximum(en, EPS) * zden)
        a_z = -cos_p / (zden * zden)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            z, w_tile = _project_tile(t2, W, Bias, k0, K, D, HAS_BIAS, LOWP, T.dtype.element_ty, BLOCK_K, BLOCK_D)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            e = tl.load(E + row_c[:, None] * K + offs_k[None, :],
                        mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
            dz = a_e[:, None] * e + a_z[:, None] * z
            dz = tl.where((offs_k[None, :] < K) & row_ok[:, None], dz, 0.0)
            acc += _dot(dz, w_tile, LOWP, T.dtype.element_ty)
        dt_hat += coef * tl.reshape(acc, [BLOCK_CLS, BLOCK_M, BLOCK_D])
    proj_t = tl.where(n >= EPS, tl.sum(t_hat * dt_hat, axis=2), 0.0)
    dt = (dt_hat - t_hat * proj_t[:, :, None]) / tl.maximum(n, EPS)[:, :, None]
    ptrs = DT + (offs_c[:, None, None] * M + offs_m[None, :, None]) * D + offs_d[None, None, :]
    tl.store(ptrs, dt.to(DT.dtype.element_ty), mask=row_ok2[:, :, None] & (offs_d[None, None, :] < D))


def _blocks(C, M, D, K, dtype, device):
    bd = _common.block_d(D)
    bm = triton.next_power_of_2(M)
    bcls = max(1, 16 // bm)  # rows per program >= 16, the smallest tl.dot tile
    bk = _common.tile_rows(bd)
    _common.check_fits("text", dtype, bcls * bm, bd, device)
    grid = (triton.cdiv(C, bcls),)
    return dict(BLOCK_CLS=bcls, BLOCK_M=bm, BLOCK_R=bcls * bm, BLOCK_D=bd, BLOCK_K=bk,
                num_warps=_common.num_warps(bcls * bm * bd)), grid


def check_shape(C, M, D, dtype, device) -> None:
    """Raise ValueError if [C, M, D] in ``dtype`` is beyond these kernels' tiles on ``device``."""
    _blocks(C, M, D, 1, dtype, device)


def text_forward(T, A, W, b, E, agg: bool, dist: bool, u_dtype=None):
    """Launch the forward. T [C, M, D] contiguous; A [C, M] (if agg); W [K, D], b [K] or
    None, E [C, K] (if dist), all contiguous. Returns (u^ [C, D] in u_dtype (default
    T.dtype) or None, zn, cos, en [C*M] fp32 or None)."""
    C, M, D = T.shape
    K = W.shape[0] if dist else 0
    meta, grid = _blocks(C, M, D, max(K, 1), T.dtype, T.device)
    dev = T.device
    u = _common.new_output((C, D), u_dtype or T.dtype, dev) if agg else None
    stats = [_common.new_output((C * M,), torch.float32, dev) for _ in range(3)] if dist else [None] * 3
    dummy = T
    _text_fwd_kernel[grid](
        T, A if agg else dummy, W if dist else dummy, b if b is not None else dummy, E if dist else dummy,
        u if agg else dummy, *(s if dist else dummy for s in stats),
        C, M, D, K, AGG=agg, DIST=dist, HAS_BIAS=b is not None, LOWP=_common.lowp_dot(T.dtype), **meta)
    return (u, *stats)


def text_backward(T, A, W, b, E, zn, cos, en, grad_u, grad_dist, agg: bool, dist: bool, a_dtype=None):
    """Launch the backward. grad_u [C, D] (if agg); grad_dist [1] fp32, dL/dL_dist (if dist).
    Returns (dT [C, M, D] in T.dtype, dA [C, M] in a_dtype (default A.dtype) or None)."""
    C, M, D = T.shape
    K = W.shape[0] if dist else 0
    meta, grid = _blocks(C, M, D, max(K, 1), T.dtype, T.device)
    dev = T.device
    dT = _common.new_output((C, M, D), T.dtype, dev)
    dA = _common.new_output((C, M), a_dtype or A.dtype, dev) if agg else None
    dummy = T
    _text_bwd_kernel[grid](
        T, A if agg else dummy, W if dist else dummy, b if b is not None else dummy, E if dist else dummy,
        zn if dist else dummy, cos if dist else dummy, en if dist else dummy,
        grad_u if agg else dummy, grad_dist if dist else dummy, dT, dA if agg else dummy,
        C, M, D, K, 1.0 / (C * M), AGG=agg, DIST=dist, HAS_BIAS=b is not None,
        LOWP=_common.lowp_dot(T.dtype), **meta)
    return dT, dA
