"""Attention of one layer over shared prefixes and packed suffixes (docs/SPEC.md section 3.1).

Layout of the token rows (``T = G*P + Ts``): rows ``[0, G*P)`` are the G shared prefixes of
P tokens, then the suffix tokens of all G*N sequences packed without padding (sequence
(g, n) owns ``len[g, n] = eot[g, n] + 1`` rows, in (g, n, position) order). Positions after
an EOT are dropped: the tower is causal, so they never influence a pooled result.

Each prefix attends causally to itself. Each suffix token attends to its group's P prefix
keys and, causally, to its own suffix keys. The prefix scores of all suffix queries of a
group are one batched product ``[N*Sq, hd] x [hd, P]``, the suffix scores a small product
per sequence; one softmax runs over the concatenated P + S scores (the log-sum-exp merge
of the two partial attentions, exact), and the prefix keys/values are never copied per
sequence. For the attention alone, suffixes are gathered into a padded ``[N, S]`` layout
(masked); the linear layers around it run on the packed rows only.

``PackedLayout`` holds the index maps; ``shared_prefix_attention`` is the autograd op with
a hand-written backward (saves q, k, v in head-major layout and the probabilities).
Softmax and its backward run in float32 (float64 stays float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

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


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


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
        sdt = _softmax_dtype(q.dtype)
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


def shared_prefix_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, heads: int,
                            eot_only: bool = False) -> Tensor:
    """Multi-head attention of one layer over the packed rows described by ``layout``.

    q: [T, W] (all rows), or [G*N, W] (the EOT row of each sequence, ``eot_only=True``)
    k, v: [T, W] with T = G*P + Ts (prefix rows, then packed suffix rows)
    returns the attention output (before out_proj) for the rows of q: [T, W] or [G*N, W]
    """
    return _SharedPrefixAttention.apply(q, k, v, layout, heads, eot_only)
