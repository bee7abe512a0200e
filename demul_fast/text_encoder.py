"""Exact prefix-shared CLIP text encoder (SPEC.md section 3.1).

CLIP's text transformer is causal and pools the hidden state at the EOT token, so

* positions after the last EOT never matter (truncation), and
* a block of leading positions that is identical for many sequences (here: [SOT] + the
  learned context of one prompt) has the same hidden states, keys and values in every
  one of them (prefix sharing).

``prefix_shared_forward`` runs such a batch: G groups, each one shared prefix of P
tokens and N suffixes (up to S tokens). The prefix runs once per group (causal within
itself); every suffix token attends to [its group's prefix keys ; its own suffix keys,
causally] (``demul_fast.prefix_attention``: one batched product per group against the
prefix, one softmax over both parts, which is the exact log-sum-exp merge; the prefix keys
and values are never copied per suffix). Suffix tokens after each EOT are dropped and the
rest packed without padding, so the linear layers run on G*P + sum(len) rows instead of
G*N*77; the last layer runs its attention output and MLP on the G*N EOT rows only.

``TextTower`` is a light view (no weight copies) of a supported text tower: open_clip's
``CLIP`` / ``CustomTextCLIP`` (causal mask, argmax or EOS pooling, standard residual
blocks, optional LayerScale) and Hugging Face ``transformers`` ``CLIPModel`` /
``CLIPTextModel(WithProjection)``. ``text_tower(model)`` builds it or raises
``UnsupportedTextTower`` saying why.

``PrefixSharedTextEncoder`` is the CoOp prompt learner's text encoder built on it:
``forward(ctx [M, n_ctx, width]) -> T [C, M, D]``, exactly what
``demul_fast.reference.FullTextEncoder`` computes at full length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .prefix_attention import PackedLayout, shared_prefix_attention
from .prompts import build_prompts

Tensor = torch.Tensor


class UnsupportedTextTower(ValueError):
    """The text tower is not causal with EOT pooling (or has features this encoder does not
    implement), so prefix sharing would not be exact."""


@dataclass
class LayerView:
    """One residual block: x += ls_1(out_proj(attn(ln_1(x)))); x += ls_2(mlp(ln_2(x)))."""

    ln_1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], Tuple[Tensor, Tensor, Tensor]]  # [..., W] -> 3 x [..., W]
    out_proj: Callable[[Tensor], Tensor]
    ls_1: Callable[[Tensor], Tensor]
    ln_2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    ls_2: Callable[[Tensor], Tensor]
    heads: int


@dataclass
class TextTower:
    """A view of a causal, EOT-pooled CLIP text tower (the model's own weights).

    token_embedding:     ids [...] -> [..., W]
    positional_embedding: [context_length, W]
    layers:              the residual blocks, in order
    ln_final:            [..., W] -> [..., W]
    project:             [..., W] -> [..., D] (identity when the tower has no projection)
    pool_type:           "argmax" (pool at the largest token id) or "eos" (first eos_id)
    """

    token_embedding: Callable[[Tensor], Tensor]
    positional_embedding: Tensor
    layers: List[LayerView]
    ln_final: Callable[[Tensor], Tensor]
    project: Callable[[Tensor], Tensor]
    pool_type: str
    eos_id: Optional[int]
    context_length: int
    width: int

    @property
    def dtype(self) -> torch.dtype:
        return self.positional_embedding.dtype

    def pool_positions(self, ids: Tensor) -> Tensor:
        """ids [N, L] -> [N] int64: the position whose hidden state the tower pools."""
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        return (ids == self.eos_id).int().argmax(dim=-1)

    def full_forward(self, x: Tensor, pool: Tensor) -> Tensor:
        """The plain CLIP computation on token embeddings x [N, L, W] (positional embedding
        not yet added), pooled at ``pool`` [N]: returns [N, D]. Used for ``fallback="full"``
        of unsupported layouts; no sharing."""
        n, length, _ = x.shape
        x = x + self.positional_embedding[:length].to(x.dtype)
        mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        for layer in self.layers:
            q, k, v = (_heads_first(t, layer.heads) for t in layer.qkv(layer.ln_1(x)))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + layer.ls_1(layer.out_proj(a.transpose(1, 2).reshape(n, length, -1)))
            x = x + layer.ls_2(layer.mlp(layer.ln_2(x)))
        pooled = x[torch.arange(n, device=x.device), pool]
        return self.project(self.ln_final(pooled))


def _heads_first(t: Tensor, heads: int) -> Tensor:
    """[N, L, W] -> [N, H, L, W/H]."""
    n, length, w = t.shape
    return t.view(n, length, heads, w // heads).transpose(1, 2)


# --------------------------------------------------------------------------------------
# Adapters: open_clip and Hugging Face transformers
# --------------------------------------------------------------------------------------

def _is_causal_mask(mask: Optional[Tensor]) -> bool:
    """True if ``mask`` [L, L] is the additive causal mask (0 on and below the diagonal,
    -inf above). Reads the mask once, at construction."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    m = mask.detach().float().cpu()
    upper = torch.ones_like(m, dtype=torch.bool).triu(1)
    return bool((m[~upper] == 0).all()) and bool(torch.isneginf(m[upper]).all())


def _open_clip_parts(model: nn.Module):
    """(token_embedding, positional_embedding, transformer, ln_final, text_projection,
    attn_mask, pool_type, eos_id, extra) of an open_clip CLIP or CustomTextCLIP."""
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "transformer") and hasattr(text, "token_embedding"):
        if getattr(text, "cls_emb", None) is not None:
            raise UnsupportedTextTower("open_clip text tower with a class token (CoCa-style embed_cls) "
                                       "pools the last token, not EOT: prefix sharing does not apply")
        if getattr(text, "use_pad_mask", False):
            raise UnsupportedTextTower("open_clip text tower uses a padding mask (bidirectional): not causal")
        return (text.token_embedding, text.positional_embedding, text.transformer, text.ln_final,
                text.text_projection, getattr(text, "attn_mask", None), getattr(text, "pool_type", "argmax"),
                getattr(text, "eos_id", None))
    if text is not None:
        raise UnsupportedTextTower(f"text tower {type(text).__name__} is not an open_clip TextTransformer "
                                   "(e.g. a Hugging Face text model inside open_clip); not supported")
    return (model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
            model.text_projection, getattr(model, "attn_mask", None), getattr(model, "text_pool_type", "argmax"),
            getattr(model, "text_eos_id", None))


