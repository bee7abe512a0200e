"""Cosine logits + label-smoothed cross-entropy without storing the [B, C] logits.

docs/SPEC.md sections 4, 4.1, 4.2. x^ = x / max(|x|, eps), s = tau <x^, u> for class features
u [C, D] used as given, L_ce = (1/B) sum_b (lse_b - (1 - ls) s[b, y_b] - (ls/C) sum_c s[b, c]).
Tiles have 64 image rows (Hopper's warpgroup MMA), D is streamed in BLOCK_K chunks, and the
classes are split across programs so that a grid covers the GPU even at B=256.

* forward, grid (image tiles, class splits): online log-sum-exp partials (max, sum, target
  logit, logit sum) per image and split, |x|; a merge pass combines them into lse and the
  per-image loss; one small pass reduces all the losses of a call (ce, dist, their sum);
* backward: the grad pass recomputes the logit tiles and stores B G = g (softmax(s) - q)
  (+ B x the incoming logits gradient) [B, C] in the input dtype, with d scale partials;
  dU = (tau/B) (BG)^T x^ per (class tile, D chunk); dX^ = (tau/B) (BG) U per (image tile,
  D chunk, class split) in float32 partials, then dX = nb(x^, dX^, |x|) per image. The 1/B
  is applied after the dots (in float16, G itself would be mostly subnormal).
A label outside [0, C) is never used as an address: it only fails to match a class.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from demul_fast import common

from . import launch
from . import text_head
from .text_head import TARGET_PROGRAMS, WAVE_SHARE, _distill_finish, _dot

EPS = tl.constexpr(common.EPS)  # the norm floor, defined once in demul_fast.common
BLOCK_B = 64     # image rows per program (warpgroup MMA)
BLOCK_CU = 64    # class rows per program of the dU pass
BLOCK_DO = 32    # output columns per program of the dX pass (and of the dU pass where 64 leave too few programs)
BLOCK_DU = 64    # output columns per program of the dU pass: each chunk re-reads BG, so wider chunks read it less
MERGE_ROWS = 32  # images per program of the merge pass
MERGE_SPLITS = 64  # splits the merge pass loads at once (one load round up to 64 splits)
MERGE_WARPS = 4
LOSS_BLOCK = 256   # values per load of the losses' reduction


@triton.jit
def _x_tile(X, b0, B, D, d0, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.make_block_ptr(X, shape=(B, D), strides=(D, 1), offsets=(b0, d0), block_shape=(BLOCK_B, BLOCK_K),
                          order=(1, 0))
    return tl.load(p, boundary_check=(0, 1), padding_option="zero")


@triton.jit
def _dots_and_norms(X, U, b0, c0, B, C, D, EMULATE: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """<x[b], u[c]> for a [BLOCK_B, BLOCK_C] tile (zero outside) and |x[b]|^2 from the same
    loads: D streamed in BLOCK_K chunks, x read once."""
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    xx = tl.zeros([BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        x = _x_tile(X, b0, B, D, d0, BLOCK_B, BLOCK_K)
        xf = x.to(tl.float32)
        xx += tl.sum(xf * xf, axis=1)
        ut = tl.make_block_ptr(U, shape=(D, C), strides=(1, D), offsets=(d0, c0), block_shape=(BLOCK_K, BLOCK_C),
                               order=(0, 1))
        acc = _dot(x, tl.load(ut, boundary_check=(0, 1), padding_option="zero"), acc, X.dtype.element_ty, EMULATE)
    return acc, xx


@triton.jit
def _cosines(X, U, b0, c0, inv_x, B, C, D, EMULATE: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """<x^[b], u[c]> for a [BLOCK_B, BLOCK_C] tile (zero outside), D streamed in BLOCK_K chunks."""
    acc, _ = _dots_and_norms(X, U, b0, c0, B, C, D, EMULATE, BLOCK_B, BLOCK_C, BLOCK_K)
    return acc * inv_x[:, None]


@triton.jit
def _ce_fwd_kernel(
    X, U, Y, SCALE,                 # X [B, D], U [C, D], Y [B] int, SCALE [1] fp32
    PM, PL, PT, PS, XN, LOGITS,     # partials [splits, B] fp32 (max, sum, target, logit sum), XN [B], LOGITS [B, C]
    TICKET,                         # [1] int32, zeroed by the first program (ZERO_TICKET: _fwd_finish_kernel's)
    B, C, D, cls_per_split,
    STORE_LOGITS: tl.constexpr, ZERO_TICKET: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b0 = pid * BLOCK_B
    offs_b = b0 + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    y = tl.load(Y + offs_b, mask=b_ok, other=-1).to(tl.int32)
    tau = tl.load(SCALE).to(tl.float32)
    xn = tl.zeros([BLOCK_B], dtype=tl.float32)  # |x|, from the first class chunk's loads (every split has one)
    m_i = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    target = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
    c_end = tl.minimum(split * cls_per_split + cls_per_split, C)
    for c0 in range(split * cls_per_split, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < c_end
        acc, xx = _dots_and_norms(X, U, b0, c0, B, C, D, EMULATE, BLOCK_B, BLOCK_C, BLOCK_K)
        xn = tl.sqrt(xx)
        s = tau * acc * (1.0 / tl.maximum(xn, EPS))[:, None]
        s_m = tl.where(c_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_m, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_m - m_new[:, None]), axis=1)
        m_i = m_new
        target += tl.sum(tl.where(offs_c[None, :] == y[:, None], s, 0.0), axis=1)
        s_sum += tl.sum(tl.where(c_ok[None, :], s, 0.0), axis=1)
        if STORE_LOGITS:
            tl.store(LOGITS + offs_b[:, None] * C + offs_c[None, :], s.to(LOGITS.dtype.element_ty),
                     mask=b_ok[:, None] & c_ok[None, :])
    tl.store(PM + split * B + offs_b, m_i, mask=b_ok)
    tl.store(PL + split * B + offs_b, l_i, mask=b_ok)
    tl.store(PT + split * B + offs_b, target, mask=b_ok)
    tl.store(PS + split * B + offs_b, s_sum, mask=b_ok)
    if split == 0:
        tl.store(XN + offs_b, xn, mask=b_ok)
    if ZERO_TICKET:
        if (pid == 0) & (split == 0):
            tl.store(TICKET, 0)


@triton.jit
def _ce_merge_kernel(PM, PL, PT, PS, LSE, ROWS, B, C, SPLITS, ls, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    """lse [B] and the per-image loss ROWS [B] from the splits' partials: BLOCK_S splits per
    load, so that one round of loads (not one per split) covers up to BLOCK_S splits."""
    _merge(tl.program_id(0), PM, PL, PT, PS, LSE, ROWS, B, C, SPLITS, ls, BLOCK, BLOCK_S)


@triton.jit
def _fwd_finish_kernel(PM, PL, PT, PS, LSE, ROWS, B, C, SPLITS, ls, MERGE_PROGRAMS,
                       VV, VF, VA, VB, DELTA, BETA, ZN, COS, PV, LOSSP, CM, M, DSPLITS, DIST_PROGRAMS,
                       TICKET, LOSS, CE, DIST, inv_cm, alpha,
                       BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, DIST_BLOCK: tl.constexpr,
                       LOSS_BLOCK: tl.constexpr):
    """The head's forward finish in one launch: programs below MERGE_PROGRAMS merge the CE
    partials (_ce_merge_kernel), programs below DIST_PROGRAMS finish the distillation
    (text_head._distill_finish_kernel), and the program that finishes last reduces the
    losses (_losses_kernel): three small passes, one launch. TICKET [1] int32 counts the
    programs done; ce_forward's first program zeroed it earlier in the stream (no host op)."""
    pid = tl.program_id(0)
    if pid < MERGE_PROGRAMS:
        _merge(pid, PM, PL, PT, PS, LSE, ROWS, B, C, SPLITS, ls, BLOCK, BLOCK_S)
    if pid < DIST_PROGRAMS:
        _distill_finish(pid, VV, VF, VA, VB, DELTA, BETA, ZN, COS, PV, LOSSP, CM, M, DSPLITS, DIST_BLOCK)
    # every thread's stores of ROWS / LOSSP before the ticket; acq_rel at GPU scope publishes them
    # to, and orders them before the loads of, the program that takes the last ticket
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKET, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) - 1:
        _losses(ROWS, B, LOSSP, DIST_PROGRAMS, inv_cm, alpha, LOSS, CE, DIST, LOSS_BLOCK)


