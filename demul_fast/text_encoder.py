"""Exact prefix-shared CLIP text encoder (docs/SPEC.md section 3.1).

CLIP's text transformer is causal and pools the hidden state at the EOT token, so

* positions after the last EOT never matter (truncation), and
* a block of leading positions that is identical for many sequences (here: [SOT] + the
  learned context of one prompt) has the same hidden states, keys and values in every
  one of them (prefix sharing).

``prefix_shared_forward`` runs such a batch: G groups, each one shared prefix of P
tokens and N suffixes (up to S tokens). The prefix runs once per group (causal within
itself); every suffix token attends to [its group's prefix keys ; its own suffix keys,
causally] (``demul_fast.prefix_attention``: eagerly one batched product per group against
the prefix and one softmax over both parts, the prefix never copied per suffix; under
torch.compile one ``scaled_dot_product_attention`` call per layer). Suffix tokens after each EOT are dropped and the
rest packed without padding, so the linear layers run on G*P + sum(len) rows instead of
G*N*77; the last layer runs its attention output and MLP on the G*N EOT rows only.

``towers.TextTower`` is a light view (no weight copies) of a supported text tower (open_clip,
transformers, OpenAI ``clip``: one adapter per family in ``demul_fast.towers``);
``text_tower(model)`` builds it or raises ``UnsupportedTextTower`` saying why.

``PrefixSharedTextEncoder`` is the CoOp prompt learner's text encoder built on it:
``forward(ctx [M, n_ctx, width]) -> T [C, M, D]``, exactly what ``FullTextEncoder`` (the
CoOp way, SPEC 3: every prompt at full length through the family's own text forward; the
specification of this module) computes.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint

from . import towers
from .prefix_attention import PackedLayout, shared_prefix_attention
from .prompts import build_prompts
from .towers import LayerView, TextTower, UnsupportedTextTower, text_tower  # noqa: F401  (the tower API, re-exported)

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------
# The core: prefix-shared forward
# --------------------------------------------------------------------------------------

def prefix_shared_forward(tower: TextTower, prefix: Tensor, suffix: Tensor, suffix_eot: Tensor,
                          layout: Optional[PackedLayout] = None, checkpoint: bool = False,
                          deep_prompts: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Pooled text features of G*N sequences that share a prefix per group (SPEC 3.1).

    tower:      a TextTower (``text_tower(model)``), causal with EOT pooling
    prefix:     [G, P, W]    token embeddings of positions 0..P-1, shared by the N
                             sequences of a group (positional embedding added here)
    suffix:     [G, N, S, W] token embeddings of positions P..P+S-1 of each sequence
                             (may be an expanded view); positions after a row's EOT are
                             padding and never influence its result
    suffix_eot: [G, N] int   the pooled position of each sequence, relative to the suffix
                             start (0 <= suffix_eot < S)
    layout:     optional ``PackedLayout.build(G, P, N, S, suffix_eot)``, to reuse across calls
                with the same suffix_eot (building one reads suffix_eot: a host sync on GPU)
    checkpoint: activation checkpointing per layer (``torch.utils.checkpoint``, non-reentrant):
                the backward recomputes each layer from its input instead of keeping its
                activations; the same operations run again, so the result is the same
    deep_prompts: optional J tensors [k, W] (MaPLe's deep text prompts, J < layers): the
                hidden states of positions 1..k of every sequence are replaced by
                deep_prompts[i - 1] before layer i, for i = 1..J (positions 1..k must precede
                every EOT)
    returns     [G, N, D]    ``text_projection(ln_final(hidden[EOT]))`` of each sequence,
                             equal to running the tower on the P+S (or 77) tokens of each
                             sequence separately, up to float rounding
    """
    g, p, w = prefix.shape
    if suffix.dim() != 4 or suffix.shape[0] != g or suffix.shape[-1] != w:
        raise ValueError(f"suffix must be [G={g}, N, S, W={w}], got {tuple(suffix.shape)}")
    n, s = suffix.shape[1], suffix.shape[2]
    if p + s > tower.positional_embedding.shape[0]:
        raise ValueError(f"prefix ({p}) + suffix ({s}) tokens exceed the context length "
                         f"{tower.positional_embedding.shape[0]}")
    if tuple(suffix_eot.shape) != (g, n):
        raise ValueError(f"suffix_eot must be [G={g}, N={n}], got {tuple(suffix_eot.shape)}")
    dtype = prefix.dtype
    if layout is None:
        layout = PackedLayout.build(g, p, n, s, suffix_eot.to(prefix.device))
    elif (layout.g, layout.p, layout.n, layout.s) != (g, p, n, s):
        raise ValueError(f"layout is for (G, P, N, S) = {(layout.g, layout.p, layout.n, layout.s)}, "
                         f"inputs are {(g, p, n, s)}")
    pos = tower.positional_embedding.to(dtype)
    suffix_rows = (suffix.to(dtype) + pos[p:p + s]).reshape(g * n * s, w).index_select(0, layout.valid_slots)
    x = torch.cat([(prefix + pos[:p]).reshape(g * p, w), suffix_rows])       # [G*P + Ts, W], packed
    last = len(tower.layers) - 1
    # Under compile, a suffix expanded over the groups (DeMul's: the same C class suffixes for
    # each of the M prompts) has the same rows in every group before layer 0, so layer 0's
    # ln_1 and q/k/v run on the G*P prefix rows and group 0's Ts/G suffix rows only (exact:
    # the same values; (G-1)/G of layer 0's suffix q/k/v work and of its input-gradient product
    # removed, no launch added). Eagerly the batched-product attention reads [T, W] q/k/v.
    shared = None
    if torch.compiler.is_compiling() and g > 1 and last > 0 and suffix.stride(0) == 0 and not checkpoint:
        shared = layout.shared_suffix_maps(dtype)
    deep = list(deep_prompts or ())
    if deep:
        k = deep[0].shape[0]
        if len(deep) > last or any(d.dim() != 2 or tuple(d.shape) != (k, w) for d in deep):
            raise ValueError(f"deep_prompts must be at most {last} tensors [k, W={w}] with one k, got "
                             f"{[tuple(d.shape) for d in deep]}")
        deep_rows, deep_src = layout.deep_rows(k)
    for i, layer in enumerate(tower.layers):
        if 1 <= i <= len(deep):  # MaPLe: the context rows of layer i's input are deep_prompts[i - 1]
            x = x.index_copy(0, deep_rows, deep[i - 1].to(dtype).index_select(0, deep_src))
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(_layer_forward, layer, x, layout, i == last, use_reentrant=False)
        else:
            x = _layer_forward(layer, x, layout, i == last, shared if i == 0 else None)
    if last < 0:  # a tower without layers
        x = x.index_select(0, layout.eot_rows + g * p)
    return tower.project(tower.ln_final(x)).view(g, n, -1)


