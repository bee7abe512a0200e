"""Attention of one layer over shared prefixes and packed suffixes (docs/SPEC.md section 3.1).

Layout of the token rows (``T = G*P + Ts``): rows ``[0, G*P)`` are the G shared prefixes of
P tokens, then the suffix tokens of all G*N sequences packed without padding (sequence
(g, n) owns ``len[g, n] = eot[g, n] + 1`` rows, in (g, n, position) order). Positions after
an EOT are dropped: the tower is causal, so they never influence a pooled result.

Each prefix attends causally to itself. Each suffix token attends to its group's P prefix
keys and, causally, to its own suffix keys: one softmax over the P + S scores, the exact
attention of the full-length sequence (the sequence's own causal attention, with its
first P keys shared by the group). Per layer this is two ``scaled_dot_product_attention``
calls: the prefixes' causal self-attention, and every suffix query over [its group's
prefix keys ; its own suffix keys] with the prefix keys and values broadcast into each
sequence's key block and an additive mask (causal, offset by P). For the attention alone,
suffixes are gathered into a padded ``[N, S]`` layout; the linear layers around it run on
the packed rows only.

``PackedLayout`` holds the index maps and the masks; ``shared_prefix_attention`` is plain
differentiable torch (the attention kernel's own backward). Softmax accumulates in float32
(float64 stays float64), as the attention kernels do (``common.accumulation_dtype``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

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

    def prepare(self, dtype: torch.dtype) -> None:
        """Build (plan time, outside any trace) the maps and masks the attention uses in ``dtype``."""
        self.attention_maps(dtype)
        self.eot_maps(dtype)


def shared_prefix_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, heads: int,
                            eot_only: bool = False) -> Tensor:
    """Multi-head attention of one layer over the packed rows described by ``layout``.

    q: [T, W] (all rows), or [G*N, W] (the EOT row of each sequence, ``eot_only=True``)
    k, v: [T, W] with T = G*P + Ts (prefix rows, then packed suffix rows)
    returns the attention output (before out_proj) for the rows of q: [T, W] or [G*N, W]

    One ``scaled_dot_product_attention`` call (``PackedLayout.attention_maps``): B = G*(N+J)
    items of S query slots, each over P + S keys [its group's prefix keys ; its own suffix
    keys] under an additive mask; the prefix keys and values are broadcast into every item's
    key block (B*P*W elements each; their gradient is summed back over the items), and a
    group's P prefix queries ride along as J = ceil(P/S) items attending causally to the
    prefix keys only. ``eot_only``: G*N items of one query (the last layer). Softmax and its
    accumulation are the attention kernel's (float32 for float16/bfloat16/float32, float64
    for float64). Eagerly the backward recomputes the attention from q, k, v
    (``_RecomputedAttention``); under torch.compile the attention is traced as is.
    """
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not (
            q.requires_grad or k.requires_grad or v.requires_grad):
        return _attend(q, k, v, layout, heads, eot_only)
    return _RecomputedAttention.apply(q, k, v, layout, heads, eot_only)


class _RecomputedAttention(torch.autograd.Function):
    """Eager autograd of ``_attend`` that keeps only q, k, v (the packed rows, [T, W]) for
    the backward and recomputes the gathers, the broadcast key blocks and the attention there
    (the same operations, so the same values): the broadcast keys and values (G*(N+J)*(P+S)*W
    elements each per layer) and the attention output are not held from the forward to the
    backward. Under torch.compile the plain ``_attend`` is traced and AOTAutograd's
    partitioner decides what to keep."""

    @staticmethod
    def forward(ctx, q, k, v, layout, heads, eot_only):
        ctx.save_for_backward(q, k, v)
        ctx.layout, ctx.heads, ctx.eot_only = layout, heads, eot_only
        return _attend(q, k, v, layout, heads, eot_only)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = _attend(*inputs, ctx.layout, ctx.heads, ctx.eot_only)
            dq, dk, dv = torch.autograd.grad(out, inputs, grad)
        return dq, dk, dv, None, None, None


def _attend(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, heads: int, eot_only: bool) -> Tensor:
    """The attention of ``shared_prefix_attention`` as differentiable torch operations."""
    g, p, n, s = layout.g, layout.p, layout.n, layout.s
    w = k.shape[-1]
    hd = w // heads
    n_pre = g * p

    def blocks(x: Tensor, rows: Tensor, items: int) -> Tensor:
        """[G*items, H, P + S, hd]: each item's keys (or values), its group's prefix then its suffix."""
        buf = x.index_select(0, rows)
        pre = buf[:n_pre].view(g, 1, p, heads, hd).transpose(2, 3).expand(g, items, heads, p, hd)
        suf = buf[n_pre:].view(g, items, s, heads, hd).transpose(2, 3)
        return torch.cat([pre, suf], dim=3).view(g * items, heads, p + s, hd)

    if eot_only:
        kv_rows, mask = layout.eot_maps(q.dtype)
        qs = q.view(g * n, 1, heads, hd).transpose(1, 2)                                      # [G*N, H, 1, hd]
        out = F.scaled_dot_product_attention(qs, blocks(k, kv_rows, n), blocks(v, kv_rows, n), attn_mask=mask)
        return out.transpose(1, 2).reshape(g * n, w)
    q_rows, kv_rows, out_rows, mask = layout.attention_maps(q.dtype)
    items = n + layout.prefix_items
    qs = q.index_select(0, q_rows).view(g * items, s, heads, hd).transpose(1, 2)             # [B, H, S, hd]
    out = F.scaled_dot_product_attention(qs, blocks(k, kv_rows, items), blocks(v, kv_rows, items), attn_mask=mask)
    return out.transpose(1, 2).reshape(g * items * s, w).index_select(0, out_rows)