def _mha_qkv(attn: nn.MultiheadAttention) -> Callable[[Tensor], Tuple[Tensor, Tensor, Tensor]]:
    def qkv(x: Tensor):
        return F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return qkv


def _open_clip_tower(model: nn.Module) -> TextTower:
    tok, pos, transformer, ln_final, proj, attn_mask, pool_type, eos_id = _open_clip_parts(model)
    if not _is_causal_mask(attn_mask):
        raise UnsupportedTextTower("the text tower's attn_mask is not the causal mask (a bidirectional "
                                   "or padded tower): prefix sharing would not be exact")
    if pool_type not in ("argmax", "eos"):
        raise UnsupportedTextTower(f"text pooling {pool_type!r} is not EOT pooling ('argmax' or 'eos')")
    if pool_type == "eos" and eos_id is None:
        raise UnsupportedTextTower("pool_type 'eos' without an eos id")
    layers = []
    for i, blk in enumerate(transformer.resblocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or hasattr(blk, "ln_attn") or hasattr(blk, "ln_1_kv"):
            raise UnsupportedTextTower(f"resblock {i} ({type(blk).__name__}) is not a standard "
                                       "residual attention block (custom attention is not supported)")
        if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
            raise UnsupportedTextTower(f"resblock {i}: attention with separate q/k/v weights, bias_k/bias_v "
                                       "or add_zero_attn is not supported")
        if attn.dropout and attn.training:
            raise UnsupportedTextTower(f"resblock {i}: attention dropout {attn.dropout} in training mode")
        layers.append(LayerView(ln_1=blk.ln_1, qkv=_mha_qkv(attn), out_proj=attn.out_proj, ls_1=blk.ls_1,
                                ln_2=blk.ln_2, mlp=blk.mlp, ls_2=blk.ls_2, heads=attn.num_heads))
    if proj is None:
        project = _identity
    elif isinstance(proj, nn.Linear):
        project = proj
    else:
        def project(x: Tensor, p=proj) -> Tensor:
            return x @ p
    width = pos.shape[-1]
    return TextTower(token_embedding=tok, positional_embedding=pos, layers=layers, ln_final=ln_final,
                     project=project, pool_type=pool_type, eos_id=eos_id, context_length=pos.shape[0],
                     width=width)


def _identity(x: Tensor) -> Tensor:
    return x


def _hf_qkv(attn: nn.Module) -> Callable[[Tensor], Tuple[Tensor, Tensor, Tensor]]:
    def qkv(x: Tensor):
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    return qkv


def _hf_tower(model: nn.Module) -> TextTower:
    projection = getattr(model, "text_projection", None)
    text = getattr(model, "text_model", model)
    text = getattr(text, "text_model", text)  # CLIPTextModel wraps a CLIPTextTransformer in some versions
    config = getattr(text, "config", None) or model.config
    config = getattr(config, "text_config", config)
    layers = []
    for i, layer in enumerate(text.encoder.layers):
        attn = layer.self_attn
        if getattr(attn, "dropout", 0.0) and attn.training:
            raise UnsupportedTextTower(f"layer {i}: attention dropout {attn.dropout} in training mode")
        if not math.isclose(attn.scale, attn.head_dim ** -0.5):
            raise UnsupportedTextTower(f"layer {i}: attention scale {attn.scale} is not head_dim ** -0.5")
        layers.append(LayerView(ln_1=layer.layer_norm1, qkv=_hf_qkv(attn), out_proj=attn.out_proj, ls_1=_identity,
                                ln_2=layer.layer_norm2, mlp=layer.mlp, ls_2=_identity, heads=attn.num_heads))
    eos_id = getattr(text, "eos_token_id", getattr(config, "eos_token_id", None))
    # transformers pools at argmax(ids) for the legacy eos_token_id == 2, else at the first eos_token_id.
    pool_type = "argmax" if eos_id == 2 or eos_id is None else "eos"
    pos = text.embeddings.position_embedding.weight
    return TextTower(token_embedding=text.embeddings.token_embedding, positional_embedding=pos, layers=layers,
                     ln_final=text.final_layer_norm, project=projection if projection is not None else _identity,
                     pool_type=pool_type, eos_id=eos_id, context_length=pos.shape[0], width=pos.shape[-1])


def _is_hf_clip(model: nn.Module) -> bool:
    text = getattr(model, "text_model", model)
    text = getattr(text, "text_model", text)
    return (hasattr(text, "embeddings") and hasattr(text, "encoder") and hasattr(text, "final_layer_norm")
            and hasattr(getattr(text, "encoder"), "layers"))


def text_tower(model: nn.Module) -> TextTower:
    """A ``TextTower`` view of ``model``'s text tower, or ``UnsupportedTextTower`` saying why.

    Supported: open_clip ``CLIP`` and ``CustomTextCLIP`` with an open_clip ``TextTransformer``
    (causal ``attn_mask``, pooling 'argmax' or 'eos', standard residual blocks, LayerScale
    allowed, projection a Parameter or nn.Linear), and Hugging Face ``CLIPModel`` /
    ``CLIPTextModel`` / ``CLIPTextModelWithProjection``.
    """
    if isinstance(model, TextTower):
        return model
    if _is_hf_clip(model):
        return _hf_tower(model)
    if hasattr(model, "transformer") or hasattr(model, "text"):
        return _open_clip_tower(model)
    raise UnsupportedTextTower(f"{type(model).__name__} is not a supported CLIP model (open_clip CLIP / "
                               "CustomTextCLIP or transformers CLIPModel)")


# --------------------------------------------------------------------------------------
# The core: prefix-shared forward
# --------------------------------------------------------------------------------------

def prefix_shared_forward(tower: TextTower, prefix: Tensor, suffix: Tensor, suffix_eot: Tensor,
                          layout: Optional[PackedLayout] = None, checkpoint: bool = False) -> Tensor:
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
    for i, layer in enumerate(tower.layers):
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(_layer_forward, layer, x, layout, i == last, use_reentrant=False)
        else:
            x = _layer_forward(layer, x, layout, i == last)
    if last < 0:  # a tower without layers
        x = x.index_select(0, layout.eot_rows + g * p)
    return tower.project(tower.ln_final(x)).view(g, n, -1)


def _layer_forward(layer: LayerView, x: Tensor, layout: PackedLayout, last: bool) -> Tensor:
    """One residual block on the packed rows x [G*P + Ts, W]; the last block returns only the
    G*N pooled (EOT) rows [G*N, W]: keys and values of every row are computed, the attention
    output, out_proj and MLP run on the pooled rows alone."""
    q, k, v = layer.qkv(layer.ln_1(x))
    if last:
        rows = layout.eot_rows + layout.g * layout.p
        x = x.index_select(0, rows)
        a = shared_prefix_attention(q.index_select(0, rows), k, v, layout, layer.heads, eot_only=True)
    else:
        a = shared_prefix_attention(q, k, v, layout, layer.heads)
    x = x + layer.ls_1(layer.out_proj(a))
    return x + layer.ls_2(layer.mlp(layer.ln_2(x)))


# --------------------------------------------------------------------------------------
# The CoOp/DeMul text encoder
# --------------------------------------------------------------------------------------

class PrefixSharedTextEncoder(nn.Module):
    """Text features of C classes x M learned prompts, exact and prefix-shared (SPEC 3.1).

    clip_model: open_clip ``CLIP`` / ``CustomTextCLIP`` or transformers ``CLIPModel`` (its
                weights are used in place, never copied; it is not registered as a
                submodule, so this module's state_dict holds no CLIP weights)
    tokenizer:  the model's tokenizer (open_clip's, or a Hugging Face tokenizer)
    classnames: C class names (underscores become spaces)
    n_ctx:      learned context tokens per prompt
    fallback:   None (refuse an unsupported tower with ``UnsupportedTextTower``) or "full"
                (run such a tower at full length through ``reference.FullTextEncoder``)
    checkpoint: activation checkpointing per layer of the prefix path (exact: the backward
                recomputes each layer instead of keeping its activations)

    ``forward(ctx [M, n_ctx, width]) -> T [C, M, D]`` (unnormalised), equal to
    ``reference.FullTextEncoder`` up to float rounding: the prompts are truncated after
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
            from .reference import FullTextEncoder
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
        ctx = ctx.to(tower.dtype)
        sot = tower.token_embedding(self.sot_id).to(ctx.dtype).expand(m, 1, -1)           # [M, 1, W]
        prefix = torch.cat([sot, ctx], dim=1)                                              # [M, P, W]
        suffix = tower.token_embedding(self.suffix_ids).to(ctx.dtype)                      # [C, S, W]
        c = suffix.shape[0]
        eot = self.suffix_eot.unsqueeze(0).expand(m, c)
        key = (m, eot.device)
        if self._layout is None or self._layout[0] != key:  # built once: no host sync per step
            self.__dict__["_layout"] = (key, PackedLayout.build(m, prefix.shape[1], c, suffix.shape[1], eot))
        out = prefix_shared_forward(tower, prefix, suffix.unsqueeze(0).expand(m, -1, -1, -1), eot,
                                    layout=self._layout[1], checkpoint=self.checkpoint)    # [M, C, D]
        return out.transpose(0, 1)
