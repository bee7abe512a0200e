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

    def attention_rows(self) -> Tensor:
        """[G*P + G*N*S] int64: the packed row of each slot of the attention layout (the G*P
        prefix rows, then each sequence's S suffix slots; pad slots point at packed suffix
        row 0: they are masked as keys, their queries' outputs are dropped). Cached."""
        if "rows" not in self._cache:
            n_pre = self.g * self.p
            self._cache["rows"] = torch.cat([torch.arange(n_pre, device=self.eot.device), n_pre + self.pad_index])
        return self._cache["rows"]

    def masks(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """(suffix, eot) additive masks in ``dtype`` (0 where visible, -inf elsewhere), cached
        per dtype (plan time builds the encoder's; a missing one is built, uncached, in a trace):

        suffix: [S, P + S] a suffix query at slot i sees the P prefix keys and its own suffix
                keys 0..i (causal; the pad keys of a sequence lie after its EOT, so only its
                pad queries see them, and their outputs are dropped)
        eot:    [G*N, 1, 1, P + S] an EOT query sees the P prefix keys and its own keys 0..eot
        No row is fully masked (every query sees the prefix keys), so no softmax is 0/0.
        """
        key = ("masks", dtype)
        if key in self._cache:
            return self._cache[key]
        g, p, n, s = self.g, self.p, self.n, self.s
        dev = self.eot.device
        keys = torch.arange(p + s, device=dev)
        zero = torch.zeros((), dtype=dtype, device=dev)
        ninf = torch.full((), float("-inf"), dtype=dtype, device=dev)
        suffix = torch.where(keys.view(1, p + s) <= torch.arange(s, device=dev).view(s, 1) + p, zero, ninf)
        eot = torch.where(keys.view(1, p + s) <= self.eot.reshape(g * n, 1) + p, zero, ninf).view(g * n, 1, 1, p + s)
        if not torch.compiler.is_compiling():
            self._cache[key] = (suffix, eot)
        return suffix, eot


def shared_prefix_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, heads: int,
                            eot_only: bool = False) -> Tensor:
    """Multi-head attention of one layer over the packed rows described by ``layout``.

    q: [T, W] (all rows), or [G*N, W] (the EOT row of each sequence, ``eot_only=True``)
    k, v: [T, W] with T = G*P + Ts (prefix rows, then packed suffix rows)
    returns the attention output (before out_proj) for the rows of q: [T, W] or [G*N, W]

    Two ``scaled_dot_product_attention`` calls (one with ``eot_only``), differentiated by
    torch: the prefixes' causal attention [G, H, P, hd], and the suffix queries [G*N, H, S, hd]
    over the keys [prefix keys of their group ; own suffix keys] [G*N, H, P + S, hd] under the
    additive mask ``layout.masks``. The prefix keys and values are broadcast into every
    sequence's key block (G*N*P*W elements each; the backward sums their gradient over the N
    sequences). Softmax and its accumulation are the attention kernel's (float32 for
    float16/bfloat16/float32, float64 for float64, on CPU and on the GPU's fused kernels).
    """
    g, p, n, s = layout.g, layout.p, layout.n, layout.s
    w = k.shape[-1]
    hd = w // heads
    n_pre = g * p
    rows = layout.attention_rows()
    suffix_mask, eot_mask = layout.masks(q.dtype)

    def blocks(x: Tensor) -> Tensor:  # rows -> [G, N, H, P + S, hd]: the group's prefix, then the sequence's suffix
        buf = x.index_select(0, rows)                                                         # [G*P + G*N*S, W]
        pre = buf[:n_pre].view(g, 1, p, heads, hd).transpose(2, 3).expand(g, n, heads, p, hd)
        return torch.cat([pre, buf[n_pre:].view(g, n, s, heads, hd).transpose(2, 3)], dim=3)

    keys, values = blocks(k), blocks(v)
    if eot_only:
        qs = q.view(g * n, 1, heads, hd).transpose(1, 2)                                      # [G*N, H, 1, hd]
        out = F.scaled_dot_product_attention(qs, keys.view(g * n, heads, p + s, hd), values.view(g * n, heads, p + s, hd),
                                             attn_mask=eot_mask)
        return out.transpose(1, 2).reshape(g * n, w)
    qbuf = q.index_select(0, rows)
    qs = qbuf[n_pre:].view(g * n, s, heads, hd).transpose(1, 2)                              # [G*N, H, S, hd]
    out_s = F.scaled_dot_product_attention(qs, keys.view(g * n, heads, p + s, hd), values.view(g * n, heads, p + s, hd),
                                           attn_mask=suffix_mask)                            # [G*N, H, S, hd]
    out_s = out_s.transpose(1, 2).reshape(g * n * s, w).index_select(0, layout.valid_slots)
    # the prefixes' causal attention reads its keys/values from sequence 0's block (no other copy is kept)
    qp = qbuf[:n_pre].view(g, p, heads, hd).transpose(1, 2)                                  # [G, H, P, hd]
    out_p = F.scaled_dot_product_attention(qp, keys[:, 0, :, :p], values[:, 0, :, :p], is_causal=True)
    return torch.cat([out_p.transpose(1, 2).reshape(n_pre, w), out_s])