def _layer_forward(layer: LayerView, x: Tensor, layout: PackedLayout, last: bool,
                   shared: Optional[Tuple[Tensor, Tensor, int]] = None) -> Tensor:
    """One residual block on the packed rows x [G*P + Ts, W]; the last block returns only the
    G*N pooled (EOT) rows [G*N, W]: keys and values of every row are computed, the attention
    output, out_proj and MLP run on the pooled rows alone. ``shared``: the first layer's
    ``layout.shared_suffix_maps`` (compiled path, not the last layer): ln_1 and q/k/v run on
    the leading G*P + Ts/G rows only (the packed rows are in (group, sequence, position)
    order, so group 0's suffix rows follow the prefix rows), the attention reads them for
    every group."""
    q, k, v = layer.qkv(layer.ln_1(x if shared is None else x[:shared[2]]))
    if last:
        rows = layout.eot_rows + layout.g * layout.p
        x = x.index_select(0, rows)
        a = shared_prefix_attention(q.index_select(0, rows), k, v, layout, layer.heads, eot_only=True)
        x = x + layer.ls_1(layer.out_proj(a))
    else:  # out_proj and layer scale act row by row: under compile they run before the gather to rows
        x = x + shared_prefix_attention(q, k, v, layout, layer.heads, project=lambda a: layer.ls_1(layer.out_proj(a)),
                                        shared_suffix=shared)
    return x + layer.ls_2(layer.mlp(layer.ln_2(x)))


# --------------------------------------------------------------------------------------
# The CoOp/DeMul text encoder
# --------------------------------------------------------------------------------------

