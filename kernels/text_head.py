"""Text-side kernels of the DeMul head: prompt aggregation and the K-free distillation.

SPEC.md sections 4, 4.1, 4.3. A program owns BLOCK_R >= 64 rows (c, m) of T [C, M, D]:
BLOCK_CLS whole classes x BLOCK_M prompts, so that its products lower to Hopper's warpgroup
MMA (64 rows per 4 warps). T is read in [BLOCK_R, BLOCK_K] chunks of its own dtype (any
strides); nothing in float32 the size of a row tile stays live across a loop.

* forward, grid (row tiles, r splits): n = |t|; v = R t^ + c over the split's columns of r
  (a [BLOCK_R, D] x [D, BLOCK_N] product per column chunk, v stored in T's dtype for the
  backward), with the partial sums |v|^2 and <v, F_c> per row; the programs of split 0 also
  aggregate: w = softmax_m(A), u = sum_m w t^, u^ = u / max(|u|, eps) (two sweeps of the
  tile: |u| first, then u^).
* finish, a small pass: |z| = sqrt(sum |v|^2 + beta), cos = (sum <v, F> + delta) / max(|z|, eps)
  and per-program sums of (1 - cos).
* backward, grid (row tiles, D chunks): du = nb(u^, dL/du^, |u|), dw = <du, t^>,
  dA = w (dw - <w, dw>), dv = (F - cos v/|z|)/|z| (eps floor: no cos term, divide by eps),
  dt^ = w du + g R^T dv with g = -(dL/dL_dist)/(C M) applied after the product (float16
  operands stay far from subnormals), dT = nb(t^, dt^, |t|) with <t^, R^T dv> = <v - c, dv>
  taken in r-space, so each program needs only its own D chunk of the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from demul_fast import common

from . import _common

EPS = tl.constexpr(common.EPS)  # the norm floor, defined once in demul_fast.common


@triton.jit
def _rows(pid, C, M, BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The program's rows flattened: class row_c, prompt row_m, row_ok (inside [C, M]), each [BLOCK_R]."""
    offs_r = tl.arange(0, BLOCK_CLS * BLOCK_M)
    row_c = pid * BLOCK_CLS + offs_r // BLOCK_M
    row_m = offs_r % BLOCK_M
    return row_c, row_m, (row_c < C) & (row_m < M)


