"""Attention of one layer over shared prefixes and packed suffixes (docs/SPEC.md section 3.1).

Layout of the token rows (``T = G*P + Ts``): rows ``[0, G*P)`` are the G shared prefixes of
P tokens, then the suffix tokens of all G*N sequences packed without padding (sequence
(g, n) owns ``len[g, n] = eot[g, n] + 1`` rows, in (g, n, position) order). Positions after
an EOT are dropped: the tower is causal, so they never influence a pooled result.

Each prefix attends causally to itself. Each suffix token attends to its group's P prefix
keys and, causally, to its own suffix keys: one softmax over the P + S scores, the exact
attention of the full-length sequence. Eagerly (``_SharedPrefixAttention``) the prefix
scores of all suffix queries of a group are one batched product, the suffix scores a small
product per sequence, and the prefix keys/values are never copied per sequence. Under
torch.compile every layer but the last runs ``demul_fast::prefix_attention``
(``_attend_op``; demul_fast/ops/prefix_attention.py): one custom op on the packed rows, one
Triton launch each way on CUDA, on a CPU the composite below. The last layer (EOT queries
only), and that composite, are one ``scaled_dot_product_attention`` call (``_attend``): the prefix keys and values broadcast into each
sequence's key block, an additive mask (causal, offset by P), and the prefix queries as
extra items of the same call. For the attention alone, suffixes are gathered into a padded
``[N, S]`` layout, and the broadcast key/value blocks are rebuilt in the backward instead
of kept (``_recomputed_blocks``); the linear layers around the attention run on the packed
rows (``_attend_slots`` still serves ``_attend``; ``shared_prefix_attention`` no longer runs
out_proj on its query slots).

``PackedLayout`` holds the index maps and masks (built at plan time: ``prepare``). Softmax
accumulates in ``common.accumulation_dtype`` (float32; float64 stays float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .common import accumulation_dtype
from .ops import prefix_attention as _ops_attention

Tensor = torch.Tensor


@dataclass
class PackedLayout:
    """Index maps between packed rows and the padded, head-major attention layout.

    g, p, n, s: groups, prefix length, sequences per group, padded suffix length
    eot:         [G, N] int64, EOT position of each sequence inside its suffix
    valid_slots: [Ts] int64, padded slot (g, n, position) of each packed suffix row
    pad_index:   [G*N*S] int64, packed suffix row of each padded slot (pad slots point at
                 row 0: they are masked as keys and their queries get zero weight)
    eot_rows:    [G*N] int64, packed suffix row of each sequence's EOT
    """

    g: int
    p: int
    n: int
    s: int
    eot: Tensor
    valid_slots: Tensor
    pad_index: Tensor
    eot_rows: Tensor

    def __post_init__(self):
        self._cache = {}

    @staticmethod
    def build(g: int, p: int, n: int, s: int, eot: Tensor) -> "PackedLayout":
        eot = eot.long()
        valid = torch.arange(s, device=eot.device).view(1, 1, s) <= eot.view(g, n, 1)        # [G, N, S]
        valid_slots = valid.flatten().nonzero().flatten()                                      # [Ts]
        pad_index = torch.zeros(g * n * s, dtype=torch.long, device=eot.device)
        pad_index[valid_slots] = torch.arange(valid_slots.numel(), device=eot.device)
        eot_rows = torch.cumsum((eot + 1).flatten(), 0) - 1
        return PackedLayout(g, p, n, s, eot, valid_slots, pad_index, eot_rows)

    @property
    def suffix_rows(self) -> int:
        return self.valid_slots.numel()

    def deep_rows(self, k: int) -> Tuple[Tensor, Tensor]:
        """(rows, src) for deep prompts of k tokens (MaPLe): the packed rows holding positions
        1..k of every prefix (those below P) and of every suffix (those at or after P; each
        suffix must reach past position k), and for each such row the deep prompt's row
        (position - 1). Index arithmetic only, no host read; cached."""
        key = ("deep", k)
        if key not in self._cache:
            g, p, n, s = self.g, self.p, self.n, self.s
            dev = self.eot.device
            pre = torch.arange(1, max(1, min(1 + k, p)), device=dev)                          # positions < P
            suf = torch.arange(max(1, p), max(1 + k, p), device=dev)                          # positions >= P
            pre_rows = (torch.arange(g, device=dev).view(g, 1) * p + pre.view(1, -1)).flatten()
            slots = (torch.arange(g * n, device=dev).view(-1, 1) * s + (suf - p).view(1, -1)).flatten()
            rows = torch.cat([pre_rows, g * p + self.pad_index.index_select(0, slots)])
            src = torch.cat([(pre - 1).repeat(g), (suf - 1).repeat(g * n)])
            self._cache[key] = (rows, src)
        return self._cache[key]

    def indices(self, heads: int):
        """(gather, scatter, gather_eot, scatter_eot, masks) for ``heads``:

        gather:  [G*H*P + G*H*N*S] index into the [T*H, hd] view of a row tensor, giving the
                 head-major buffer [prefix (G, H, P) ; suffix (G, H, N, S)] of hd-vectors
        scatter: [T*H] index into that buffer giving back the rows ([T, W] view)
        gather_eot / scatter_eot: the same for the G*N EOT rows only (buffer (G, H, N))
        masks: dict of bool masks, True where visible/valid: "prefix" [P, P] causal,
               "suffix" [S, S] causal, "eot" [G, 1, N, 1, S] keys up to each EOT,
               "query_valid" [G, 1, N, S, 1] False at padded query slots
        """
        if heads in self._cache:
            return self._cache[heads]
        g, p, n, s = self.g, self.p, self.n, self.s
        dev = self.eot.device
        h = torch.arange(heads, device=dev)
        n_pre = g * p
        pre_rows = torch.arange(n_pre, device=dev).view(g, 1, p)                                # [G, 1, P]
        suf_rows = (n_pre + self.pad_index).view(g, 1, n, s)                                    # [G, 1, N, S]
        gather = torch.cat([(pre_rows * heads + h.view(1, heads, 1)).flatten(),
                            (suf_rows * heads + h.view(1, heads, 1, 1)).flatten()])
        pre_slot = (torch.arange(g, device=dev).view(g, 1, 1) * heads + h.view(1, 1, heads)) * p \
            + torch.arange(p, device=dev).view(1, p, 1)                                          # [G, P, H]
        vs = self.valid_slots
        vg, vn, vpos = vs // (n * s), (vs // s) % n, vs % s
        suf_slot = g * heads * p + ((vg.view(-1, 1) * heads + h.view(1, heads)) * n + vn.view(-1, 1)) * s \
            + vpos.view(-1, 1)                                                                   # [Ts, H]
        scatter = torch.cat([pre_slot.flatten(), suf_slot.flatten()])
        gn = torch.arange(g * n, device=dev)
        gather_eot = ((gn.view(g, 1, n) * heads) + h.view(1, heads, 1)).flatten()
        scatter_eot = ((gn.view(g, n, 1) // n * heads + h.view(1, 1, heads)) * n + gn.view(g, n, 1) % n).flatten()
        positions = torch.arange(s, device=dev)
        masks = {"prefix": torch.ones(p, p, dtype=torch.bool, device=dev).tril(),
                 "suffix": torch.ones(s, s, dtype=torch.bool, device=dev).tril(),
                 "eot": positions.view(1, 1, 1, 1, s) <= self.eot.view(g, 1, n, 1, 1),
                 "query_valid": (positions.view(1, 1, s) <= self.eot.view(g, n, 1)).view(g, 1, n, s, 1)}
        self._cache[heads] = (gather, scatter, gather_eot, scatter_eot, masks)
        return self._cache[heads]

    @property
    def prefix_items(self) -> int:
        """J = ceil(P / S): the prefix queries of a group ride along as J extra items of S
        query slots each in the suffix queries' attention call (one call per layer)."""
        return -(-self.p // self.s)

    def attention_maps(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(q_rows, kv_rows, out_rows, mask) of the one attention call of a layer over
        B = G*(N+J) items of S query slots and P + S keys each, cached per dtype (plan time
        builds the encoder's; a missing one is built, uncached, inside a trace):

        q_rows:  [B*S] packed row of each query slot: item (g, n < N) slot t holds suffix
                 position t of sequence (g, n); item (g, N + j) slot t holds prefix position
                 j*S + t (pad slots point at a valid row; their outputs are never read)
        kv_rows: [G*P + B*S] packed row of each key: the G*P prefix rows, then each item's S
                 suffix keys (a prefix item reads sequence 0's, all masked)
        out_rows: [G*P + Ts] the slot of the output of each packed row (prefix rows first)
        mask:    [B, 1, S, P + S] additive (0 visible, -inf not): a suffix query at t sees the
                 P prefix keys and its own suffix keys 0..t; a prefix query at position u sees
                 prefix keys 0..u. No row is fully masked (key 0 is always visible).
        """
        key = ("maps", dtype)
        if key in self._cache:
            return self._cache[key]
        g, p, n, s, j = self.g, self.p, self.n, self.s, self.prefix_items
        dev = self.eot.device
        n_pre, items = g * p, n + j
        t = torch.arange(s, device=dev)
        gi = torch.arange(g, device=dev).view(g, 1, 1)
        suf = (n_pre + self.pad_index).view(g, n, s)                                        # [G, N, S]
        upos = (torch.arange(j, device=dev).view(1, j, 1) * s + t.view(1, 1, s))          # [1, J, S] prefix position
        pre = gi * p + torch.where(upos < p, upos, 0)                                       # [G, J, S]
        q_rows = torch.cat([suf, pre], dim=1).flatten()
        kv_rows = torch.cat([torch.arange(n_pre, device=dev), torch.cat([suf, suf[:, :1].expand(g, j, s)], 1).flatten()])
        item_slot = (gi * items + torch.arange(items, device=dev).view(1, items, 1)) * s + t.view(1, 1, s)  # [G, N+J, S]
        pre_out = item_slot[:, n:].reshape(g, j * s)[:, :p].flatten()                       # [G*P]
        suf_out = item_slot[:, :n].flatten().index_select(0, self.valid_slots)              # [Ts]
        out_rows = torch.cat([pre_out, suf_out])
        keys = torch.arange(p + s, device=dev).view(1, 1, p + s)
        suffix_visible = keys <= t.view(1, s, 1) + p                                        # [1, S, P+S]
        prefix_visible = (keys < p) & (keys <= upos.view(j, s, 1))                         # [J, S, P+S]
        visible = torch.cat([suffix_visible.expand(n, s, p + s), prefix_visible]).unsqueeze(0).expand(g, items, s, p + s)
        zero = torch.zeros((), dtype=dtype, device=dev)
        ninf = torch.full((), float("-inf"), dtype=dtype, device=dev)
        mask = torch.where(visible, zero, ninf).reshape(g * items, 1, s, p + s)
        out = (q_rows, kv_rows, out_rows, mask)
        if not torch.compiler.is_compiling():
            self._cache[key] = out
        return out

    def eot_maps(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """(kv_rows, mask) of the last layer's attention, EOT queries only: kv_rows [G*P + G*N*S]
        (prefix rows, then each sequence's S suffix slots), mask [G*N, 1, 1, P + S] additive:
        an EOT query sees the P prefix keys and its own keys 0..eot. Cached per dtype."""
        key = ("eot", dtype)
        if key in self._cache:
            return self._cache[key]
        g, p, n, s = self.g, self.p, self.n, self.s
        dev = self.eot.device
        n_pre = g * p
        kv_rows = torch.cat([torch.arange(n_pre, device=dev), n_pre + self.pad_index])
        keys = torch.arange(p + s, device=dev)
        zero = torch.zeros((), dtype=dtype, device=dev)
        ninf = torch.full((), float("-inf"), dtype=dtype, device=dev)
        mask = torch.where(keys.view(1, p + s) <= self.eot.reshape(g * n, 1) + p, zero, ninf).view(g * n, 1, 1, p + s)
        out = (kv_rows, mask)
        if not torch.compiler.is_compiling():
            self._cache[key] = out
        return out

    def shared_suffix_maps(self, dtype: torch.dtype) -> Optional[Tuple[Tensor, Tensor, int]]:
        """(q_rows, kv_rows, rows) for a first layer whose suffix rows are computed for one
        group only, or None when that is not exact here (G = 1, or the groups' EOT positions
        differ). Before the first layer every group's suffix rows hold the same token and
        position embeddings when the suffix is one tensor expanded over the groups (DeMul's
        C class suffixes, the same for each of its M prompts), so their ln_1 and q/k/v are
        the same for every group: computed on the leading ``rows`` = G*P + Ts/G packed rows
        (the prefix rows, then group 0's suffix rows: rows are in (group, sequence,
        position) order), and read by the attention through q_rows / kv_rows
        (``attention_maps``'s, re-pointed at those rows). Built at plan time (``prepare``:
        comparing the groups' EOT positions reads the device); inside a trace an unprepared
        layout gives None."""
        key = ("shared", dtype)
        if key in self._cache:
            return self._cache[key]
        if torch.compiler.is_compiling():
            return None
        g, ts = self.g, self.suffix_rows
        out = None
        if g > 1 and ts % g == 0 and bool((self.eot == self.eot[:1]).all()):
            n_pre, ts1 = g * self.p, ts // g
            dev = self.eot.device
            remap = torch.cat([torch.arange(n_pre, device=dev), n_pre + torch.arange(ts, device=dev) % ts1])
            q_rows, kv_rows, _, _ = self.attention_maps(dtype)
            out = (remap.index_select(0, q_rows), remap.index_select(0, kv_rows), n_pre + ts1)
        self._cache[key] = out
        return out

    def attention_tables(self, shared: bool = False) -> Tuple[Tensor, Tensor]:
        """(seq_table [G*N, 4], grp_table [G, 4]) int32, the layout as the one-launch kernels of
        ``demul_fast::prefix_attention`` read it (demul_fast/kernels/prefix_attention.py):
        per sequence (out_row0, src_row0, len, prefix_row0), per group (prefix_row0,
        suffix_out_row0, suffix_rows, suffix_src_row0). ``shared``: the inputs hold the
        first layer's G*P + Ts/G rows (``shared_suffix_maps``), so every group's suffix rows
        are read from group 0's. Cached."""
        key = ("tables", shared)
        if key in self._cache:
            return self._cache[key]
        g, p, n = self.g, self.p, self.n
        dev = self.eot.device
        lens = (self.eot + 1).reshape(g * n)
        start = g * p + torch.cumsum(lens, 0) - lens                                        # [G*N] first packed row
        gi = torch.arange(g, device=dev)
        grp_rows = (self.eot + 1).sum(1)                                                    # [G]
        grp_start = g * p + torch.cumsum(grp_rows, 0) - grp_rows
        if shared:
            ts1 = self.suffix_rows // g
            src = start - gi.repeat_interleave(n) * ts1
            grp_src = torch.full_like(grp_start, g * p)
        else:
            src, grp_src = start, grp_start
        seq = torch.stack([start, src, lens, gi.repeat_interleave(n) * p], 1).to(torch.int32).contiguous()
        grp = torch.stack([gi * p, grp_start, grp_rows, grp_src], 1).to(torch.int32).contiguous()
        out = (seq, grp)
        if not torch.compiler.is_compiling():
            self._cache[key] = out
        return out

    def op_maps(self, dtype: torch.dtype, shared: bool = False) -> Tuple[Tensor, ...]:
        """The ``maps`` of ``demul_fast.ops.prefix_attention.prefix_attention``: (seq_table,
        grp_table, q_rows, kv_rows, out_rows, mask), the kernels' tables and the CPU
        composite's query-slot maps (``attention_maps``; ``shared``: re-pointed at the shared
        first layer's rows, ``shared_suffix_maps``)."""
        seq, grp = self.attention_tables(shared)
        q_rows, kv_rows, out_rows, mask = self.attention_maps(dtype)
        if shared:
            q_rows, kv_rows, _ = self.shared_suffix_maps(dtype)
        return seq, grp, q_rows, kv_rows, out_rows, mask

    def prepare(self, dtype: torch.dtype, heads) -> None:
        """Build (plan time, outside any trace) what the attention uses: the per-head index
        maps of the eager op for every head count in ``heads``, and the one-call attention's
        maps and masks in ``dtype`` (with the shared-suffix first layer's maps)."""
        for h in set(heads):
            self.indices(h)
        self.attention_maps(dtype)
        self.eot_maps(dtype)
        self.attention_tables(False)
        if self.shared_suffix_maps(dtype) is not None:
            self.attention_tables(True)


def shared_prefix_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, heads: int,
                            eot_only: bool = False, project: Optional[Callable[[Tensor], Tensor]] = None,
                            shared_suffix: Optional[Tuple[Tensor, Tensor, int]] = None) -> Tensor:
    """Multi-head attention of one layer over the packed rows described by ``layout``.

    q: [T, W] (all rows), or [G*N, W] (the EOT row of each sequence, ``eot_only=True``)
    k, v: [T, W] with T = G*P + Ts (prefix rows, then packed suffix rows)
    returns the attention output (before out_proj) for the rows of q: [T, W] or [G*N, W]

    Two implementations of the same function, chosen by where it runs:

    * eager: ``_SharedPrefixAttention``, batched products with a hand-written backward (the
      prefix scores of all suffix queries of a group in one product against the P prefix
      keys, the suffix scores per sequence, one softmax over both, accumulated in
      ``common.accumulation_dtype``; it keeps q, k, v and the probabilities). On a CPU it is
      2-4x faster than the one-call form (measured, one layer of ViT-B/16 at C=100) and
      keeps fewer bytes;
    * under torch.compile, every layer but the last: ``_attend_op``, the custom op
      ``demul_fast::prefix_attention`` on the packed rows (q, k, v read in place, packed
      output rows, prefix key/value gradients summed inside; one Triton launch each way on
      CUDA; on a CPU its body is the one-call form below), then ``project`` on the T rows;
    * under torch.compile, the last layer (``eot_only``) and the op's CPU body: ``_attend``,
      one ``scaled_dot_product_attention`` call per layer
      (``PackedLayout.attention_maps``): B = G*(N+J) items of S query slots, each over P + S
      keys [its group's prefix keys ; its own suffix keys] under an additive mask; the prefix
      keys and values are broadcast into every item's key block (B*P*W elements each; their
      gradient is summed back over the items), and a group's P prefix queries ride along as
      J = ceil(P/S) items attending causally to the prefix keys only (``eot_only``: G*N items
      of one query). One launch forward and one backward per layer instead of about 18
      products: the compiled step's launch count. Its softmax accumulates as the attention
      kernel does (float32 for float16/bfloat16/float32, float64 for float64).

    project: optional row-wise map applied to the attention output (the layer's out_proj and
    layer scale; it must act on each row alone, like a linear layer), returning
    ``project(attention)`` in the rows of q, on the packed rows (eagerly and under
    torch.compile: the op writes packed rows).

    shared_suffix: ``layout.shared_suffix_maps(dtype)`` (compiled path only, with project,
    not eot_only): q, k, v are then [G*P + Ts/G, W], the first layer's leading rows, group
    0's suffix rows standing for every group's (the same values there); the output is still
    [T, W].
    """
    if shared_suffix is not None and (eot_only or project is None or not torch.compiler.is_compiling()):
        raise ValueError("shared_suffix is for the compiled path of a layer that is not the last, with project")
    if torch.compiler.is_compiling():
        if eot_only:
            out = _attend(q, k, v, layout, heads, eot_only)
        else:
            out = _attend_op(q, k, v, layout, heads, shared_suffix is not None)
        return out if project is None else project(out)
    out = _SharedPrefixAttention.apply(q, k, v, layout, heads, eot_only)
    return out if project is None else project(out)


def _attend_op(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, heads: int, shared: bool = False) -> Tensor:
    """The compiled path of a (not last) layer: ``demul_fast::prefix_attention``, one custom op
    on the packed rows (one Triton launch forward and one backward on CUDA; the query-slot
    composite of ``attention_maps`` on a CPU), output [T, W] in packed row order. ``shared``:
    q, k, v are the first layer's G*P + Ts/G rows (``shared_suffix_maps``)."""
    rows = layout.g * layout.p + layout.suffix_rows
    out, _ = _ops_attention.prefix_attention(q, k, v, layout.op_maps(q.dtype, shared), heads, layout.p, layout.g,
                                             rows)
    return out


def _split(buf: Tensor, g: int, heads: int, p: int, n: int, sq: int) -> Tuple[Tensor, Tensor]:
    """Head-major buffer [G*H*P + G*H*N*Sq, hd] -> ([G, H, P, hd], [G, H, N, Sq, hd]) views."""
    hd = buf.shape[-1]
    n_pre = g * heads * p
    return buf[:n_pre].view(g, heads, p, hd), buf[n_pre:].view(g, heads, n, sq, hd)


def _softmax_backward(probs: Tensor, dprobs: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """d(scores before scaling) from softmax probabilities and their gradient (float32)."""
    return (probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))).mul_(scale).to(dtype)


class _SharedPrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, heads: int, eot_only: bool):
        g, p, n, s = layout.g, layout.p, layout.n, layout.s
        w = k.shape[-1]
        hd = w // heads
        scale = hd ** -0.5
        gather, scatter, gather_eot, scatter_eot, masks = layout.indices(heads)
        kbuf = k.reshape(-1, hd).index_select(0, gather)
        vbuf = v.reshape(-1, hd).index_select(0, gather)
        kp, ks = _split(kbuf, g, heads, p, n, s)
        vp, vs = _split(vbuf, g, heads, p, n, s)
        sdt = accumulation_dtype(q.dtype)
        if eot_only:
            qbuf = q.reshape(-1, hd).index_select(0, gather_eot)
            qp, qs = None, qbuf.view(g, heads, n, 1, hd)
            smask = masks["eot"]
            out = torch.empty(g * heads * n, hd, dtype=q.dtype, device=q.device)
            out_s = out.view(g, heads, n, 1, hd)
            probs_p = None
        else:
            qbuf = q.reshape(-1, hd).index_select(0, gather)
            qp, qs = _split(qbuf, g, heads, p, n, s)
            smask = masks["suffix"]
            out = torch.empty_like(qbuf)
            out_p, out_s = _split(out, g, heads, p, n, s)
            # the prefixes' own causal attention
            scores = torch.matmul(qp, kp.transpose(-1, -2)).to(sdt).mul_(scale)
            scores.masked_fill_(~masks["prefix"], float("-inf"))
            probs_p = torch.softmax(scores, dim=-1)
            torch.matmul(probs_p.to(q.dtype), vp, out=out_p)
        sq = qs.shape[3]
        # suffix queries: prefix scores of all N*Sq queries of a group in one product
        scores = torch.cat([torch.matmul(qs.reshape(g, heads, n * sq, hd), kp.transpose(-1, -2)).view(g, heads, n, sq, p),
                            torch.matmul(qs, ks.transpose(-1, -2))], dim=-1).to(sdt).mul_(scale)
        scores[..., p:].masked_fill_(~smask, float("-inf"))
        probs_s = torch.softmax(scores, dim=-1)
        if not eot_only:
            probs_s.mul_(masks["query_valid"])  # padded query slots: zero weight, so zero output and gradient
        pd = probs_s.to(q.dtype)
        torch.matmul(pd[..., :p].reshape(g, heads, n * sq, p), vp, out=out_s.view(g, heads, n * sq, hd))
        out_s.add_(torch.matmul(pd[..., p:], vs))
        ctx.save_for_backward(qbuf, kbuf, vbuf, probs_p, probs_s)
        ctx.layout, ctx.heads, ctx.eot_only, ctx.scale = layout, heads, eot_only, scale
        return out.index_select(0, scatter_eot if eot_only else scatter).view(-1, w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        qbuf, kbuf, vbuf, probs_p, probs_s = ctx.saved_tensors
        layout, heads, eot_only, scale = ctx.layout, ctx.heads, ctx.eot_only, ctx.scale
        g, p, n, s = layout.g, layout.p, layout.n, layout.s
        hd = kbuf.shape[-1]
        w = hd * heads
        dtype = kbuf.dtype
        gather, scatter, gather_eot, scatter_eot, _ = layout.indices(heads)
        kp, ks = _split(kbuf, g, heads, p, n, s)
        vp, vs = _split(vbuf, g, heads, p, n, s)
        grad = grad.contiguous().view(-1, hd)
        if eot_only:
            sq = 1
            dbuf = grad.index_select(0, gather_eot)
            qs, dout_s = qbuf.view(g, heads, n, 1, hd), dbuf.view(g, heads, n, 1, hd)
            dqbuf = torch.empty_like(qbuf)
            dqs = dqbuf.view(g, heads, n, 1, hd)
        else:
            sq = s
            dbuf = grad.index_select(0, gather)
            qp, qs = _split(qbuf, g, heads, p, n, s)
            dout_p, dout_s = _split(dbuf, g, heads, p, n, s)
            dqbuf = torch.empty_like(qbuf)
            dqp, dqs = _split(dqbuf, g, heads, p, n, s)
        dkbuf, dvbuf = torch.empty_like(kbuf), torch.empty_like(vbuf)
        dkp, dks = _split(dkbuf, g, heads, p, n, s)
        dvp, dvs = _split(dvbuf, g, heads, p, n, s)
        # suffix queries
        pd = probs_s.to(dtype)
        pdp = pd[..., :p].reshape(g, heads, n * sq, p)
        dflat = dout_s.reshape(g, heads, n * sq, hd)
        qflat = qs.reshape(g, heads, n * sq, hd)
        torch.matmul(pdp.transpose(-1, -2), dflat, out=dvp)
        torch.matmul(pd[..., p:].transpose(-1, -2), dout_s, out=dvs)
        dprobs = torch.cat([torch.matmul(dflat, vp.transpose(-1, -2)).view(g, heads, n, sq, p),
                            torch.matmul(dout_s, vs.transpose(-1, -2))], dim=-1).to(probs_s.dtype)
        ds = _softmax_backward(probs_s, dprobs, scale, dtype)
        dsp = ds[..., :p].reshape(g, heads, n * sq, p)
        torch.matmul(dsp, kp, out=dqs.view(g, heads, n * sq, hd))
        dqs.add_(torch.matmul(ds[..., p:], ks))
        torch.matmul(dsp.transpose(-1, -2), qflat, out=dkp)
        torch.matmul(ds[..., p:].transpose(-1, -2), qs, out=dks)
        if not eot_only:
            # the prefixes' own causal attention
            dvp.add_(torch.matmul(probs_p.to(dtype).transpose(-1, -2), dout_p))
            dpp = torch.matmul(dout_p, vp.transpose(-1, -2)).to(probs_p.dtype)
            dsq = _softmax_backward(probs_p, dpp, scale, dtype)
            torch.matmul(dsq, kp, out=dqp)
            dkp.add_(torch.matmul(dsq.transpose(-1, -2), qp))
        # pad slots of dk/dv hold zeros (their keys had zero weight); scatter keeps valid rows
        dk = dkbuf.index_select(0, scatter).view(-1, w)
        dv = dvbuf.index_select(0, scatter).view(-1, w)
        dq = dqbuf.index_select(0, scatter_eot if eot_only else scatter).view(-1, w)
        return dq, dk, dv, None, None, None


def _attend(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, heads: int, eot_only: bool) -> Tensor:
    """The attention of ``shared_prefix_attention`` as differentiable torch operations."""
    g, n = layout.g, layout.n
    w = k.shape[-1]
    hd = w // heads
    if eot_only:
        kv_rows, mask = layout.eot_maps(q.dtype)
        qs = q.view(g * n, 1, heads, hd).transpose(1, 2)                                      # [G*N, H, 1, hd]
        out = F.scaled_dot_product_attention(qs, _recomputed_blocks(k, kv_rows, layout, heads, n),
                                             _recomputed_blocks(v, kv_rows, layout, heads, n), attn_mask=mask)
        return out.transpose(1, 2).reshape(g * n, w)
    slots, out_rows = _attend_slots(q, k, v, layout, heads)
    return slots.index_select(0, out_rows)


def _blocks(x: Tensor, rows: Tensor, layout: PackedLayout, heads: int, items: int) -> Tensor:
    """[G*items, H, P + S, hd]: each item's keys (or values), its group's prefix then its suffix."""
    g, p, s = layout.g, layout.p, layout.s
    hd = x.shape[-1] // heads
    n_pre = g * p
    buf = x.index_select(0, rows)
    pre = buf[:n_pre].view(g, 1, p, heads, hd).transpose(2, 3).expand(g, items, heads, p, hd)
    suf = buf[n_pre:].view(g, items, s, heads, hd).transpose(2, 3)
    return torch.cat([pre, suf], dim=3).view(g * items, heads, p + s, hd)


def _recomputed_blocks(x: Tensor, rows: Tensor, layout: PackedLayout, heads: int, items: int) -> Tensor:
    """``_blocks``, not kept for the backward: under torch.compile the backward rebuilds the
    broadcast key/value blocks (2 x B x (P + S) x W elements per layer) from the packed rows
    it keeps anyway (a gather and a copy, in the kernel that already runs before the
    attention's backward) instead of holding them from the forward (docs/step.md, memory)."""
    if torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(_blocks, x, rows, layout, heads, items, use_reentrant=False)
    return _blocks(x, rows, layout, heads, items)


def _attend_slots(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, heads: int,
                  shared_suffix: Optional[Tuple[Tensor, Tensor, int]] = None) -> Tuple[Tensor, Tensor]:
    """The one call of a (not last) layer: (output of every query slot [B*S, W], out_rows
    [G*P + Ts]: the slot of each packed row's output, ``PackedLayout.attention_maps``).
    With ``shared_suffix`` q, k, v are the G*P + Ts/G rows of ``PackedLayout.shared_suffix_maps``."""
    g, s = layout.g, layout.s
    w = k.shape[-1]
    hd = w // heads
    q_rows, kv_rows, out_rows, mask = layout.attention_maps(q.dtype)
    if shared_suffix is not None:
        q_rows, kv_rows = shared_suffix[0], shared_suffix[1]
    items = layout.n + layout.prefix_items
    qs = q.index_select(0, q_rows).view(g * items, s, heads, hd).transpose(1, 2)             # [B, H, S, hd]
    out = F.scaled_dot_product_attention(qs, _recomputed_blocks(k, kv_rows, layout, heads, items),
                                         _recomputed_blocks(v, kv_rows, layout, heads, items), attn_mask=mask)
    return out.transpose(1, 2).reshape(g * items * s, w), out_rows