class FullTextEncoder(nn.Module):
    """Per-prompt text features the CoOp way (SPEC 3): all C*M prompts at full context
    length through the CLIP text tower.

    clip_model: open_clip ``CLIP`` / ``CustomTextCLIP``, transformers ``CLIPModel`` or OpenAI
                ``clip.model.CLIP`` (used in place, not registered as a submodule)
    tokenizer, classnames, n_ctx: as ``demul_fast.prompts.build_prompts``

    ``forward(ctx [M, n_ctx, width]) -> T [C, M, D]``: token embeddings with positions
    1..n_ctx replaced by ctx[m], then the family's own text forward
    (``towers.TowerFamily.encode_embeddings``: + positional embedding, the transformer with
    the model's own attention mask, ln_final, the hidden state at the pooled (EOT)
    position, text_projection), in the dtype the family computes in.
    """

    def __init__(self, clip_model: nn.Module, tokenizer, classnames, n_ctx: int):
        super().__init__()
        self.__dict__["clip_model"] = clip_model
        family = towers.family(clip_model)
        self.__dict__["family"] = family
        pool_type, eos_id = family.pool_rule(clip_model)
        prompts = build_prompts(classnames, n_ctx, tokenizer, lambda ids: towers.pool_positions(ids, pool_type, eos_id),
                                family.context_length(clip_model))
        self.n_ctx = n_ctx
        self.classnames = prompts.classnames
        self.register_buffer("ids", prompts.ids, persistent=False)    # [C, L]
        self.register_buffer("eot", prompts.eot, persistent=False)    # [C]

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx [M, n_ctx, width] -> T [C, M, D]."""
        model = self.clip_model
        ctx = ctx.to(self.family.compute_dtype(model))
        x = self.family.token_embedding(model)(self.ids).to(ctx.dtype)        # [C, L, W]
        c, length, w = x.shape
        m = ctx.shape[0]
        x = x.unsqueeze(1).expand(c, m, length, w)
        x = torch.cat([x[:, :, :1], ctx.unsqueeze(0).expand(c, m, self.n_ctx, w), x[:, :, 1 + self.n_ctx:]], dim=2)
        pool = self.eot.repeat_interleave(m)                                  # rows are (c, m), m fastest
        return self.family.encode_embeddings(model, x.reshape(c * m, length, w), pool).view(c, m, -1)


class PrefixSharedTextEncoder(nn.Module):
    """Text features of C classes x M learned prompts, exact and prefix-shared (SPEC 3.1).

    clip_model: open_clip ``CLIP`` / ``CustomTextCLIP``, transformers ``CLIPModel`` or OpenAI
                ``clip.model.CLIP`` (float16-cast weights compute in float16; its
                weights are used in place, never copied; it is not registered as a
                submodule, so this module's state_dict holds no CLIP weights)
    tokenizer:  the model's tokenizer (open_clip's, ``clip.tokenize``, or a Hugging Face tokenizer)
    classnames: C class names (underscores become spaces)
    n_ctx:      learned context tokens per prompt
    fallback:   None (refuse an unsupported tower with ``UnsupportedTextTower``) or "full"
                (run such a tower at full length through ``FullTextEncoder``)
    checkpoint: activation checkpointing per layer of the prefix path (exact: the backward
                recomputes each layer instead of keeping its activations)

    ``forward(ctx [M, n_ctx, width]) -> T [C, M, D]`` (unnormalised), equal to
    ``FullTextEncoder`` up to float rounding: the prompts are truncated after
    the last EOT and [SOT] + ctx_m runs once per prompt m, shared by all C classes.
    ``mode`` says which path runs ("prefix" or "full").
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Callable, classnames: Sequence[str], n_ctx: int,
                 fallback: Optional[str] = None, checkpoint: bool = False):
        super().__init__()
        self.checkpoint = bool(checkpoint)
        if fallback not in (None, "full"):
            raise ValueError(f"fallback must be None or 'full', got {fallback!r}")
        self.__dict__["clip_model"] = clip_model  # plain attribute: no duplicate parameters
        try:
            self.__dict__["tower"] = text_tower(clip_model)
            self.mode = "prefix"
        except UnsupportedTextTower:
            if fallback != "full":
                raise
            self.__dict__["tower"] = None
            self.__dict__["_full"] = FullTextEncoder(clip_model, tokenizer, classnames, n_ctx)
            self.mode = "full"
            self.n_ctx = n_ctx
            self.classnames = self._full.classnames
            return
        prompts = build_prompts(classnames, n_ctx, tokenizer, self.tower.pool_positions, self.tower.context_length)
        self.n_ctx = n_ctx
        self.classnames = prompts.classnames
        self.register_buffer("sot_id", prompts.ids[:1, :1].clone(), persistent=False)            # [1, 1]
        self.register_buffer("suffix_ids", prompts.suffix_ids, persistent=False)                 # [C, S]
        self.register_buffer("suffix_eot", prompts.suffix_eot, persistent=False)                 # [C]
        self.__dict__["_layout"] = None

    @property
    def num_tokens(self) -> Tuple[int, int]:
        """(prefix tokens per prompt P, suffix tokens per class S) of the prefix path."""
        return 1 + self.n_ctx, self.suffix_ids.shape[1]

    def forward(self, ctx: Tensor) -> Tensor:
        """ctx [M, n_ctx, width] -> T [C, M, D]."""
        if self.mode == "full":
            return self._full(ctx)
        tower = self.tower
        if ctx.dim() != 3 or ctx.shape[1] != self.n_ctx or ctx.shape[2] != tower.width:
            raise ValueError(f"ctx must be [M, n_ctx={self.n_ctx}, width={tower.width}], got {tuple(ctx.shape)}")
        m = ctx.shape[0]
        layout = self._planned_layout(m)
        ctx = ctx.to(tower.dtype)
        sot = tower.token_embedding(self.sot_id).to(ctx.dtype).expand(m, 1, -1)           # [M, 1, W]
        prefix = torch.cat([sot, ctx], dim=1)                                              # [M, P, W]
        suffix = tower.token_embedding(self.suffix_ids).to(ctx.dtype)                      # [C, S, W]
        out = prefix_shared_forward(tower, prefix, suffix.unsqueeze(0).expand(m, -1, -1, -1), layout.eot,
                                    layout=layout, checkpoint=self.checkpoint)             # [M, C, D]
        return out.transpose(0, 1)

    # -- the plan: decided once, outside any step ---------------------------------------------
    def _plan_key(self, m: int) -> tuple:
        """What the packed layout of M prompts depends on: M, the device, and the identity
        and version counter of ``suffix_eot`` (any in-place edit or replacement changes it)."""
        eot = self.suffix_eot
        return (m, eot.device, id(eot), eot._version)

    def plan(self, m: int) -> Optional[PackedLayout]:
        """Build (once) the packed layout of M prompts and its per-head index maps; later calls
        only compare the key (``_plan_key``: host metadata, no device access) and rebuild when
        it changed. Building reads ``suffix_eot`` (one host synchronisation on a GPU): it
        happens here, at plan time (construction, a move to another device, a changed
        ``suffix_eot``), never inside a training step. Returns the layout (None on the full path)."""
        if self.mode == "full":
            return None
        key = self._plan_key(m)
        if self._layout is None or self._layout[0] != key:
            c, s = self.suffix_ids.shape
            eot = self.suffix_eot.unsqueeze(0).expand(m, c)
            layout = PackedLayout.build(m, 1 + self.n_ctx, c, s, eot)
            layout.prepare(self.tower.dtype, [layer.heads for layer in self.tower.layers])  # maps and masks
            self.__dict__["_layout"] = (key, layout)
        return self._layout[1]

    def _planned_layout(self, m: int) -> PackedLayout:
        """The layout of M prompts. Eager: ``plan(m)`` (built on the first call, then only its
        key is compared). Inside torch.compile no layout can be built (it needs the host to
        read ``suffix_eot``): the one ``plan`` made is used, its M and device checked while
        tracing (dynamo guards on it), and a missing one is a clear error."""
        if not torch.compiler.is_compiling():
            return self.plan(m)
        entry = self._layout
        if entry is None or entry[0][0] != m or entry[0][1] != self.suffix_eot.device:
            raise RuntimeError(f"PrefixSharedTextEncoder: no packed layout for M={m} prompts on "
                               f"{self.suffix_eot.device}; call .plan({m}) outside torch.compile first "
                               "(DeMul does this at construction and after a move)")
        return entry[1]

    def _apply(self, fn, *args, **kwargs):
        """A move or cast (``.to``, ``.cuda``) re-plans for the new device, so a compiled step
        that follows never has to build a layout."""
        out = super()._apply(fn, *args, **kwargs)
        entry = self.__dict__.get("_layout")
        if entry is not None and entry[0][1] != self.suffix_eot.device:
            self.plan(entry[0][0])
        return out