@triton.jit
def _load_t(T, row_c, row_m, row_ok, offs_d, D, stc, stm, std):
    """The chunk t[rows, offs_d] in T's dtype, zero outside."""
    ptrs = T + row_c[:, None] * stc + row_m[:, None] * stm + offs_d[None, :] * std
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _row_norms(T, row_c, row_m, row_ok, D, stc, stm, std, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """n = |t| per row [BLOCK_R] fp32."""
    tt = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        t = _load_t(T, row_c, row_m, row_ok, d0 + tl.arange(0, BLOCK_K), D, stc, stm, std).to(tl.float32)
        tt += tl.sum(t * t, axis=1)
    return tl.sqrt(tt)


@triton.jit
def _prompt_weights(A, pid, C, M, sac, sam, BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr):
    """w = softmax_m(A[c, :]) flattened to [BLOCK_R], zero for m >= M."""
    offs_c = pid * BLOCK_CLS + tl.arange(0, BLOCK_CLS)
    offs_m = tl.arange(0, BLOCK_M)
    ok = (offs_c[:, None] < C) & (offs_m[None, :] < M)
    a = tl.load(A + offs_c[:, None] * sac + offs_m[None, :] * sam, mask=ok, other=float("-inf")).to(tl.float32)
    # classes past C are all masked; a real class whose logits are all -inf gets NaN, as in the reference
    a_max = tl.where(offs_c < C, tl.max(a, axis=1), 0.0)
    ex = tl.exp(a - a_max[:, None])
    den = tl.sum(ex, axis=1)
    return tl.reshape(ex / tl.where(den == 0.0, 1.0, den)[:, None], [BLOCK_CLS * BLOCK_M])


@triton.jit
def _class_sum(x, BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr):
    """sum over the prompts of each class of a per-row [BLOCK_R] vector, broadcast back to the rows."""
    s = tl.sum(tl.reshape(x, [BLOCK_CLS, BLOCK_M]), axis=1)
    return tl.reshape(tl.broadcast_to(s[:, None], [BLOCK_CLS, BLOCK_M]), [BLOCK_CLS * BLOCK_M])


@triton.jit
def _dot(a, b, acc, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a @ b in fp32. Operands in DTYPE: half types on the tensor cores, float32 in IEEE
    precision (TF32 would break the error rule). EMULATE (the interpreter, whose half dot is
    wrong): operands rounded to DTYPE as the GPU sees them, then multiplied in fp32."""
    if EMULATE:
        return tl.dot(a.to(DTYPE).to(tl.float32), b.to(DTYPE).to(tl.float32), acc, input_precision="ieee")
    elif DTYPE == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DTYPE), b.to(DTYPE), acc)


@triton.jit
def _text_fwd_kernel(
    T, A, R, CV, F,                 # T [C, M, D] strided, A [C, M] strided, R [r, D] in T's dtype, CV [r], F [C, r]
    NORM, U, RN, V, VV, VF,         # NORM [C*M] |t|, U [C, D] u^, RN [C] |u|, V [C*M, r], VV/VF [splits, C*M]
    C, M, D, RANK, stc, stm, std, sac, sam, cols_per_split,
    AGG: tl.constexpr, DIST: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    BLOCK_R: tl.constexpr = BLOCK_CLS * BLOCK_M
    DTYPE: tl.constexpr = T.dtype.element_ty
    CM = C * M
    row_c, row_m, row_ok = _rows(pid, C, M, BLOCK_CLS, BLOCK_M)
    row = row_c * M + row_m
    n = _row_norms(T, row_c, row_m, row_ok, D, stc, stm, std, BLOCK_R, BLOCK_K)
    inv_n = 1.0 / tl.maximum(n, EPS)
    if DIST:
        vv = tl.zeros([BLOCK_R], dtype=tl.float32)
        vf = tl.zeros([BLOCK_R], dtype=tl.float32)
        col_end = tl.minimum(split * cols_per_split + cols_per_split, RANK)
        for n0 in range(split * cols_per_split, col_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < col_end
            acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_K):
                offs_k = d0 + tl.arange(0, BLOCK_K)
                t = _load_t(T, row_c, row_m, row_ok, offs_k, D, stc, stm, std)
                rt = tl.load(R + offs_n[None, :] * D + offs_k[:, None],
                             mask=n_ok[None, :] & (offs_k[:, None] < D), other=0.0)   # R^T chunk [BLOCK_K, BLOCK_N]
                acc = _dot(t, rt, acc, DTYPE, EMULATE)
            cv = tl.load(CV + offs_n, mask=n_ok, other=0.0)
            ok = row_ok[:, None] & n_ok[None, :]
            v = tl.where(ok, acc * inv_n[:, None] + cv[None, :], 0.0)
            f = tl.load(F + row_c[:, None] * RANK + offs_n[None, :], mask=ok, other=0.0)
            tl.store(V + row[:, None] * RANK + offs_n[None, :], v.to(V.dtype.element_ty), mask=ok)
            vv += tl.sum(v * v, axis=1)
            vf += tl.sum(v * f, axis=1)
        tl.store(VV + split * CM + row, vv, mask=row_ok)
        tl.store(VF + split * CM + row, vf, mask=row_ok)
    if split == 0:
        tl.store(NORM + row, n, mask=row_ok)
        if AGG:
            scale = _prompt_weights(A, pid, C, M, sac, sam, BLOCK_CLS, BLOCK_M) * inv_n  # w / n per row
            offs_cls = pid * BLOCK_CLS + tl.arange(0, BLOCK_CLS)
            uu = tl.zeros([BLOCK_CLS], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_K):
                t = _load_t(T, row_c, row_m, row_ok, d0 + tl.arange(0, BLOCK_K), D, stc, stm, std).to(tl.float32)
                u = tl.sum(tl.reshape(t * scale[:, None], [BLOCK_CLS, BLOCK_M, BLOCK_K]), axis=1)
                uu += tl.sum(u * u, axis=1)
            r = tl.sqrt(uu)
            tl.store(RN + offs_cls, r, mask=offs_cls < C)
            inv_r = 1.0 / tl.maximum(r, EPS)
            for d0 in range(0, D, BLOCK_K):
                offs_k = d0 + tl.arange(0, BLOCK_K)
                t = _load_t(T, row_c, row_m, row_ok, offs_k, D, stc, stm, std).to(tl.float32)
                u = tl.sum(tl.reshape(t * scale[:, None], [BLOCK_CLS, BLOCK_M, BLOCK_K]), axis=1)
                tl.store(U + offs_cls[:, None] * D + offs_k[None, :], (u * inv_r[:, None]).to(U.dtype.element_ty),
                         mask=(offs_cls[:, None] < C) & (offs_k[None, :] < D))


@triton.jit
def _distill_finish_kernel(
    VV, VF, DELTA, BETA,            # partial sums [splits, C*M], DELTA [C], BETA [1]
    ZN, COS, LOSSP,                 # ZN/COS [C*M] fp32, LOSSP [programs] fp32: sum of (1 - cos)
    CM, M, SPLITS, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid * BLOCK + tl.arange(0, BLOCK)
    ok = row < CM
    vv = tl.zeros([BLOCK], dtype=tl.float32)
    vf = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        vv += tl.load(VV + s * CM + row, mask=ok, other=0.0)
        vf += tl.load(VF + s * CM + row, mask=ok, other=0.0)
    zn = tl.sqrt(vv + tl.load(BETA))
    cos = (vf + tl.load(DELTA + row // M, mask=ok, other=0.0)) / tl.maximum(zn, EPS)
    tl.store(ZN + row, zn, mask=ok)
    tl.store(COS + row, cos, mask=ok)
    tl.store(LOSSP + pid, tl.sum(tl.where(ok, 1.0 - cos, 0.0), axis=0))


@triton.jit
def _text_bwd_kernel(
    T, A, NORM, U, RN, GU,          # forward inputs and statistics; GU [C, D] dL/du^ (fp32)
    R, CV, F, V, ZN, COS, GDIST,    # basis, saved v, |z|, cos; GDIST [1] fp32 dL/dL_dist (alpha included)
    DT, DA,                         # DT [C, M, D] contiguous, DA [C, M] contiguous
    C, M, D, RANK, stc, stm, std, sac, sam, inv_cm,
    AGG: tl.constexpr, DIST: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    BLOCK_R: tl.constexpr = BLOCK_CLS * BLOCK_M
    DTYPE: tl.constexpr = T.dtype.element_ty
    row_c, row_m, row_ok = _rows(pid, C, M, BLOCK_CLS, BLOCK_M)
    row = row_c * M + row_m
    n = tl.load(NORM + row, mask=row_ok, other=1.0)
    inv_n = 1.0 / tl.maximum(n, EPS)
    offs_o = chunk * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = row_ok[:, None] & (offs_o[None, :] < D)
    proj_t = tl.zeros([BLOCK_R], dtype=tl.float32)   # <t^, dt^>
    dt_hat = tl.zeros([BLOCK_R, BLOCK_DO], dtype=tl.float32)
    if AGG:
        w = _prompt_weights(A, pid, C, M, sac, sam, BLOCK_CLS, BLOCK_M)
        r = tl.load(RN + row_c, mask=row_ok, other=1.0)
        a_tg = tl.zeros([BLOCK_R], dtype=tl.float32)  # <t, gu>
        a_ug = tl.zeros([BLOCK_R], dtype=tl.float32)  # <u^, gu>
        a_ut = tl.zeros([BLOCK_R], dtype=tl.float32)  # <u^, t>
        for d0 in range(0, D, BLOCK_K):
            offs_k = d0 + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (offs_k[None, :] < D)
            t = _load_t(T, row_c, row_m, row_ok, offs_k, D, stc, stm, std).to(tl.float32)
            gu = tl.load(GU + row_c[:, None] * D + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
            uh = tl.load(U + row_c[:, None] * D + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
            a_tg += tl.sum(t * gu, axis=1)
            a_ug += tl.sum(uh * gu, axis=1)
            a_ut += tl.sum(uh * t, axis=1)
        # normalize backward of u^; below the floor the divisor is the constant eps (SPEC 4.1)
        inv_r = 1.0 / tl.maximum(r, EPS)
        proj_u = tl.where(r >= EPS, a_ug, 0.0)
        dw = (a_tg - proj_u * a_ut) * inv_r * inv_n
        if chunk == 0:
            da = w * (dw - _class_sum(w * dw, BLOCK_CLS, BLOCK_M))
            tl.store(DA + row, da.to(DA.dtype.element_ty), mask=row_ok)
        proj_t += w * dw
        gu = tl.load(GU + row_c[:, None] * D + offs_o[None, :], mask=o_ok, other=0.0).to(tl.float32)
        uh = tl.load(U + row_c[:, None] * D + offs_o[None, :], mask=o_ok, other=0.0).to(tl.float32)
        dt_hat += (w * inv_r)[:, None] * (gu - uh * proj_u[:, None])
    if DIST:
        zn = tl.load(ZN + row, mask=row_ok, other=1.0)
        cos = tl.where(zn >= EPS, tl.load(COS + row, mask=row_ok, other=0.0), 0.0)
        inv_z = 1.0 / tl.maximum(zn, EPS)
        g = -tl.load(GDIST) * inv_cm
        proj_v = tl.zeros([BLOCK_R], dtype=tl.float32)  # <v - c, dv> = <t^, R^T dv>
        acc = tl.zeros([BLOCK_R, BLOCK_DO], dtype=tl.float32)
        for n0 in range(0, RANK, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (offs_n[None, :] < RANK)
            v = tl.load(V + row[:, None] * RANK + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
            f = tl.load(F + row_c[:, None] * RANK + offs_n[None, :], mask=ok, other=0.0)
            cv = tl.load(CV + offs_n, mask=offs_n < RANK, other=0.0)
            dv = (f - (cos * inv_z)[:, None] * v) * inv_z[:, None]
            proj_v += tl.sum(tl.where(ok, (v - cv[None, :]) * dv, 0.0), axis=1)
            r_tile = tl.load(R + offs_n[:, None] * D + offs_o[None, :],
                             mask=(offs_n[:, None] < RANK) & (offs_o[None, :] < D), other=0.0)
            acc = _dot(dv, r_tile, acc, DTYPE, EMULATE)
        dt_hat += g * acc
        proj_t += g * proj_v
    proj_t = tl.where(n >= EPS, proj_t, 0.0)
    t = _load_t(T, row_c, row_m, row_ok, offs_o, D, stc, stm, std).to(tl.float32)
    dt = (dt_hat - (t * inv_n[:, None]) * proj_t[:, None]) * inv_n[:, None]
    tl.store(DT + row[:, None] * D + offs_o[None, :], dt.to(DT.dtype.element_ty), mask=o_ok)


# ---------------------------------------------------------------- launch configuration

TARGET_PROGRAMS = 132  # one wave of an H100/H200 (132 SMs): grids are split until they cover it
MAX_BLOCK_M = 128      # prompts per class the row tiles hold (a class's prompts share a program)


def text_config(C: int, M: int, D: int, rank: int) -> dict:
    """Block sizes and grids of the text kernels for T [C, M, D] and a basis of rank r.

    Rows per program: max(64, next_pow2(M)) (whole classes), 4 warps per 64 rows (Hopper's
    warpgroup MMA needs 64 rows). The forward splits r until the grid covers one wave; the
    backward splits its output D into BLOCK_DO-column chunks.
    """
    bm = triton.next_power_of_2(M)
    if bm > MAX_BLOCK_M:
        raise ValueError(f"the triton backend's text kernels hold a class's prompts in one tile: M <= {MAX_BLOCK_M}, "
                         f"got M={M}; use backend='torch' or 'cuda'")
    _common.block_d(D)
    block_r = max(64, bm)
    bcls = block_r // bm
    tiles = triton.cdiv(C, bcls)
    block_n = min(128, max(16, triton.next_power_of_2(max(rank, 1))))
    n_chunks = triton.cdiv(max(rank, 1), block_n)
    splits = min(n_chunks, triton.cdiv(TARGET_PROGRAMS, tiles))
    cols_per_split = block_n * triton.cdiv(n_chunks, splits)
    splits = triton.cdiv(max(rank, 1), cols_per_split)
    block_do = min(128, max(16, triton.next_power_of_2(D)))
    return dict(BLOCK_CLS=bcls, BLOCK_M=bm, BLOCK_K=64 if D >= 64 else max(16, triton.next_power_of_2(D)),
                BLOCK_N=block_n, BLOCK_DO=block_do, num_warps=4 * block_r // 64,
                tiles=tiles, splits=splits, cols_per_split=cols_per_split, out_chunks=triton.cdiv(D, block_do))


FINISH_BLOCK = 1024


def text_forward(T, A, R, cv, F, delta, beta, agg: bool, dist: bool, u_dtype=None):
    """T [C, M, D] (any strides), A [C, M] (if agg); basis R [r, D] in T's dtype, cv [r],
    F [C, r], delta [C], beta [1] fp32 (if dist).

    Returns (n [C*M], u^ [C, D] in u_dtype (default T's) or None, |u| [C] or None,
    v [C*M, r] in T's dtype or None, |z| [C*M], cos [C*M], per-program sums of (1 - cos))
    with the statistics in float32 (None where not computed).
    """
    C, M, D = T.shape
    rank = R.shape[0] if dist else 0
    cfg = text_config(C, M, D, rank)
    dev = T.device
    f32 = dict(dtype=torch.float32, device=dev)
    splits = cfg["splits"] if dist else 1
    norm = _common.new_output((C * M,), **f32)
    u = _common.new_output((C, D), u_dtype or T.dtype, dev) if agg else None
    rn = _common.new_output((C,), **f32) if agg else None
    v = _common.new_output((C * M, rank), T.dtype, dev) if dist else None
    vv = _common.new_output((splits, C * M), **f32) if dist else None
    vf = _common.new_output((splits, C * M), **f32) if dist else None
    dummy = norm
    A_ = A if agg else dummy
    _text_fwd_kernel[(cfg["tiles"], splits)](
        T, A_, R if dist else T, cv if dist else dummy, F if dist else dummy,
        norm, u if agg else dummy, rn if agg else dummy, v if dist else T, vv if dist else dummy,
        vf if dist else dummy,
        C, M, D, rank, *T.stride(), *(A.stride() if agg else (0, 0)), cfg["cols_per_split"],
        AGG=agg, DIST=dist, EMULATE=_common.emulate_dot(T.dtype), BLOCK_CLS=cfg["BLOCK_CLS"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    zn = cos = loss_parts = None
    if dist:
        programs = triton.cdiv(C * M, FINISH_BLOCK)
        zn, cos = _common.new_output((C * M,), **f32), _common.new_output((C * M,), **f32)
        loss_parts = _common.new_output((programs,), **f32)
        _distill_finish_kernel[(programs,)](vv, vf, delta, beta, zn, cos, loss_parts, C * M, M, splits,
                                            BLOCK=FINISH_BLOCK, num_warps=4)
    return norm, u, rn, v, zn, cos, loss_parts


def text_backward(T, A, norm, u, rn, grad_u, R, cv, F, v, zn, cos, grad_dist, agg: bool, dist: bool,
                  a_dtype=None):
    """grad_u [C, D] dL/du^ (if agg); grad_dist [1] fp32 dL/dL_dist (if dist); the other
    tensors as text_forward takes and returns them.
    Returns (dT [C, M, D] contiguous in T's dtype, dA [C, M] in a_dtype (default A's) or None)."""
    C, M, D = T.shape
    rank = R.shape[0] if dist else 0
    cfg = text_config(C, M, D, rank)
    dev = T.device
    dT = _common.new_output((C, M, D), T.dtype, dev)
    dA = _common.new_output((C, M), a_dtype or A.dtype, dev) if agg else None
    dummy = norm
    _text_bwd_kernel[(cfg["tiles"], cfg["out_chunks"])](
        T, A if agg else dummy, norm, u if agg else dummy, rn if agg else dummy, grad_u if agg else dummy,
        R if dist else T, cv if dist else dummy, F if dist else dummy, v if dist else T,
        zn if dist else dummy, cos if dist else dummy, grad_dist if dist else dummy,
        dT, dA if agg else dummy,
        C, M, D, rank, *T.stride(), *(A.stride() if agg else (0, 0)), 1.0 / (C * M),
        AGG=agg, DIST=dist, EMULATE=_common.emulate_dot(T.dtype), BLOCK_CLS=cfg["BLOCK_CLS"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DO=cfg["BLOCK_DO"],
        num_warps=cfg["num_warps"])
    return dT, dA
