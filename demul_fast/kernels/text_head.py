"""Text-side kernels of the DeMul head: prompt aggregation and the K-free distillation.

docs/SPEC.md sections 4, 4.1, 4.3. A program owns BLOCK_R >= 64 rows (c, m) of T [C, M, D]:
BLOCK_CLS whole classes x BLOCK_M prompts, so that its products lower to Hopper's warpgroup
MMA (64 rows per 4 warps). T is read in its own dtype (any strides); nothing in float32 the
size of a row tile stays live across a loop. D and r are compile-time constants.

* forward, grid (row tiles, r splits): n = |t|; v = R t^ + c over the split's columns of r
  (a [BLOCK_R, D] x [D, BLOCK_N] product per column chunk, v stored in T's dtype for the
  backward), with the partial sums |v|^2 and <v, F_c> per row; the programs of split 0 also
  aggregate: w = softmax_m(A), u = sum_m w t^, u^ = u / max(|u|, eps). A row tile of at
  most RESIDENT_BYTES is read once and kept for all of this; a larger one is streamed in
  [BLOCK_R, BLOCK_K] chunks (once for n, once per column chunk, twice to aggregate).
* finish, a small pass: |z| = sqrt(sum |v|^2 + beta), cos = (sum <v, F> + delta) / max(|z|, eps)
  and per-program sums of (1 - cos).
* backward, grid (row tiles, D chunks): du = nb(u^, dL/du^, |u|), dw = <du, t^>,
  dA = w (dw - <w, dw>), dv = (F - cos v/|z|)/|z| (eps floor: no cos term, divide by eps),
  dt^ = w du + g R^T dv with g = -(dL/dL_dist)/(C M) and the row's 1/|z| applied after the
  product (float16 operands stay within [-2, 2]: no subnormals, no overflow when |z| is
  small), dT = nb(t^, dt^, |t|) with <t^, R^T dv> = <v - c, dv>
  taken in r-space, so each program needs only its own D chunk of the output.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from demul_fast import common

from . import launch

EPS = tl.constexpr(common.EPS)  # the norm floor, defined once in demul_fast.common
# Block pointers lower to plain vectorised loads here (tensor descriptors would need a device
# allocator for TMA descriptors); triton 3.8 calls them deprecated at every compile.
warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated")


@triton.jit
def _rows(pid, C, M, BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The program's rows flattened: class row_c, prompt row_m, row_ok (inside [C, M]), each [BLOCK_R]."""
    offs_r = tl.arange(0, BLOCK_CLS * BLOCK_M)
    row_c = pid * BLOCK_CLS + offs_r // BLOCK_M
    row_m = offs_r % BLOCK_M
    return row_c, row_m, (row_c < C) & (row_m < M)


@triton.jit
def _load_t(T, pid, C, M, D, stc, stm, std, d0, BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK: tl.constexpr):
    """t[rows, d0:d0+BLOCK] as [BLOCK_R, BLOCK] in T's dtype (zero outside), through a block pointer."""
    p = tl.make_block_ptr(T, shape=(C, M, D), strides=(stc, stm, std), offsets=(pid * BLOCK_CLS, 0, d0),
                          block_shape=(BLOCK_CLS, BLOCK_M, BLOCK), order=(2, 1, 0))
    return tl.reshape(tl.load(p, boundary_check=(0, 1, 2), padding_option="zero"), [BLOCK_CLS * BLOCK_M, BLOCK])