@triton.jit
def _merge(pid, PM, PL, PT, PS, LSE, ROWS, B, C, SPLITS, ls, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < B
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK], dtype=tl.float32)
    target = tl.zeros([BLOCK], dtype=tl.float32)
    s_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        idx = ss[:, None] * B + offs[None, :]
        msk = (ss[:, None] < SPLITS) & ok[None, :]
        pm = tl.load(PM + idx, mask=msk, other=float("-inf"))
        pl = tl.load(PL + idx, mask=msk, other=0.0)
        target += tl.sum(tl.load(PT + idx, mask=msk, other=0.0), axis=0)
        s_sum += tl.sum(tl.load(PS + idx, mask=msk, other=0.0), axis=0)
        m_new = tl.maximum(m, tl.max(pm, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past B: no inf - inf
        l = l * tl.exp(m - m_ref) + tl.sum(pl * tl.exp(pm - m_ref[None, :]), axis=0)
        m = m_new
    lse = m + tl.log(tl.where(ok, l, 1.0))  # rows past B: no log(0)
    tl.store(LSE + offs, lse, mask=ok)
    tl.store(ROWS + offs, lse - (1.0 - ls) * target - (ls / C) * s_sum, mask=ok)


@triton.jit
def _losses_kernel(ROWS, B, DISTP, N_DIST, inv_cm, alpha, LOSS, CE, DIST, BLOCK: tl.constexpr):
    """ce = mean(ROWS), dist = inv_cm * sum(DISTP), loss = ce + alpha dist (one program)."""
    _losses(ROWS, B, DISTP, N_DIST, inv_cm, alpha, LOSS, CE, DIST, BLOCK)


@triton.jit
def _losses(ROWS, B, DISTP, N_DIST, inv_cm, alpha, LOSS, CE, DIST, BLOCK: tl.constexpr):
    # .cg: read at L2, where other programs of the same launch stored them (_fwd_finish_kernel)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for b0 in range(0, B, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        acc += tl.load(ROWS + offs, mask=offs < B, other=0.0, cache_modifier=".cg")
    dacc = tl.zeros([BLOCK], dtype=tl.float32)
    for d0 in range(0, N_DIST, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        dacc += tl.load(DISTP + offs, mask=offs < N_DIST, other=0.0, cache_modifier=".cg")
    ce = tl.sum(acc, axis=0) / tl.maximum(B, 1)
    dist = tl.sum(dacc, axis=0) * inv_cm
    tl.store(CE, ce)
    tl.store(DIST, dist)
    tl.store(LOSS, ce + alpha * dist)


@triton.jit
def _ce_grad_kernel(
    X, U, Y, SCALE, LSE, XN, GLOSS, GCE, GL,  # dL/dL_ce = w_loss GLOSS + GCE ([1] each); GL [B, C] logits gradient
    BG, DSCALE,                          # BG [B, C] = B G in X's dtype; DSCALE [programs] partial sums of B G s/tau
    B, C, D, cls_per_split, ls, w_loss,
    HAS_GL: tl.constexpr, NEED_SCALE: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b0 = pid * BLOCK_B
    offs_b = b0 + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    inv_x = 1.0 / tl.maximum(tl.load(XN + offs_b, mask=b_ok, other=1.0), EPS)
    y = tl.load(Y + offs_b, mask=b_ok, other=-1).to(tl.int32)
    lse = tl.load(LSE + offs_b, mask=b_ok, other=0.0)
    tau = tl.load(SCALE).to(tl.float32)
    g = w_loss * tl.load(GLOSS) + tl.load(GCE)
    dscale = tl.zeros([BLOCK_B], dtype=tl.float32)
    c_end = tl.minimum(split * cls_per_split + cls_per_split, C)
    for c0 in range(split * cls_per_split, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        ok = b_ok[:, None] & (offs_c[None, :] < c_end)
        cos = _cosines(X, U, b0, c0, inv_x, B, C, D, EMULATE, BLOCK_B, BLOCK_C, BLOCK_K)
        p = tl.exp(tau * cos - lse[:, None])
        q = tl.where(offs_c[None, :] == y[:, None], 1.0 - ls, 0.0) + ls / C
        bg = g * (p - q)
        if HAS_GL:
            bg += B * tl.load(GL + offs_b[:, None] * C + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)
        bg = tl.where(ok, bg, 0.0)
        tl.store(BG + offs_b[:, None] * C + offs_c[None, :], bg.to(BG.dtype.element_ty), mask=ok)
        if NEED_SCALE:
            dscale += tl.sum(bg * cos, axis=1)
    if NEED_SCALE:
        tl.store(DSCALE + pid * tl.num_programs(1) + split, tl.sum(dscale, axis=0))


@triton.jit
def _ce_du_kernel(
    X, XN, BG, SCALE, DU,                # DU [C, D] = (tau/B) (BG)^T x^
    U, T, PTG, PUT, PUG,                 # SWEEP: U [C, D] the class features, T [C, M, D] strided, partials
    B, C, D, M, stc, stm, std,
    EMULATE: tl.constexpr, SWEEP: tl.constexpr, SWEEP_M: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    c0 = tl.program_id(0) * BLOCK_C
    chunk = tl.program_id(1)
    o0 = chunk * BLOCK_DO
    acc = tl.zeros([BLOCK_C, BLOCK_DO], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        inv_x = 1.0 / tl.maximum(tl.load(XN + offs_b, mask=offs_b < B, other=1.0), EPS)
        x_hat = _x_tile(X, b0, B, D, o0, BLOCK_B, BLOCK_DO).to(tl.float32) * inv_x[:, None]
        bgt = tl.make_block_ptr(BG, shape=(C, B), strides=(1, C), offsets=(c0, b0), block_shape=(BLOCK_C, BLOCK_B),
                                order=(0, 1))
        acc = _dot(tl.load(bgt, boundary_check=(0, 1), padding_option="zero"), x_hat, acc, X.dtype.element_ty,
                   EMULATE)
    tau = tl.load(SCALE).to(tl.float32)
    du = ((tau / B) * acc).to(DU.dtype.element_ty)
    p = tl.make_block_ptr(DU, shape=(C, D), strides=(D, 1), offsets=(c0, o0), block_shape=(BLOCK_C, BLOCK_DO),
                          order=(1, 0))
    tl.store(p, du, boundary_check=(0, 1))
    if SWEEP:
        # the text backward's sums over D (text_head._text_bwd_kernel, SWEPT), over this chunk of
        # columns: <t, gu> and <u^, t> per prompt row, <u^, gu> per class, with gu = dU as stored.
        # The rows of T read once here instead of once per output chunk of the text backward.
        offs_c = c0 + tl.arange(0, BLOCK_C)
        offs_o = o0 + tl.arange(0, BLOCK_DO)
        c_ok = offs_c < C
        o_ok = offs_o < D
        gu = du.to(tl.float32)
        uh = tl.load(U + offs_c[:, None] * D + offs_o[None, :], mask=c_ok[:, None] & o_ok[None, :],
                     other=0.0).to(tl.float32)
        tl.store(PUG + chunk * C + offs_c, tl.sum(uh * gu, axis=1), mask=c_ok)
        for m0 in range(0, M, SWEEP_M):
            offs_m = m0 + tl.arange(0, SWEEP_M)
            m_ok = offs_m < M
            t = tl.load(T + offs_c[:, None, None] * stc + offs_m[None, :, None] * stm + offs_o[None, None, :] * std,
                        mask=c_ok[:, None, None] & m_ok[None, :, None] & o_ok[None, None, :], other=0.0)
            t = t.to(tl.float32)
            rows = chunk * C * M + offs_c[:, None] * M + offs_m[None, :]
            ok = c_ok[:, None] & m_ok[None, :]
            tl.store(PTG + rows, tl.sum(t * gu[:, None, :], axis=2), mask=ok)
            tl.store(PUT + rows, tl.sum(t * uh[:, None, :], axis=2), mask=ok)


@triton.jit
def _ce_dx_kernel(
    U, BG, PDX,                          # PDX [splits, B, D] fp32 partial (BG) U over the split's classes
    B, C, D, cls_per_split, EMULATE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    b0 = tl.program_id(0) * BLOCK_B
    o0 = tl.program_id(1) * BLOCK_DO
    split = tl.program_id(2)
    acc = tl.zeros([BLOCK_B, BLOCK_DO], dtype=tl.float32)
    c_end = tl.minimum(split * cls_per_split + cls_per_split, C)
    for c0 in range(split * cls_per_split, c_end, BLOCK_C):
        bg = tl.make_block_ptr(BG, shape=(B, c_end), strides=(C, 1), offsets=(b0, c0),
                               block_shape=(BLOCK_B, BLOCK_C), order=(1, 0))
        u = tl.make_block_ptr(U, shape=(c_end, D), strides=(D, 1), offsets=(c0, o0),
                              block_shape=(BLOCK_C, BLOCK_DO), order=(1, 0))
        acc = _dot(tl.load(bg, boundary_check=(0, 1), padding_option="zero"),
                   tl.load(u, boundary_check=(0, 1), padding_option="zero"), acc, BG.dtype.element_ty, EMULATE)
    offs_b = b0 + tl.arange(0, BLOCK_B)
    offs_o = o0 + tl.arange(0, BLOCK_DO)
    # a masked store: rows past B must not land in the next split's rows
    tl.store(PDX + (split * B + offs_b[:, None]) * D + offs_o[None, :], acc,
             mask=(offs_b[:, None] < B) & (offs_o[None, :] < D))


@triton.jit
def _ce_dx_finish_kernel(X, XN, PDX, SCALE, DX, B, D, SPLITS, BLOCK_D: tl.constexpr):
    """dX[b] = nb(x^[b], (tau/B) sum_splits PDX[:, b], |x[b]|), one image per program."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(PDX + (s * B + b) * D + offs, mask=ok, other=0.0)
    xn = tl.load(XN + b)
    x_hat = tl.load(X + b * D + offs, mask=ok, other=0.0).to(tl.float32) / tl.maximum(xn, EPS)
    dx_hat = (tl.load(SCALE).to(tl.float32) / B) * acc
    proj = tl.where(xn >= EPS, tl.sum(x_hat * dx_hat, axis=0), 0.0)
    tl.store(DX + b * D + offs, ((dx_hat - x_hat * proj) / tl.maximum(xn, EPS)).to(DX.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- launch configuration

_CONFIGS: dict = {}  # (B, C, D, tunables) -> ce_config's answer
_CONFIGS_KEPT = 256


def ce_config(B: int, C: int, D: int) -> dict:
    """``build_ce_config``'s answer for these sizes, worked out once and kept (a pure function
    of them): the triton backend's capability question computes it to answer
    (demul_fast.ops.triton_ops.capability), and the forward and backward launches read it
    back. The dict is shared: read it, never change it. Under torch.compile it is built
    afresh (the question is asked once per trace, not per call). Raises ValueError for D > MAX_D."""
    if torch.compiler.is_compiling():  # traced code asks once per trace: no cache for guards to watch
        return build_ce_config(B, C, D)
    # the sizes, and the module's tunables
    key = (B, C, D, BLOCK_B, BLOCK_CU, BLOCK_DO, BLOCK_DU, MERGE_ROWS, MERGE_SPLITS, TARGET_PROGRAMS, WAVE_SHARE,
           launch.MAX_D)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        if len(_CONFIGS) >= _CONFIGS_KEPT:
            _CONFIGS.clear()
        cfg = _CONFIGS[key] = build_ce_config(B, C, D)
    return cfg


def build_ce_config(B: int, C: int, D: int) -> dict:
    """Block sizes and grids: class tiles of the widest BLOCK_C (64 down to 16) whose grid
    still covers one wave, class splits until it does (forward and grad pass), and class
    splits of the dX pass likewise."""
    block_d = launch.block_d(D)
    b_tiles = triton.cdiv(B, BLOCK_B)
    wave = int(TARGET_PROGRAMS * WAVE_SHARE)  # every program reads its image tile: the fewest that cover this
    block_c = 16
    for cand in (64, 32):  # 128 spills in the grad pass
        if b_tiles * triton.cdiv(C, cand) >= wave:
            block_c = cand
            break
    c_tiles = triton.cdiv(C, block_c)
    # tiles per split rounded down, so that the splits are at least the wave's share
    cls_per_split = block_c * max(1, c_tiles // triton.cdiv(wave, b_tiles))
    out_chunks = triton.cdiv(D, BLOCK_DO)
    du_tiles = triton.cdiv(C, BLOCK_CU)
    block_du = BLOCK_DU if du_tiles * triton.cdiv(D, BLOCK_DU) >= wave else BLOCK_DO
    dx_tiles = triton.cdiv(C, BLOCK_CU)
    dx_cls = BLOCK_CU * max(1, dx_tiles // triton.cdiv(TARGET_PROGRAMS, b_tiles * out_chunks))
    return dict(b_tiles=b_tiles, BLOCK_C=block_c, splits=triton.cdiv(C, cls_per_split), cls_per_split=cls_per_split,
                BLOCK_K=64 if D >= 64 else max(16, triton.next_power_of_2(D)), out_chunks=out_chunks,
                du_tiles=du_tiles, BLOCK_DU=block_du, du_chunks=triton.cdiv(D, block_du), dx_splits=triton.cdiv(C, dx_cls), dx_cls=dx_cls,
                merge_programs=triton.cdiv(B, MERGE_ROWS), BLOCK_D=block_d,
                BLOCK_S=min(MERGE_SPLITS, triton.next_power_of_2(triton.cdiv(C, cls_per_split))))


def merge_constexprs(cfg: dict) -> dict:
    """The merge pass's block sizes for a ce_config."""
    return dict(BLOCK=MERGE_ROWS, BLOCK_S=cfg["BLOCK_S"])


def ce_forward(X, U, y, scale, ls: float, return_logits: bool, dist: Optional[text_head.DistillPartials] = None,
               alpha: Optional[float] = None, rows_dist: int = 1):
    """X [B, D], U [C, D] (contiguous), y [B] int, scale [1] fp32.
    Returns (per-image loss [B], lse [B], |x| [B] (fp32), logits [B, C] in X.dtype or None).
    With ``alpha`` (the head) its merge launch also reduces the losses (``losses``: loss = ce
    + alpha dist, dist over ``rows_dist`` rows) and, with ``dist`` (text_head.text_forward(...,
    finish=False)), finishes the distillation; (|z|, cos, per-program sums of (1 - cos), PV),
    None without ``dist``, and (loss, ce, dist) [] fp32 follow."""
    if dist is not None and alpha is None:
        raise ValueError("ce_forward: dist (the distillation partials) needs alpha (the losses run in its finish)")
    B, D = X.shape
    C = U.shape[0]
    cfg = ce_config(B, C, D)
    dev = X.device
    f32 = dict(dtype=torch.float32, device=dev)
    parts = [launch.new_output((cfg["splits"], B), **f32) for _ in range(4)]
    xn = launch.new_output((B,), **f32)
    logits = launch.new_output((B, C), X.dtype, dev) if return_logits else None
    fold = alpha is not None
    ticket = launch.new_output((1,), torch.int32, dev) if fold else xn
    _ce_fwd_kernel[(cfg["b_tiles"], cfg["splits"])](
        X, U, y, scale, *parts, xn, logits if return_logits else xn, ticket, B, C, D, cfg["cls_per_split"],
        STORE_LOGITS=return_logits, ZERO_TICKET=fold, EMULATE=launch.emulate_dot(X.dtype), BLOCK_B=BLOCK_B,
        BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"], num_warps=4)
    lse, rows = launch.new_output((B,), **f32), launch.new_output((B,), **f32)
    merge = (*parts, lse, rows, B, C, cfg["splits"], launch.fp32_scalar(ls))
    if not fold:
        _ce_merge_kernel[(cfg["merge_programs"],)](*merge, **merge_constexprs(cfg), num_warps=MERGE_WARPS)
        return rows, lse, xn, logits
    out = [launch.new_output((), torch.float32, dev) for _ in range(3)]
    if dist is not None:
        zn, cos, pv, loss_parts, args = text_head.finish_args(dist)
        n_dist = loss_parts.shape[0]
    else:  # no distillation: its programs do nothing, its pointers are never read
        zn = cos = pv = loss_parts = None
        args = (xn,) * 10 + (0, 1, 0)
        n_dist = 0
    programs = max(cfg["merge_programs"], n_dist)
    _fwd_finish_kernel[(programs,)](*merge, cfg["merge_programs"], *args, n_dist, ticket, *out,
                                    1.0 / max(rows_dist, 1), launch.fp32_scalar(alpha), **merge_constexprs(cfg),
                                    DIST_BLOCK=text_head.FINISH_BLOCK, LOSS_BLOCK=LOSS_BLOCK, num_warps=MERGE_WARPS)
    return (rows, lse, xn, logits, zn, cos, loss_parts, pv, *out)


def losses(rows, dist_parts, rows_dist: int, alpha: float, device):
    """(loss, ce, dist) [] fp32 from the per-image CE losses [B] (or None) and the
    distillation's per-program sums of (1 - cos) (or None), in one launch."""
    out = [launch.new_output((), torch.float32, device) for _ in range(3)]
    dummy = out[0]
    _losses_kernel[(1,)](rows if rows is not None else dummy, rows.shape[0] if rows is not None else 0,
                         dist_parts if dist_parts is not None else dummy,
                         dist_parts.shape[0] if dist_parts is not None else 0, 1.0 / max(rows_dist, 1),
                         launch.fp32_scalar(alpha), *out, BLOCK=LOSS_BLOCK, num_warps=4)
    return out


def ce_backward(X, U, y, scale, lse, xn, grad_ce, grad_logits, ls: float, need_dx: bool, du_dtype=None,
                grad_loss=None, w_loss: float = 0.0, need_scale: bool = True, sweep_t=None, sweep_u=None):
    """dL/dL_ce = w_loss grad_loss + grad_ce (fp32 [1] tensors, read by the kernel: no torch
    op to combine them); grad_logits [B, C] contiguous or None.
    With ``sweep_t`` (the head: T [C, M, D], whose aggregation gave U) the dU pass also sums
    the text backward's <t, dU>, <u^, t> per row and <u^, dU> per class over its chunk of
    columns (text_head.text_backward's ``swept``), with u^ = ``sweep_u`` (default U; the head
    passes the float32 u^ there and u^ in X's type as U).
    Returns (dU [C, D] in du_dtype (default U.dtype), d scale [] fp32 or None (not
    need_scale: no work for it), dX [B, D] or None[, text_head.Swept with sweep_t])."""
    B, D = X.shape
    C = U.shape[0]
    cfg = ce_config(B, C, D)
    dev = X.device
    emulate = launch.emulate_dot(X.dtype)
    has_gl = grad_logits is not None
    bg = launch.new_output((B, C), X.dtype, dev)
    dscale = launch.new_output((cfg["b_tiles"] * cfg["splits"],), torch.float32, dev) if need_scale else bg
    _ce_grad_kernel[(cfg["b_tiles"], cfg["splits"])](
        X, U, y, scale, lse, xn, grad_ce if grad_loss is None else grad_loss, grad_ce,
        grad_logits if has_gl else bg, bg, dscale, B, C, D, cfg["cls_per_split"],
        launch.fp32_scalar(ls), launch.fp32_scalar(w_loss), HAS_GL=has_gl, NEED_SCALE=need_scale, EMULATE=emulate,
        BLOCK_B=BLOCK_B,
        BLOCK_C=cfg["BLOCK_C"],
        BLOCK_K=cfg["BLOCK_K"], num_warps=4)
    dU = launch.new_output((C, D), du_dtype or U.dtype, dev)
    swept = None
    if sweep_t is not None:
        if sweep_t.shape[0] != C or sweep_t.shape[2] != D:
            raise ValueError(f"ce_backward: sweep_t {tuple(sweep_t.shape)} is not [C={C}, M, D={D}]")
        M = sweep_t.shape[1]
        f32 = dict(dtype=torch.float32, device=dev)
        swept = text_head.Swept(launch.new_output((cfg["du_chunks"], C * M), **f32),
                                launch.new_output((cfg["du_chunks"], C * M), **f32),
                                launch.new_output((cfg["du_chunks"], C), **f32), cfg["du_chunks"])
    M = sweep_t.shape[1] if swept else 1
    _ce_du_kernel[(cfg["du_tiles"], cfg["du_chunks"])](
        X, xn, bg, scale, dU, U if sweep_u is None else sweep_u, sweep_t if swept else dU, *(swept[:3] if swept else (dU,) * 3), B, C, D, M,
        *(sweep_t.stride() if swept else (0, 0, 0)), EMULATE=emulate, SWEEP=swept is not None,
        SWEEP_M=sweep_rows(M, cfg["BLOCK_DU"]), BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_CU, BLOCK_DO=cfg["BLOCK_DU"],
        num_warps=SWEEP_WARPS if swept else 4)
    dX = None
    if need_dx:
        pdx = launch.new_output((cfg["dx_splits"], B, D), torch.float32, dev)
        _ce_dx_kernel[(cfg["b_tiles"], cfg["out_chunks"], cfg["dx_splits"])](
            U, bg, pdx, B, C, D, cfg["dx_cls"], EMULATE=emulate, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_CU,
            BLOCK_DO=BLOCK_DO, num_warps=4)
        dX = launch.new_output((B, D), X.dtype, dev)
        _ce_dx_finish_kernel[(B,)](X, xn, pdx, scale, dX, B, D, cfg["dx_splits"], BLOCK_D=cfg["BLOCK_D"],
                                   num_warps=4)
    out = (dU, (dscale.sum() / B if need_scale else None), dX)
    return out + (swept,) if sweep_t is not None else out


SWEEP_WARPS = 8     # warps of the dU pass with the sweep (ptxas sm_90a, imagenet: 205 registers, no spill)
SWEEP_ELEMS = 16384  # T elements per load round of its sweep (64 float32 registers a thread at 8 warps; 4 rows
#                      of 64 classes x 64 columns; 8 rows spill 1.2 KB)


def sweep_rows(M: int, block_do: int) -> int:
    """Prompt rows per class per load round of the dU pass's sweep (a power of two)."""
    return max(1, min(triton.next_power_of_2(M), SWEEP_ELEMS // (BLOCK_CU * block_do)))
