"""The prefix-shared attention of one text layer on packed rows, one launch forward and one
backward (docs/SPEC.md section 3.1; demul_fast/prefix_attention.py describes the layout).

Rows: the G prefixes of P rows first (group g at rows g*P ..), then the packed suffix rows of
the G*N sequences (sequence (g, n) owns ``len`` consecutive rows). A suffix query at suffix
position t attends to its group's P prefix keys and, causally, to its own suffix keys 0..t;
a prefix query at position u to the prefix keys 0..u. Queries, keys and values are read
straight from the packed rows (any row stride: views of the qkv product's output), outputs
are written to the packed rows: no padded slots, no broadcast key blocks.

Two tables (int32, built at plan time) describe the layout:

* ``seq_table [NS, 4]``: per sequence (out_row0, src_row0, len, prefix_row0): its rows in
  the outputs (out, lse, dq, dk, dv) start at out_row0, in the inputs (q, k, v) at src_row0
  (they differ where the inputs hold one group's suffix rows for every group: the first
  layer's shared suffix), and its group's prefix rows at prefix_row0;
* ``grp_table [G, 4]``: per group (prefix_row0, suffix_out_row0, suffix_rows,
  suffix_src_row0): its prefix rows and the contiguous range of its suffix rows.

Forward, grid (NS + G, heads): a program per (sequence, head) for its suffix queries and per
(group, head) for the group's prefix queries; online softmax in float32 (exp2), output in the
input dtype, lse = log-sum-exp of the scaled scores in float32 [rows, heads].
Backward, grid (NS + G, heads), deterministic (no atomics): a sequence program writes dq of
its queries and dk/dv of its own suffix keys; a group program writes dq of its prefix queries
and dk/dv of its prefix keys, summed over every query of the group (its prefix queries and all
its sequences' suffix queries, a contiguous row range) inside the program.
delta = rowsum(dO * O) is computed from the stored output, as flash attention does.

All products run in float32 (half-precision operands are upcast, exactly): the attention is
about 1 % of a text layer's FLOPs here (4W per key against 24W^2 per row), so the tensor
cores buy little and float32 keeps the probabilities and dS unrounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch

BLOCK_M = 16   # query rows per block (suffixes are short: about 6 rows on average for CoOp's class names)
BLOCK_N = 16   # keys per block
FWD_WARPS, BWD_WARPS, STAGES = 4, 8, 2  # sm_90a, ptxas -v: no spills (the float32 backward spills at 4 warps)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _rows(base, rows, ok, stride, col0, HD: tl.constexpr, BLOCK_D: tl.constexpr):
    """[len(rows), BLOCK_D] float32 tile of columns col0 .. col0 + HD of the given rows (0 elsewhere)."""
    d = tl.arange(0, BLOCK_D)
    ptr = base + rows[:, None].to(tl.int64) * stride + col0 + d[None, :]
    return tl.load(ptr, mask=ok[:, None] & (d[None, :] < HD), other=0.0).to(tl.float32)


@triton.jit
def _store_rows(base, rows, ok, stride, col0, x, HD: tl.constexpr, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    ptr = base + rows[:, None].to(tl.int64) * stride + col0 + d[None, :]
    tl.store(ptr, x.to(base.dtype.element_ty), mask=ok[:, None] & (d[None, :] < HD))


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _fwd_keys(q, qpos, m, l, acc, K, V, sk, sv, key_row0, kpos0, nkeys, col0, scale2,
              HD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online-softmax update over nkeys keys at rows key_row0.., positions kpos0.. (causal)."""
    for n0 in range(0, nkeys, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        kok = j < nkeys
        k = _rows(K, key_row0 + j, kok, sk, col0, HD, BLOCK_D)
        v = _rows(V, key_row0 + j, kok, sv, col0, HD, BLOCK_D)
        s = _dot(q, tl.trans(k)) * scale2
        vis = kok[None, :] & ((kpos0 + j)[None, :] <= qpos[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v)
        m = m_new
    return m, l, acc


@triton.jit
def _fwd_block(Q, K, V, O, LSE, sq, sk, sv, so, h, H, q_src0, out0, nq, qpos0, p0, n_pre, s_src0, n_suf, P,
               scale2, HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.arange(0, BLOCK_M)
    ok = i < nq
    qpos = qpos0 + i
    col0 = h * HD
    q = _rows(Q, q_src0 + i, ok, sq, col0, HD, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m, l, acc = _fwd_keys(q, qpos, m, l, acc, K, V, sk, sv, p0, 0, n_pre, col0, scale2, HD, BLOCK_N, BLOCK_D)
    m, l, acc = _fwd_keys(q, qpos, m, l, acc, K, V, sk, sv, s_src0, P, n_suf, col0, scale2, HD, BLOCK_N, BLOCK_D)
    l_safe = tl.where(ok, l, 1.0)
    _store_rows(O, out0 + i, ok, so, col0, acc / l_safe[:, None], HD, BLOCK_D)
    lse = (m + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + (out0 + i).to(tl.int64) * H + h, lse, mask=ok)


@triton.jit
def _prefix_attention_fwd(Q, K, V, O, LSE, SEQ, GRP, NS, P, H, sq, sk, sv, so, scale2,
                          HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if pid < NS:  # a sequence: its suffix queries over [group prefix ; own suffix, causal]
        out0 = tl.load(SEQ + pid * 4)
        src0 = tl.load(SEQ + pid * 4 + 1)
        L = tl.load(SEQ + pid * 4 + 2)
        p0 = tl.load(SEQ + pid * 4 + 3)
        for t0 in range(0, L, BLOCK_M):
            _fwd_block(Q, K, V, O, LSE, sq, sk, sv, so, h, H, src0 + t0, out0 + t0, tl.minimum(L - t0, BLOCK_M),
                       P + t0, p0, P, src0, tl.minimum(L, t0 + BLOCK_M), P, scale2, HD, BLOCK_M, BLOCK_N, BLOCK_D)
    else:  # a group: its prefix queries, causal over the prefix keys
        g = pid - NS
        p0 = tl.load(GRP + g * 4)
        for t0 in range(0, P, BLOCK_M):
            _fwd_block(Q, K, V, O, LSE, sq, sk, sv, so, h, H, p0 + t0, p0 + t0, tl.minimum(P - t0, BLOCK_M),
                       t0, p0, tl.minimum(P, t0 + BLOCK_M), p0, 0, P, scale2, HD, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _query_tile(Q, O, DO, LSE, sq, so, sdo, h, H, q_src0, out0, nq, col0,
                HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(q, dO, lse * log2 e, delta = rowsum(dO * O), row ok) of a query block."""
    i = tl.arange(0, BLOCK_M)
    ok = i < nq
    q = _rows(Q, q_src0 + i, ok, sq, col0, HD, BLOCK_D)
    do = _rows(DO, out0 + i, ok, sdo, col0, HD, BLOCK_D)
    o = _rows(O, out0 + i, ok, so, col0, HD, BLOCK_D)
    lse2 = tl.load(LSE + (out0 + i).to(tl.int64) * H + h, mask=ok, other=float("inf")) * 1.4426950408889634
    return q, do, lse2, tl.sum(do * o, 1), ok


@triton.jit
def _probs(q, k, v, do, lse2, delta, vis, scale2):
    """p = softmax probabilities (0 where not visible) and ds = p (dp - delta) of a tile."""
    s = _dot(q, tl.trans(k)) * scale2
    p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
    dp = _dot(do, tl.trans(v))
    return p, p * (dp - delta[:, None])


@triton.jit
def _dkdv_queries(dk, dv, k, v, j, kpos0, kok, Q, O, DO, LSE, sq, so, sdo, h, H, q_src0, out0, nrows, qpos0, t_start,
                  col0, scale2, HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv of one key block accumulated over the query rows t_start..nrows of a range
    (rows q_src0 + t / out0 + t, positions qpos0 + t; causal)."""
    for t0 in range(t_start, nrows, BLOCK_M):
        q, do, lse2, delta, ok = _query_tile(Q, O, DO, LSE, sq, so, sdo, h, H, q_src0 + t0, out0 + t0,
                                             nrows - t0, col0, HD, BLOCK_M, BLOCK_D)
        qpos = qpos0 + t0 + tl.arange(0, BLOCK_M)
        vis = ok[:, None] & kok[None, :] & ((kpos0 + j)[None, :] <= qpos[:, None])
        p, ds = _probs(q, k, v, do, lse2, delta, vis, scale2)
        dv += _dot(tl.trans(p), do)
        dk += _dot(tl.trans(ds), q)
    return dk, dv


@triton.jit
def _dq_keys(dq, q, do, lse2, delta, ok, qpos, K, V, sk, sv, key_row0, kpos0, nkeys, col0, scale2,
             HD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    for n0 in range(0, nkeys, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        kok = j < nkeys
        k = _rows(K, key_row0 + j, kok, sk, col0, HD, BLOCK_D)
        v = _rows(V, key_row0 + j, kok, sv, col0, HD, BLOCK_D)
        vis = ok[:, None] & kok[None, :] & ((kpos0 + j)[None, :] <= qpos[:, None])
        p, ds = _probs(q, k, v, do, lse2, delta, vis, scale2)
        dq += _dot(ds, k)
    return dq


@triton.jit
def _key_block(K, V, row0, n0, count, sk, sv, col0, HD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Key block n0 .. n0 + BLOCK_N of `count` keys at rows row0 + j: (j, ok, k, v)."""
    j = n0 + tl.arange(0, BLOCK_N)
    ok = j < count
    return j, ok, _rows(K, row0 + j, ok, sk, col0, HD, BLOCK_D), _rows(V, row0 + j, ok, sv, col0, HD, BLOCK_D)


@triton.jit
def _store_dkdv(DK, DV, rows, ok, sd, col0, dk, dv, scale, HD: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk (scaled) and dv of a key block into their rows."""
    _store_rows(DK, rows, ok, sd, col0, dk * scale, HD, BLOCK_D)
    _store_rows(DV, rows, ok, sd, col0, dv, HD, BLOCK_D)


@triton.jit
def _prefix_attention_bwd(Q, K, V, O, LSE, DO, DQ, DK, DV, SEQ, GRP, NS, P, H, sq, sk, sv, so, sdo, sd, scale,
                          scale2, HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    col0 = h * HD
    if pid < NS:
        out0 = tl.load(SEQ + pid * 4)
        src0 = tl.load(SEQ + pid * 4 + 1)
        L = tl.load(SEQ + pid * 4 + 2)
        p0 = tl.load(SEQ + pid * 4 + 3)
        # dk, dv of the sequence's own suffix keys: only its own queries see them
        for n0 in range(0, L, BLOCK_N):
            j, kok, k, v = _key_block(K, V, src0, n0, L, sk, sv, col0, HD, BLOCK_N, BLOCK_D)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dk, dv = _dkdv_queries(dk, dv, k, v, j, P, kok, Q, O, DO, LSE, sq, so, sdo, h, H, src0, out0, L, P,
                                   (n0 // BLOCK_M) * BLOCK_M, col0, scale2, HD, BLOCK_M, BLOCK_D)
            _store_dkdv(DK, DV, out0 + j, kok, sd, col0, dk, dv, scale, HD, BLOCK_D)
        # dq of its queries: over the group's prefix keys and its own suffix keys
        for t0 in range(0, L, BLOCK_M):
            q, do, lse2, delta, ok = _query_tile(Q, O, DO, LSE, sq, so, sdo, h, H, src0 + t0, out0 + t0, L - t0,
                                                 col0, HD, BLOCK_M, BLOCK_D)
            qpos = P + t0 + tl.arange(0, BLOCK_M)
            dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            dq = _dq_keys(dq, q, do, lse2, delta, ok, qpos, K, V, sk, sv, p0, 0, P, col0, scale2, HD, BLOCK_N,
                          BLOCK_D)
            dq = _dq_keys(dq, q, do, lse2, delta, ok, qpos, K, V, sk, sv, src0, P, tl.minimum(L, t0 + BLOCK_M),
                          col0, scale2, HD, BLOCK_N, BLOCK_D)
            _store_rows(DQ, out0 + t0 + tl.arange(0, BLOCK_M), ok, sd, col0, dq * scale, HD, BLOCK_D)
    else:
        g = pid - NS
        p0 = tl.load(GRP + g * 4)
        s_out0 = tl.load(GRP + g * 4 + 1)
        s_rows = tl.load(GRP + g * 4 + 2)
        s_src0 = tl.load(GRP + g * 4 + 3)
        # dk, dv of the prefix keys, summed over every query of the group
        for n0 in range(0, P, BLOCK_N):
            j, kok, k, v = _key_block(K, V, p0, n0, P, sk, sv, col0, HD, BLOCK_N, BLOCK_D)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dk, dv = _dkdv_queries(dk, dv, k, v, j, 0, kok, Q, O, DO, LSE, sq, so, sdo, h, H, p0, p0, P, 0,
                                   (n0 // BLOCK_M) * BLOCK_M, col0, scale2, HD, BLOCK_M, BLOCK_D)
            # every suffix query of the group sees every prefix key (its position is >= P)
            dk, dv = _dkdv_queries(dk, dv, k, v, j, 0, kok, Q, O, DO, LSE, sq, so, sdo, h, H, s_src0, s_out0,
                                   s_rows, P, 0, col0, scale2, HD, BLOCK_M, BLOCK_D)
            _store_dkdv(DK, DV, p0 + j, kok, sd, col0, dk, dv, scale, HD, BLOCK_D)
        # dq of the prefix queries
        for t0 in range(0, P, BLOCK_M):
            q, do, lse2, delta, ok = _query_tile(Q, O, DO, LSE, sq, so, sdo, h, H, p0 + t0, p0 + t0, P - t0,
                                                 col0, HD, BLOCK_M, BLOCK_D)
            qpos = t0 + tl.arange(0, BLOCK_M)
            dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            dq = _dq_keys(dq, q, do, lse2, delta, ok, qpos, K, V, sk, sv, p0, 0, tl.minimum(P, t0 + BLOCK_M),
                          col0, scale2, HD, BLOCK_N, BLOCK_D)
            _store_rows(DQ, p0 + t0 + tl.arange(0, BLOCK_M), ok, sd, col0, dq * scale, HD, BLOCK_D)


def _check_rows(x: torch.Tensor) -> int:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"expected a [rows, W] tensor with unit column stride, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    return x.stride(0)


def _meta(heads: int, width: int):
    hd = width // heads
    return dict(HD=hd, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(hd)))


def forward(q, k, v, seq_table, grp_table, heads: int, p: int, rows: int):
    """-> (out [rows, W] in q's dtype, lse [rows, heads] float32), one launch."""
    w = q.shape[1]
    out = launch.new_output((rows, w), q.dtype, q.device)
    lse = launch.new_output((rows, heads), torch.float32, q.device)
    ns, g = seq_table.shape[0], grp_table.shape[0]
    scale = (w // heads) ** -0.5
    _prefix_attention_fwd[(ns + g, heads)](
        q, k, v, out, lse, seq_table, grp_table, ns, p, heads, _check_rows(q), _check_rows(k), _check_rows(v),
        out.stride(0), launch.fp32_scalar(scale * LOG2E), num_warps=FWD_WARPS, num_stages=STAGES,
        **_meta(heads, w))
    return out, lse


def backward(q, k, v, out, lse, grad, seq_table, grp_table, heads: int, p: int, rows: int, dtype=None):
    """-> dqkv [rows, 3W] in ``dtype`` (default q's; output row order): dq, dk, dv side by side
    (the gradient of a qkv product's output as it is), one launch."""
    w = q.shape[1]
    dqkv = launch.new_output((rows, 3 * w), dtype or q.dtype, q.device)
    dq, dk, dv = dqkv[:, :w], dqkv[:, w:2 * w], dqkv[:, 2 * w:]
    ns, g = seq_table.shape[0], grp_table.shape[0]
    scale = (w // heads) ** -0.5
    _prefix_attention_bwd[(ns + g, heads)](
        q, k, v, out, lse, grad, dq, dk, dv, seq_table, grp_table, ns, p, heads, _check_rows(q), _check_rows(k),
        _check_rows(v), _check_rows(out), _check_rows(grad), dq.stride(0), launch.fp32_scalar(scale),
        launch.fp32_scalar(scale * LOG2E), num_warps=BWD_WARPS, num_stages=STAGES, **_meta(heads, w))
    return dqkv