@triton.jit
def _v_block(V, pid, C, M, RANK, n0, BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Block pointer to v[rows, n0:n0+BLOCK_N] of V [C*M, r] seen as [C, M, r]."""
    return tl.make_block_ptr(V, shape=(C, M, RANK), strides=(M * RANK, RANK, 1), offsets=(pid * BLOCK_CLS, 0, n0),
                             block_shape=(BLOCK_CLS, BLOCK_M, BLOCK_N), order=(2, 1, 0))


@triton.jit
def _load_cls(X, pid, C, N, n0, BLOCK_CLS: tl.constexpr, BLOCK: tl.constexpr):
    """X[classes, n0:n0+BLOCK] of a row-major [C, N] tensor as fp32 [BLOCK_CLS, BLOCK] (zero outside)."""
    p = tl.make_block_ptr(X, shape=(C, N), strides=(N, 1), offsets=(pid * BLOCK_CLS, n0),
                          block_shape=(BLOCK_CLS, BLOCK), order=(1, 0))
    return tl.load(p, boundary_check=(0, 1), padding_option="zero").to(tl.float32)


@triton.jit
def _per_row(x, BLOCK_M: tl.constexpr):
    """A per-class [BLOCK_CLS, N] tile repeated for each prompt row: [BLOCK_CLS * BLOCK_M, N]."""
    BLOCK_CLS: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    return tl.reshape(tl.broadcast_to(x[:, None, :], [BLOCK_CLS, BLOCK_M, N]), [BLOCK_CLS * BLOCK_M, N])


@triton.jit
def _row_dot(t, x, BLOCK_M: tl.constexpr):
    """<t[row], x[class of row]> per row [BLOCK_R] for t [BLOCK_R, N] and a per-class x [BLOCK_CLS, N]."""
    BLOCK_CLS: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    return tl.reshape(tl.sum(tl.reshape(t, [BLOCK_CLS, BLOCK_M, N]) * x[:, None, :], axis=2), [BLOCK_CLS * BLOCK_M])


@triton.jit
def _class_sum(x, BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr):
    """sum over the prompts of each class of a per-row [BLOCK_R] vector: [BLOCK_CLS]."""
    return tl.sum(tl.reshape(x, [BLOCK_CLS, BLOCK_M]), axis=1)


@triton.jit
def _class_to_rows(x, BLOCK_M: tl.constexpr):
    """A per-class [BLOCK_CLS] vector repeated for each prompt row: [BLOCK_CLS * BLOCK_M]."""
    BLOCK_CLS: tl.constexpr = x.shape[0]
    return tl.reshape(tl.broadcast_to(x[:, None], [BLOCK_CLS, BLOCK_M]), [BLOCK_CLS * BLOCK_M])


@triton.jit
def _row_norms(T, pid, C, M, D, stc, stm, std, BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """n = |t| per row [BLOCK_R] fp32."""
    tt = tl.zeros([BLOCK_CLS * BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        t = _load_t(T, pid, C, M, D, stc, stm, std, d0, BLOCK_CLS, BLOCK_M, BLOCK_K).to(tl.float32)
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
def _dot_f32(a, b, acc, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a @ b for float32 a, b to float32 precision: in float32 when DTYPE is, else on the
    tensor cores as three bfloat16 pieces of each operand (a = a0 + a1 + a2 + a residue, each piece
    the rounding of what the previous ones leave: 8 bits each, residue <= 2^-24 |a| rounding to
    nearest, 0 when the conversion truncates) and the six piece products of order <= 2
    (a0 b0, a0 b1, a1 b0, a0 b2, a1 b1, a2 b0; the dropped a1 b2, a2 b1, a2 b2 are <= 3 2^-24 |a b|
    rounding to nearest, 3 2^-21 truncating). Two pieces (three products: a_lo b_lo and the
    pieces' own roundings dropped) were 3 2^-16 |a b|: about 400 float32 units, which a gradient
    that cancels to ~0 (D = 1: dT is exactly 0) showed against float32 floors."""
    if DTYPE == tl.float32:
        return _dot(a, b, acc, DTYPE, EMULATE)
    else:
        a0 = a.to(tl.bfloat16)
        b0 = b.to(tl.bfloat16)
        ra = a - a0.to(tl.float32)
        rb = b - b0.to(tl.float32)
        a1 = ra.to(tl.bfloat16)
        b1 = rb.to(tl.bfloat16)
        a2 = (ra - a1.to(tl.float32)).to(tl.bfloat16)
        b2 = (rb - b1.to(tl.float32)).to(tl.bfloat16)
        # smallest first: the float32 accumulator then rounds the large products last
        acc = _dot(a1, b1, acc, tl.bfloat16, EMULATE)
        acc = _dot(a0, b2, acc, tl.bfloat16, EMULATE)
        acc = _dot(a2, b0, acc, tl.bfloat16, EMULATE)
        acc = _dot(a0, b1, acc, tl.bfloat16, EMULATE)
        acc = _dot(a1, b0, acc, tl.bfloat16, EMULATE)
        return _dot(a0, b0, acc, tl.bfloat16, EMULATE)


@triton.jit
def _aggregate_store(tf, scale, U, UL, RN, pid, C, D: tl.constexpr, BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr, STORE_UL: tl.constexpr):
    """u = sum_m (w/n) t over a resident tile tf [BLOCK_R, BLOCK_D] fp32; stores |u| and u^
    (and u^ in UL's type, STORE_UL)."""
    u = tl.sum(tl.reshape(tf * scale[:, None], [BLOCK_CLS, BLOCK_M, BLOCK_D]), axis=1)
    r = tl.sqrt(tl.sum(u * u, axis=1))
    offs_cls = pid * BLOCK_CLS + tl.arange(0, BLOCK_CLS)
    tl.store(RN + offs_cls, r, mask=offs_cls < C)
    u_ptr = tl.make_block_ptr(U, shape=(C, D), strides=(D, 1), offsets=(pid * BLOCK_CLS, 0),
                              block_shape=(BLOCK_CLS, BLOCK_D), order=(1, 0))
    u_hat = u * (1.0 / tl.maximum(r, EPS))[:, None]
    tl.store(u_ptr, u_hat.to(U.dtype.element_ty), boundary_check=(0, 1))
    if STORE_UL:
        tl.store(tl.make_block_ptr(UL, shape=(C, D), strides=(D, 1), offsets=(pid * BLOCK_CLS, 0),
                                   block_shape=(BLOCK_CLS, BLOCK_D), order=(1, 0)),
                 u_hat.to(UL.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _aggregate_parts(T, A, U, UL, RN, pid, C, M, stc, stm, std, sac, sam, D: tl.constexpr, BLOCK_CLS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PARTS: tl.constexpr, STORE_UL: tl.constexpr):
    """The aggregation of the program's classes in PARTS parts of BLOCK_CLS // PARTS classes,
    each part's [rows, D] tile read once from global memory: n = |t|, w = softmax(A),
    u = sum_m (w/n) t, stores |u| and u^. A 128-row tile aggregated at once next to the
    product's resident tile spills (ptxas, sm_90a); a part at a time does not."""
    CP: tl.constexpr = BLOCK_CLS // PARTS
    for part in tl.static_range(PARTS):
        cls0 = pid * BLOCK_CLS + part * CP
        p = tl.make_block_ptr(T, shape=(C, M, D), strides=(stc, stm, std), offsets=(cls0, 0, 0),
                              block_shape=(CP, BLOCK_M, BLOCK_D), order=(2, 1, 0))
        tf = tl.reshape(tl.load(p, boundary_check=(0, 1, 2), padding_option="zero"), [CP * BLOCK_M, BLOCK_D])
        tf = tf.to(tl.float32)
        inv_n = 1.0 / tl.maximum(tl.sqrt(tl.sum(tf * tf, axis=1)), EPS)
        offs_c = cls0 + tl.arange(0, CP)
        offs_m = tl.arange(0, BLOCK_M)
        ok = (offs_c[:, None] < C) & (offs_m[None, :] < M)
        a = tl.load(A + offs_c[:, None] * sac + offs_m[None, :] * sam, mask=ok, other=float("-inf")).to(tl.float32)
        a_max = tl.where(offs_c < C, tl.max(a, axis=1), 0.0)  # as _prompt_weights
        ex = tl.exp(a - a_max[:, None])
        den = tl.sum(ex, axis=1)
        w = tl.reshape(ex / tl.where(den == 0.0, 1.0, den)[:, None], [CP * BLOCK_M])
        u = tl.sum(tl.reshape(tf * (w * inv_n)[:, None], [CP, BLOCK_M, BLOCK_D]), axis=1)
        r = tl.sqrt(tl.sum(u * u, axis=1))
        tl.store(RN + offs_c, r, mask=offs_c < C)
        u_ptr = tl.make_block_ptr(U, shape=(C, D), strides=(D, 1), offsets=(cls0, 0),
                                  block_shape=(CP, BLOCK_D), order=(1, 0))
        u_hat = u * (1.0 / tl.maximum(r, EPS))[:, None]
        tl.store(u_ptr, u_hat.to(U.dtype.element_ty), boundary_check=(0, 1))
        if STORE_UL:
            tl.store(tl.make_block_ptr(UL, shape=(C, D), strides=(D, 1), offsets=(cls0, 0),
                                       block_shape=(CP, BLOCK_D), order=(1, 0)),
                     u_hat.to(UL.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _row_sq(t):
    """|t|^2 per row [rows] fp32 of a [rows, N] tile."""
    tf = t.to(tl.float32)
    return tl.sum(tf * tf, axis=1)


@triton.jit
def _piece(q: tl.constexpr, t0, t1, t2, t3):
    """The q-th of four tiles (q a compile-time constant)."""
    if q == 0:
        return t0
    elif q == 1:
        return t1
    elif q == 2:
        return t2
    else:
        return t3


@triton.jit
def _v_out(acc, inv_n, row_ok, CV, F, V, pid, C, M, n0, RANK, BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr):
    """v = acc / n + c over columns n0:n0+BLOCK_N of r, stored in V's dtype; returns the
    partial |v|^2, <v, F_c>, <v - c, F_c> and <v - c, v> per row (the last two: the backward's
    <v - c, dv |z|> without a sweep over all of r, _distill_finish)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    cv = tl.load(CV + offs_n, mask=offs_n < RANK, other=0.0)
    v = tl.where(row_ok[:, None] & (offs_n[None, :] < RANK), acc * inv_n[:, None] + cv[None, :], 0.0)
    tl.store(_v_block(V, pid, C, M, RANK, n0, BLOCK_CLS, BLOCK_M, BLOCK_N),
             tl.reshape(v.to(V.dtype.element_ty), [BLOCK_CLS, BLOCK_M, BLOCK_N]), boundary_check=(0, 1, 2))
    f = _load_cls(F, pid, C, RANK, n0, BLOCK_CLS, BLOCK_N)
    vc = tl.where(row_ok[:, None], v - cv[None, :], 0.0)
    return tl.sum(v * v, axis=1), _row_dot(v, f, BLOCK_M), _row_dot(vc, f, BLOCK_M), tl.sum(vc * v, axis=1)


@triton.jit
def _text_fwd_kernel(
    T, A, R, CV, F,                 # T [C, M, D] strided, A [C, M] strided, R [r, D] in T's dtype, CV [r], F [C, r]
    NORM, U, RN, V, VV, VF, VA, VB,  # NORM [C*M] |t|, U [C, D] u^, RN [C] |u|, V [C*M, r], VV/VF/VA/VB [splits, C*M]
    UL,                             # STORE_UL: u^ [C, D] again, in the cross-entropy dot's operand type
    C, M, stc, stm, std, sac, sam, cols_per_split,
    D: tl.constexpr, RANK: tl.constexpr,
    AGG: tl.constexpr, DIST: tl.constexpr, EMULATE: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, AGG_PARTS: tl.constexpr, TRI: tl.constexpr, OWNERS: tl.constexpr,
    STORE_UL: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    BLOCK_R: tl.constexpr = BLOCK_CLS * BLOCK_M
    DTYPE: tl.constexpr = T.dtype.element_ty
    CM = C * M
    row_c, row_m, row_ok = _rows(pid, C, M, BLOCK_CLS, BLOCK_M)
    row = row_c * M + row_m
    PW: tl.constexpr = BLOCK_D // 4  # TRI: the tile in four column pieces of PW
    if TRI:  # the whole [BLOCK_R, D] tile read once, as four [BLOCK_R, PW] pieces (R triangular, below)
        t0 = _load_t(T, pid, C, M, D, stc, stm, std, 0, BLOCK_CLS, BLOCK_M, PW)
        t1 = _load_t(T, pid, C, M, D, stc, stm, std, PW, BLOCK_CLS, BLOCK_M, PW)
        t2 = _load_t(T, pid, C, M, D, stc, stm, std, 2 * PW, BLOCK_CLS, BLOCK_M, PW)
        t3 = _load_t(T, pid, C, M, D, stc, stm, std, 3 * PW, BLOCK_CLS, BLOCK_M, PW)
        n = tl.sqrt(_row_sq(t0) + _row_sq(t1) + _row_sq(t2) + _row_sq(t3))
    elif RESIDENT:  # the whole [BLOCK_R, D] tile read once: norms, aggregation and products from it
        t_all = _load_t(T, pid, C, M, D, stc, stm, std, 0, BLOCK_CLS, BLOCK_M, BLOCK_D)
        n = tl.sqrt(tl.sum(t_all.to(tl.float32) * t_all.to(tl.float32), axis=1))
    else:
        n = _row_norms(T, pid, C, M, D, stc, stm, std, BLOCK_CLS, BLOCK_M, BLOCK_K)
    inv_n = 1.0 / tl.maximum(n, EPS)
    if split == 0:
        tl.store(NORM + row, n, mask=row_ok)
        if AGG:
            if RESIDENT:
                if AGG_PARTS == 0:  # from the resident tile (else after the product, below)
                    scale = _prompt_weights(A, pid, C, M, sac, sam, BLOCK_CLS, BLOCK_M) * inv_n  # w / n per row
                    _aggregate_store(t_all.to(tl.float32), scale, U, UL, RN, pid, C, D, BLOCK_CLS, BLOCK_M, BLOCK_D,
                                     STORE_UL)
            else:
                scale = _prompt_weights(A, pid, C, M, sac, sam, BLOCK_CLS, BLOCK_M) * inv_n  # w / n per row
                offs_cls = pid * BLOCK_CLS + tl.arange(0, BLOCK_CLS)
                uu = tl.zeros([BLOCK_CLS], dtype=tl.float32)
                for d0 in range(0, D, BLOCK_K):
                    t = _load_t(T, pid, C, M, D, stc, stm, std, d0, BLOCK_CLS, BLOCK_M, BLOCK_K).to(tl.float32)
                    u = tl.sum(tl.reshape(t * scale[:, None], [BLOCK_CLS, BLOCK_M, BLOCK_K]), axis=1)
                    uu += tl.sum(u * u, axis=1)
                r = tl.sqrt(uu)
                tl.store(RN + offs_cls, r, mask=offs_cls < C)
                inv_r = 1.0 / tl.maximum(r, EPS)
                for d0 in range(0, D, BLOCK_K):
                    t = _load_t(T, pid, C, M, D, stc, stm, std, d0, BLOCK_CLS, BLOCK_M, BLOCK_K).to(tl.float32)
                    u = tl.sum(tl.reshape(t * scale[:, None], [BLOCK_CLS, BLOCK_M, BLOCK_K]), axis=1)
                    u_ptr = tl.make_block_ptr(U, shape=(C, D), strides=(D, 1), offsets=(pid * BLOCK_CLS, d0),
                                              block_shape=(BLOCK_CLS, BLOCK_K), order=(1, 0))
                    tl.store(u_ptr, (u * inv_r[:, None]).to(U.dtype.element_ty), boundary_check=(0, 1))
                    if STORE_UL:
                        tl.store(tl.make_block_ptr(UL, shape=(C, D), strides=(D, 1), offsets=(pid * BLOCK_CLS, d0),
                                                   block_shape=(BLOCK_CLS, BLOCK_K), order=(1, 0)),
                                 (u * inv_r[:, None]).to(UL.dtype.element_ty), boundary_check=(0, 1))
    if DIST:
        vv = tl.zeros([BLOCK_R], dtype=tl.float32)
        vf = tl.zeros([BLOCK_R], dtype=tl.float32)
        va = tl.zeros([BLOCK_R], dtype=tl.float32)
        vb = tl.zeros([BLOCK_R], dtype=tl.float32)
        if TRI:
            # R is upper triangular (triton_ops.triangular_basis): R[n, d] = 0 for d < n, so the
            # columns n of group g (PW of them, from g PW) take only the pieces q >= g of the tile
            # and of R^T: 10 of the 16 piece products at D = r. Each split owns whole groups
            # (OWNERS: 2 bits per group, the groups balanced by their piece counts). Within the
            # diagonal piece (q = g) only the 16-byte groups of R reaching d >= n are loaded.
            for g in tl.static_range(4):
                if g * PW < RANK:
                    if ((OWNERS >> (2 * g)) & 3) == split:
                        for n0 in range(g * PW, (g + 1) * PW, BLOCK_N):
                            acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
                            for q in tl.static_range(g, 4):
                                if q == g:  # the diagonal piece: only R's 16-byte groups that reach d >= n
                                    offs_d = q * PW + tl.arange(0, PW)
                                    offs_n = n0 + tl.arange(0, BLOCK_N)
                                    group_end = (offs_d // 8) * 8 + 7
                                    rt_ok = ((offs_d[:, None] < D) & (offs_n[None, :] < RANK)
                                             & (group_end[:, None] >= offs_n[None, :]))
                                    rt = tl.load(R + offs_n[None, :] * D + offs_d[:, None], mask=rt_ok, other=0.0)
                                else:
                                    rt_ptr = tl.make_block_ptr(R, shape=(D, RANK), strides=(1, D),
                                                               offsets=(q * PW, n0), block_shape=(PW, BLOCK_N),
                                                               order=(0, 1))   # R^T piece
                                    rt = tl.load(rt_ptr, boundary_check=(0, 1), padding_option="zero")
                                acc = _dot(_piece(q, t0, t1, t2, t3), rt, acc, DTYPE, EMULATE)
                            dvv, dvf, dva, dvb = _v_out(acc, inv_n, row_ok, CV, F, V, pid, C, M, n0, RANK,
                                                        BLOCK_CLS, BLOCK_M, BLOCK_N)
                            vv += dvv
                            vf += dvf
                            va += dva
                            vb += dvb
        else:
            col_end = tl.minimum(split * cols_per_split + cols_per_split, RANK)
            for n0 in range(split * cols_per_split, col_end, BLOCK_N):
                acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
                if RESIDENT:
                    rt_ptr = tl.make_block_ptr(R, shape=(D, RANK), strides=(1, D), offsets=(0, n0),
                                               block_shape=(BLOCK_D, BLOCK_N), order=(0, 1))   # R^T chunk
                    acc = _dot(t_all, tl.load(rt_ptr, boundary_check=(0, 1), padding_option="zero"), acc, DTYPE,
                               EMULATE)
                else:
                    for d0 in range(0, D, BLOCK_K):
                        t = _load_t(T, pid, C, M, D, stc, stm, std, d0, BLOCK_CLS, BLOCK_M, BLOCK_K)
                        rt_ptr = tl.make_block_ptr(R, shape=(D, RANK), strides=(1, D), offsets=(d0, n0),
                                                   block_shape=(BLOCK_K, BLOCK_N), order=(0, 1))   # R^T chunk
                        acc = _dot(t, tl.load(rt_ptr, boundary_check=(0, 1), padding_option="zero"), acc, DTYPE,
                                   EMULATE)
                dvv, dvf, dva, dvb = _v_out(acc, inv_n, row_ok, CV, F, V, pid, C, M, n0, RANK, BLOCK_CLS, BLOCK_M,
                                            BLOCK_N)
                vv += dvv
                vf += dvf
                va += dva
                vb += dvb
        tl.store(VV + split * CM + row, vv, mask=row_ok)
        tl.store(VF + split * CM + row, vf, mask=row_ok)
        tl.store(VA + split * CM + row, va, mask=row_ok)
        tl.store(VB + split * CM + row, vb, mask=row_ok)
    if AGG and RESIDENT and AGG_PARTS > 0:
        if split == 0:  # after the product, the resident tile dead: the tile read once more, in parts
            _aggregate_parts(T, A, U, UL, RN, pid, C, M, stc, stm, std, sac, sam, D, BLOCK_CLS, BLOCK_M, BLOCK_D,
                             AGG_PARTS, STORE_UL)


@triton.jit
def _distill_finish_kernel(
    VV, VF, VA, VB, DELTA, BETA,    # partial sums [splits, C*M], DELTA [C], BETA [1]
    ZN, COS, PV, LOSSP,             # ZN/COS/PV [C*M] fp32, LOSSP [programs] fp32: sum of (1 - cos)
    CM, M, SPLITS, BLOCK: tl.constexpr,
):
    _distill_finish(tl.program_id(0), VV, VF, VA, VB, DELTA, BETA, ZN, COS, PV, LOSSP, CM, M, SPLITS, BLOCK)


@triton.jit
def _distill_finish(pid, VV, VF, VA, VB, DELTA, BETA, ZN, COS, PV, LOSSP, CM, M, SPLITS, BLOCK: tl.constexpr):
    """One program of the distillation finish: rows pid * BLOCK ... (the head's forward runs it
    in the cross-entropy merge's launch, cosine_ce._fwd_finish_kernel). Also the backward's
    PV = <v - c, dv |z|> = <v - c, F> - k <v - c, v> with k = cos / |z| (0 below the eps floor,
    as the backward's dv), so that the backward needs only the columns of r its chunk of
    the output reads (R triangular)."""
    row = pid * BLOCK + tl.arange(0, BLOCK)
    ok = row < CM
    vv = tl.zeros([BLOCK], dtype=tl.float32)
    vf = tl.zeros([BLOCK], dtype=tl.float32)
    va = tl.zeros([BLOCK], dtype=tl.float32)
    vb = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        vv += tl.load(VV + s * CM + row, mask=ok, other=0.0)
        vf += tl.load(VF + s * CM + row, mask=ok, other=0.0)
        va += tl.load(VA + s * CM + row, mask=ok, other=0.0)
        vb += tl.load(VB + s * CM + row, mask=ok, other=0.0)
    zn = tl.sqrt(vv + tl.load(BETA))
    cos = (vf + tl.load(DELTA + row // M, mask=ok, other=0.0)) / tl.maximum(zn, EPS)
    tl.store(ZN + row, zn, mask=ok)
    tl.store(COS + row, cos, mask=ok)
    k = tl.where(zn >= EPS, cos, 0.0) / tl.maximum(zn, EPS)
    tl.store(PV + row, va - k * vb, mask=ok)
    tl.store(LOSSP + pid, tl.sum(tl.where(ok, 1.0 - cos, 0.0), axis=0))


@triton.jit
def _bwd_product(acc, k, V, F, R, pid, C, M, o0, N_START: tl.constexpr, N_END: tl.constexpr, D: tl.constexpr,
                 RANK: tl.constexpr, DTYPE: tl.constexpr, EMULATE: tl.constexpr, BLOCK_CLS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DO: tl.constexpr, TRI: tl.constexpr = False):
    """acc + dv|z| R[N_START:N_END, o0:o0+BLOCK_DO] with dv|z| = F - k v (k = cos / |z| per row).
    TRI: R is upper triangular (R[n, o] = 0 for o < n, exactly: triton_ops.triangular_basis), and
    only its 16-byte groups of 8 columns that reach the diagonal or beyond are loaded (the
    others are the zeros they would read)."""
    BLOCK_R: tl.constexpr = BLOCK_CLS * BLOCK_M
    for n0 in range(N_START, N_END, BLOCK_N):
        v_ptr = _v_block(V, pid, C, M, RANK, n0, BLOCK_CLS, BLOCK_M, BLOCK_N)
        v = tl.reshape(tl.load(v_ptr, boundary_check=(0, 1, 2), padding_option="zero"), [BLOCK_R, BLOCK_N])
        v = v.to(tl.float32)
        f = _per_row(_load_cls(F, pid, C, RANK, n0, BLOCK_CLS, BLOCK_N), BLOCK_M)
        # dv |z| (entries within [-2, 2]): the row factor 1/|z| is applied after the product, so
        # that float16 operands cannot overflow when |z| is small
        dvz = f - k[:, None] * v
        if TRI:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            offs_o = o0 + tl.arange(0, BLOCK_DO)
            group_end = (offs_o // 8) * 8 + 7  # the last column of each column's group of 8
            r_ok = (offs_n[:, None] < RANK) & (offs_o[None, :] < D) & (group_end[None, :] >= offs_n[:, None])
            r = tl.load(R + offs_n[:, None] * D + offs_o[None, :], mask=r_ok, other=0.0)
        else:
            r_ptr = tl.make_block_ptr(R, shape=(RANK, D), strides=(D, 1), offsets=(n0, o0),
                                      block_shape=(BLOCK_N, BLOCK_DO), order=(1, 0))
            r = tl.load(r_ptr, boundary_check=(0, 1), padding_option="zero")
        acc = _dot(dvz, r, acc, DTYPE, EMULATE)
    return acc


@triton.jit
def _text_bwd_kernel(
    T, A, NORM, U, RN, GU,          # forward inputs and statistics; U [C, D] u^ and GU [C, D] dL/du^, fp32
    R, CV, F, V, ZN, COS, PV,       # basis, saved v, |z|, cos, <v - c, dv |z|>
    GLOSS, GDIST,                   # dL/dL_dist = w_loss GLOSS + GDIST ([1] fp32 each)
    DT, DA,                         # DT [C, M, D] contiguous, DA [C, M] contiguous
    PTG, PUT, PUG,                  # SWEPT: [SW_CHUNKS, C*M] <t, gu>, <u^, t>, [SW_CHUNKS, C] <u^, gu> partials
    C, M, stc, stm, std, sac, sam, inv_cm, w_loss,
    D: tl.constexpr, RANK: tl.constexpr,
    AGG: tl.constexpr, DIST: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_CLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DO: tl.constexpr, TRI: tl.constexpr, OUT_CHUNKS: tl.constexpr,
    SWEPT: tl.constexpr, SW_CHUNKS: tl.constexpr, SW_P2: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    BLOCK_R: tl.constexpr = BLOCK_CLS * BLOCK_M
    DTYPE: tl.constexpr = T.dtype.element_ty
    row_c, row_m, row_ok = _rows(pid, C, M, BLOCK_CLS, BLOCK_M)
    row = row_c * M + row_m
    n = tl.load(NORM + row, mask=row_ok, other=1.0)
    inv_n = 1.0 / tl.maximum(n, EPS)
    o0 = chunk * BLOCK_DO
    proj_t = tl.zeros([BLOCK_R], dtype=tl.float32)   # <t^, dt^>
    dt_hat = tl.zeros([BLOCK_R, BLOCK_DO], dtype=tl.float32)  # replaced by the product's result when DIST
    if AGG:
        w = _prompt_weights(A, pid, C, M, sac, sam, BLOCK_CLS, BLOCK_M)
        offs_cls = pid * BLOCK_CLS + tl.arange(0, BLOCK_CLS)
        r = tl.load(RN + offs_cls, mask=offs_cls < C, other=1.0)
        if SWEPT:  # the sums over D from the dU pass (cosine_ce._ce_du_kernel), per chunk of its columns
            offs_s = tl.arange(0, SW_P2)
            s_ok = offs_s < SW_CHUNKS
            at_rows = offs_s[:, None] * (C * M) + row[None, :]
            rows_ok = s_ok[:, None] & row_ok[None, :]
            a_tg = tl.sum(tl.load(PTG + at_rows, mask=rows_ok, other=0.0), axis=0)
            a_ut = tl.sum(tl.load(PUT + at_rows, mask=rows_ok, other=0.0), axis=0)
            a_ug = tl.sum(tl.load(PUG + offs_s[:, None] * C + offs_cls[None, :],
                                  mask=s_ok[:, None] & (offs_cls < C)[None, :], other=0.0), axis=0)
        else:
            a_tg = tl.zeros([BLOCK_R], dtype=tl.float32)    # <t, gu> per row
            a_ut = tl.zeros([BLOCK_R], dtype=tl.float32)    # <u^, t> per row
            a_ug = tl.zeros([BLOCK_CLS], dtype=tl.float32)  # <u^, gu> per class
            for d0 in range(0, D, BLOCK_K):
                t = _load_t(T, pid, C, M, D, stc, stm, std, d0, BLOCK_CLS, BLOCK_M, BLOCK_K).to(tl.float32)
                gu = _load_cls(GU, pid, C, D, d0, BLOCK_CLS, BLOCK_K)
                uh = _load_cls(U, pid, C, D, d0, BLOCK_CLS, BLOCK_K)
                a_tg += _row_dot(t, gu, BLOCK_M)
                a_ut += _row_dot(t, uh, BLOCK_M)
                a_ug += tl.sum(uh * gu, axis=1)
        # normalize backward of u^; below the floor the divisor is the constant eps (SPEC 4.1)
        inv_r = 1.0 / tl.maximum(r, EPS)
        proj_u = tl.where(r >= EPS, a_ug, 0.0)
        dw = (a_tg - _class_to_rows(proj_u, BLOCK_M) * a_ut) * _class_to_rows(inv_r, BLOCK_M) * inv_n
        if chunk == 0:
            da = w * (dw - _class_to_rows(_class_sum(w * dw, BLOCK_CLS, BLOCK_M), BLOCK_M))
            tl.store(DA + row, da.to(DA.dtype.element_ty), mask=row_ok)
        proj_t += w * dw
    if DIST:
        zn = tl.load(ZN + row, mask=row_ok, other=1.0)
        cos = tl.where(zn >= EPS, tl.load(COS + row, mask=row_ok, other=0.0), 0.0)
        inv_z = 1.0 / tl.maximum(zn, EPS)
        g = -(w_loss * tl.load(GLOSS) + tl.load(GDIST)) * inv_cm
        # <v - c, dv |z|> = |z| <t^, R^T dv> over all of r, from the forward (_distill_finish)
        proj_v = tl.load(PV + row, mask=row_ok, other=0.0)
        acc = tl.zeros([BLOCK_R, BLOCK_DO], dtype=tl.float32)
        if TRI:  # R triangular: the output columns o0.. of chunk cc take the columns n < (cc + 1) BLOCK_DO of r
            for cc in tl.static_range(OUT_CHUNKS):
                if chunk == cc:
                    N_END: tl.constexpr = RANK if RANK < (cc + 1) * BLOCK_DO else (cc + 1) * BLOCK_DO
                    acc = _bwd_product(acc, cos * inv_z, V, F, R, pid, C, M, o0, 0, N_END, D, RANK, DTYPE, EMULATE,
                                       BLOCK_CLS, BLOCK_M, BLOCK_N, BLOCK_DO, TRI)
        else:
            acc = _bwd_product(acc, cos * inv_z, V, F, R, pid, C, M, o0, 0, RANK, D, RANK, DTYPE, EMULATE,
                               BLOCK_CLS, BLOCK_M, BLOCK_N, BLOCK_DO)
        dt_hat = (g * inv_z)[:, None] * acc
        proj_t += g * inv_z * proj_v
    if AGG:  # after the product: no float32 tile stays live across its loop
        # w du per row, du = (gu - <u^, gu> u^) / |u| per class: du is formed per class in float32
        # ([classes, columns], the cancellation of its two terms at float32 precision), then
        # spread to the class's rows as a product of the one-hot [rows, classes] weights w with
        # it, accumulated onto dt^ in the product's registers (a [rows, columns] float32 copy of
        # du per row spilled at 128 rows); _dot_f32 keeps that product at float32 precision
        KC: tl.constexpr = 16 if BLOCK_CLS < 16 else BLOCK_CLS
        offs_k = tl.arange(0, KC)
        offs_o = o0 + tl.arange(0, BLOCK_DO)
        k_cls = pid * BLOCK_CLS + offs_k
        k_ok = (offs_k < BLOCK_CLS) & (k_cls < C)
        at = k_cls[:, None] * D + offs_o[None, :]
        k_mask = k_ok[:, None] & (offs_o[None, :] < D)
        gu = tl.load(GU + at, mask=k_mask, other=0.0)
        uh = tl.load(U + at, mask=k_mask, other=0.0).to(tl.float32)
        # <u^, gu> and 1/|u| per class on the classes axis of the product (one nonzero term per
        # sum: exact; the padded classes get 0, and their gu and u^ rows are 0)
        pick = offs_k[:, None] == tl.arange(0, BLOCK_CLS)[None, :]
        proj_k = tl.sum(tl.where(pick, proj_u[None, :], 0.0), axis=1)
        inv_rk = tl.sum(tl.where(pick, inv_r[None, :], 0.0), axis=1)
        du = (gu - proj_k[:, None] * uh) * inv_rk[:, None]
        one_hot = (tl.arange(0, BLOCK_R) // BLOCK_M)[:, None] == offs_k[None, :]
        dt_hat = _dot_f32(tl.where(one_hot, w[:, None], 0.0), du, dt_hat, DTYPE, EMULATE)
    proj_t = tl.where(n >= EPS, proj_t, 0.0)
    t = _load_t(T, pid, C, M, D, stc, stm, std, o0, BLOCK_CLS, BLOCK_M, BLOCK_DO).to(tl.float32)
    dt = (dt_hat - (t * inv_n[:, None]) * proj_t[:, None]) * inv_n[:, None]
    dt_ptr = tl.make_block_ptr(DT, shape=(C, M, D), strides=(M * D, D, 1), offsets=(pid * BLOCK_CLS, 0, o0),
                               block_shape=(BLOCK_CLS, BLOCK_M, BLOCK_DO), order=(2, 1, 0))
    tl.store(dt_ptr, tl.reshape(dt.to(DT.dtype.element_ty), [BLOCK_CLS, BLOCK_M, BLOCK_DO]), boundary_check=(0, 1, 2))


# ---------------------------------------------------------------- launch configuration

TARGET_PROGRAMS = 132  # one wave of an H100/H200 (132 SMs): grids are split until they cover it
WAVE_SHARE = 0.9       # ... or 90% of it, when one split fewer reads T once less per program
MAX_BLOCK_M = 128      # prompts per class the row tiles hold (a class's prompts share a program)
RESIDENT_BYTES = 64 * 1024  # a forward row tile up to this size is read once and kept (registers/shared)
# The resident forward's row tile: 128 rows where the [128, D] tile fits WIDE_RESIDENT_BYTES
# and the device has the shared memory (about 200 KiB at D=512 in 16-bit types: Hopper);
# each program reads the basis R once per split, so 128-row tiles halve R's reads.
WIDE_ROWS = 128
BWD_ROWS = 128   # the backward's row tile (whole classes; more when a class has more prompts)
BWD_MAX_CLS = 16  # ... holding at most this many classes (32 classes of M=4 spill: imagenet21k takes 64 rows)
BWD_SWEEP = 128  # columns of T per round of the backward's <t, gu>, <u^, t> sweep (no dot: one load round each)
WIDE_RESIDENT_BYTES = 128 * 1024
WIDE_SMEM = 210 * 1024  # shared memory per block the wide tile needs (ptxas sm_90a: 200 KiB at D=512)


def shape_constexprs(D: int, rank: int) -> dict:
    """The sizes the text kernels take as compile-time constants: loop bounds known to the
    compiler (a runtime bound in the backward's r loop made ptxas serialise its wgmma, C7515)."""
    return dict(D=D, RANK=rank)


_CONFIGS: dict = {}  # (C, M, D, rank, elem_bytes, tunables) -> text_config's answer
_CONFIGS_KEPT = 256


def wide_tiles_fit(device) -> bool:
    """Whether ``device`` gives a block the shared memory of the 128-row resident forward
    (Hopper: 227 KiB; Ampere's 163 KiB and Ada's 99 KiB do not). True off the GPU: the
    interpreter and the sm_90a compiled-code report take the Hopper tiles."""
    if device is None or getattr(device, "type", "cpu") != "cuda":
        return True
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) >= WIDE_SMEM


def text_config(C: int, M: int, D: int, rank: int, elem_bytes: int = 2, wide: bool = True) -> dict:
    """``build_text_config``'s answer for these sizes, worked out once and kept (it is a pure
    function of them): the triton backend's capability question computes it to answer
    (demul_fast.ops.triton_ops.capability), and the forward and backward launches of the
    same call read it back. The dict is shared: read it, never change it. Under torch.compile it is
    built afresh (the question is asked once per trace, not per call). Raises ValueError
    for sizes beyond the kernels (M > MAX_BLOCK_M, D > MAX_D)."""
    if torch.compiler.is_compiling():  # traced code asks once per trace: no cache for guards to watch
        return build_text_config(C, M, D, rank, elem_bytes, wide)
    # the sizes, and the module's tunables (tests change RESIDENT_BYTES to take both paths)
    key = (C, M, D, rank, elem_bytes, wide, RESIDENT_BYTES, WIDE_RESIDENT_BYTES, WIDE_ROWS, TARGET_PROGRAMS,
           MAX_BLOCK_M, launch.MAX_D)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        if len(_CONFIGS) >= _CONFIGS_KEPT:
            _CONFIGS.clear()
        cfg = _CONFIGS[key] = build_text_config(C, M, D, rank, elem_bytes, wide)
    return cfg


def _splits(tiles: int, rank: int, block_n: int) -> tuple:
    """(columns of r per split, splits): the fewest splits whose grid covers WAVE_SHARE of a
    wave of TARGET_PROGRAMS (every split reads its row tile once more)."""
    n_chunks = triton.cdiv(max(rank, 1), block_n)
    want = max(1, min(n_chunks, triton.cdiv(int(TARGET_PROGRAMS * WAVE_SHARE), tiles)))
    cols_per_split = block_n * triton.cdiv(n_chunks, want)
    return cols_per_split, triton.cdiv(max(rank, 1), cols_per_split)


def build_text_config(C: int, M: int, D: int, rank: int, elem_bytes: int = 2, wide: bool = True) -> dict:
    """Block sizes and grids of the text kernels for T [C, M, D] (elements of elem_bytes) and
    a basis of rank r.

    Rows per program: max(64, next_pow2(M)) (whole classes), 4 warps per 64 rows (Hopper's
    warpgroup MMA needs 64 rows). The forward reads its whole [rows, D] tile once when it
    fits RESIDENT_BYTES (norms, the products with every r chunk and the aggregation from the
    one read; 32 columns of r per product), else streams D in BLOCK_K chunks per r chunk.
    When ``wide`` (the device's shared memory allows, ``wide_tiles_fit``) and a 128-row tile
    fits WIDE_RESIDENT_BYTES, the resident forward takes 128 rows (``fwd_*`` keys): every
    program reads its columns of R once, so R moves half as often; its aggregation then
    reads the tile once more in 64-row parts after the product (``AGG_PARTS``), as the whole
    tile aggregated next to the resident one spills.
    The forward splits r until the grid covers WAVE_SHARE of a wave; the backward splits
    its output D into BLOCK_DO-column chunks.
    """
    bm = triton.next_power_of_2(M)
    if bm > MAX_BLOCK_M:
        raise ValueError(f"the triton backend's text kernels hold a class's prompts in one tile: M <= {MAX_BLOCK_M}, "
                         f"got M={M}; use backend='torch' or 'cuda'")
    block_d = launch.block_d(D)
    block_r = max(64, bm)
    bcls = block_r // bm
    tiles = triton.cdiv(C, bcls)
    resident = block_r * block_d * elem_bytes <= RESIDENT_BYTES
    fwd_r = max(WIDE_ROWS, bm)
    if wide and resident and fwd_r > block_r and fwd_r * block_d * elem_bytes <= WIDE_RESIDENT_BYTES:
        resident, agg_parts = True, fwd_r // block_r
    else:
        fwd_r, agg_parts = block_r, 0
    fwd_cls = fwd_r // bm
    fwd_tiles = triton.cdiv(C, fwd_cls)
    block_n = min(32 if resident else 128, max(16, triton.next_power_of_2(max(rank, 1))))
    cols_per_split, splits = _splits(fwd_tiles, rank, block_n)
    # the 128-row resident forward with a triangular R (the head's basis, triton_ops.triangular_basis):
    # four column pieces of the tile, groups of r columns taking only the pieces at or right of
    # their diagonal; the splits own whole groups, balanced by their piece counts
    tri = bool(agg_parts) and rank > 0 and block_d >= 64
    owners = 0
    if tri:
        pw = block_d // 4
        block_n = min(block_n, pw)  # chunks of r inside one group
        groups = triton.cdiv(rank, pw)
        splits = min(splits, groups)
        cols_per_split = block_n * triton.cdiv(triton.cdiv(rank, block_n), splits)  # a general R's split
        splits = triton.cdiv(rank, cols_per_split)
        load = [0] * splits
        for g in range(groups):  # the costliest group first, to the least loaded split
            s = min(range(splits), key=lambda i: (load[i], i))
            load[s] += 4 - g
            owners |= s << (2 * g)
    # the backward: 128-row tiles (R read once per 128 rows) and output chunks of up to 256
    # columns, 8 warps; each chunk's program re-reads the row tile's v, F, t and du statistics,
    # so fewer and wider chunks move fewer bytes. Its [128, 256] float32 accumulator fits the
    # registers since w du joins it as a product (no per-row float32 copy of du)
    bwd_r = max(BWD_ROWS, bm)
    if bwd_r // bm > BWD_MAX_CLS:  # many small classes per tile: their per-class sums spill at 128 rows
        bwd_r = block_r
    bwd_cls = bwd_r // bm
    block_do = min(256 if bm < 128 else 128, max(16, triton.next_power_of_2(D)))
    # the backward holds v, F, dv and its product chunk at once: 32 columns of r keep it within the
    # registers (64 spill at imagenet21k, where a tile holds 16 classes of M=4)
    return dict(BLOCK_CLS=bcls, BLOCK_M=bm, BLOCK_K=64 if D >= 64 else max(16, triton.next_power_of_2(D)),
                BLOCK_N=block_n, BLOCK_NB=min(block_n, 32), BLOCK_DO=block_do, num_warps=4 * block_r // 64,
                bwd_BLOCK_CLS=bwd_cls, bwd_tiles=triton.cdiv(C, bwd_cls), BLOCK_KB=BWD_SWEEP if D >= BWD_SWEEP else
                max(16, triton.next_power_of_2(D)),
                RESIDENT=resident, BLOCK_D=block_d, fwd_stages=2 if resident else 3,
                fwd_warps=8 if agg_parts else (8 if resident else 4) * block_r // 64,
                bwd_warps=8,
                tiles=tiles, fwd_tiles=fwd_tiles, fwd_BLOCK_CLS=fwd_cls, AGG_PARTS=agg_parts,
                splits=splits, cols_per_split=cols_per_split, out_chunks=triton.cdiv(D, block_do),
                TRI=tri, OWNERS=owners)


FINISH_BLOCK = 1024


def text_forward(T, A, R, cv, F, delta, beta, agg: bool, dist: bool, u_dtype=None, finish: bool = True,
                 triangular: bool = False, u_low: Optional[torch.Tensor] = None):
    """T [C, M, D] (any strides), A [C, M] (if agg); basis R [r, D] in T's dtype, cv [r],
    F [C, r], delta [C], beta [1] fp32 (if dist). ``triangular``: the caller guarantees that R
    is upper triangular (R[n, d] = 0 for d < n; triton_ops.triangular_basis), and the 128-row
    forward then skips the products with its zero blocks. ``u_low`` (with agg): a [C, D]
    contiguous buffer that receives u^ again in its own type (the head: the cross-entropy
    dot's operand type, so that its passes read half the bytes of the float32 u^).

    Returns (n [C*M], u^ [C, D] in u_dtype (default T's) or None, |u| [C] or None,
    v [C*M, r] in T's dtype or None, |z| [C*M], cos [C*M], per-program sums of (1 - cos),
    PV [C*M] (the backward's <v - c, dv |z|>)) with the statistics in float32 (None where
    not computed). Without ``finish`` (the head: its cross-entropy merge runs the finish in
    the same launch) the last four are replaced by ``DistillPartials`` for ``finish_args``
    (or None without dist) and three Nones.
    """
    C, M, D = T.shape
    rank = R.shape[0] if dist else 0
    cfg = text_config(C, M, D, rank, T.element_size(), wide_tiles_fit(T.device))
    dev = T.device
    f32 = dict(dtype=torch.float32, device=dev)
    splits = cfg["splits"] if dist else 1
    norm = launch.new_output((C * M,), **f32)
    u = launch.new_output((C, D), u_dtype or T.dtype, dev) if agg else None
    rn = launch.new_output((C,), **f32) if agg else None
    v = launch.new_output((C * M, rank), T.dtype, dev) if dist else None
    vv = launch.new_output((splits, C * M), **f32) if dist else None
    vf = launch.new_output((splits, C * M), **f32) if dist else None
    va = launch.new_output((splits, C * M), **f32) if dist else None
    vb = launch.new_output((splits, C * M), **f32) if dist else None
    dummy = norm
    A_ = A if agg else dummy
    _text_fwd_kernel[(cfg["fwd_tiles"], splits)](
        T, A_, R if dist else T, cv if dist else dummy, F if dist else dummy,
        norm, u if agg else dummy, rn if agg else dummy, v if dist else T, vv if dist else dummy,
        vf if dist else dummy, va if dist else dummy, vb if dist else dummy, u_low if u_low is not None else dummy,
        C, M, *T.stride(), *(A.stride() if agg else (0, 0)), cfg["cols_per_split"], **shape_constexprs(D, rank),
        AGG=agg, DIST=dist, EMULATE=launch.emulate_dot(T.dtype), RESIDENT=cfg["RESIDENT"],
        BLOCK_CLS=cfg["fwd_BLOCK_CLS"], BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"], AGG_PARTS=cfg["AGG_PARTS"], TRI=bool(dist and triangular and cfg["TRI"]),
        OWNERS=cfg["OWNERS"], STORE_UL=bool(agg and u_low is not None), num_warps=cfg["fwd_warps"],
        num_stages=cfg["fwd_stages"])
    zn = cos = loss_parts = pv = None
    if dist and not finish:
        return norm, u, rn, v, DistillPartials(vv, vf, va, vb, delta, beta, C * M, M, splits), None, None, None
    if dist:
        zn, cos, pv, loss_parts, args = finish_args(DistillPartials(vv, vf, va, vb, delta, beta, C * M, M, splits))
        _distill_finish_kernel[(loss_parts.shape[0],)](*args, BLOCK=FINISH_BLOCK, num_warps=4)
    return norm, u, rn, v, zn, cos, loss_parts, pv


class Swept(NamedTuple):
    """The text backward's sums over D made by the dU pass (cosine_ce.ce_backward(...,
    sweep_t)): per chunk of its columns, <t, grad_u> and <u^, t> [chunks, C*M] and
    <u^, grad_u> [chunks, C] (float32), and the number of chunks."""
    tg: torch.Tensor
    ut: torch.Tensor
    ug: torch.Tensor
    chunks: int


class DistillPartials(NamedTuple):
    """What the distillation finish reads: the forward's partial sums [splits, C*M] of |v|^2
    and <v, F>, delta [C], beta [1], and the sizes."""
    vv: torch.Tensor
    vf: torch.Tensor
    va: torch.Tensor
    vb: torch.Tensor
    delta: torch.Tensor
    beta: torch.Tensor
    rows: int
    M: int
    splits: int


def finish_args(p: DistillPartials):
    """(|z|, cos, PV [C*M], per-program sums of (1 - cos), the finish's arguments up to BLOCK):
    the outputs allocated, for _distill_finish_kernel or a launch that runs _distill_finish."""
    f32 = dict(dtype=torch.float32, device=p.vv.device)
    zn, cos, pv = (launch.new_output((p.rows,), **f32) for _ in range(3))
    loss_parts = launch.new_output((triton.cdiv(p.rows, FINISH_BLOCK),), **f32)
    return zn, cos, pv, loss_parts, (p.vv, p.vf, p.va, p.vb, p.delta, p.beta, zn, cos, pv, loss_parts, p.rows, p.M,
                                     p.splits)


def text_backward(T, A, norm, u, rn, grad_u, R, cv, F, v, zn, cos, grad_dist, agg: bool, dist: bool,
                  a_dtype=None, grad_loss=None, w_loss: float = 0.0, pv=None, triangular: bool = False,
                  swept: Optional["Swept"] = None):
    """grad_u [C, D] dL/du^ (if agg); dL/dL_dist = w_loss grad_loss + grad_dist (fp32 [1]
    tensors, if dist); the other
    tensors as text_forward takes and returns them (pv: its PV, required with dist;
    ``triangular``: R is, as the forward took it, and each output chunk reads only the
    columns of r at or left of its diagonal).
    ``swept``: the sums over D of <t, grad_u>, <u^, t> per row and <u^, grad_u> per class,
    made by the dU pass that computed grad_u (cosine_ce.ce_backward(..., sweep_t=T)); without
    it each program sweeps its rows of T for them.
    Returns (dT [C, M, D] contiguous in T's dtype, dA [C, M] in a_dtype (default A's) or None)."""
    C, M, D = T.shape
    rank = R.shape[0] if dist else 0
    if dist and pv is None:
        raise ValueError("text_backward: pv (text_forward's PV) is required with dist")
    cfg = text_config(C, M, D, rank, T.element_size(), wide_tiles_fit(T.device))  # the forward's configuration
    dev = T.device
    dT = launch.new_output((C, M, D), T.dtype, dev)
    dA = launch.new_output((C, M), a_dtype or A.dtype, dev) if agg else None
    dummy = norm
    _text_bwd_kernel[(cfg["bwd_tiles"], cfg["out_chunks"])](
        T, A if agg else dummy, norm, u if agg else dummy, rn if agg else dummy, grad_u if agg else dummy,
        R if dist else T, cv if dist else dummy, F if dist else dummy, v if dist else T,
        zn if dist else dummy, cos if dist else dummy, pv if dist else dummy,
        (grad_dist if grad_loss is None else grad_loss) if dist else dummy, grad_dist if dist else dummy,
        dT, dA if agg else dummy, *(swept[:3] if swept is not None else (dummy,) * 3),
        C, M, *T.stride(), *(A.stride() if agg else (0, 0)), 1.0 / (C * M), launch.fp32_scalar(w_loss),
        **shape_constexprs(D, rank), AGG=agg, DIST=dist, EMULATE=launch.emulate_dot(T.dtype),
        BLOCK_CLS=cfg["bwd_BLOCK_CLS"], BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_KB"], BLOCK_N=cfg["BLOCK_NB"],
        BLOCK_DO=cfg["BLOCK_DO"], TRI=bool(dist and triangular), OUT_CHUNKS=cfg["out_chunks"],
        SWEPT=bool(agg and swept is not None), SW_CHUNKS=swept.chunks if swept is not None else 1,
        SW_P2=triton.next_power_of_2(swept.chunks) if swept is not None else 1,
        num_warps=cfg["bwd_warps"])
    return dT, dA
