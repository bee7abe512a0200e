"""The interface every CLIP family adapter implements, and the view of a text tower that
the prefix-shared encoder runs (docs/SPEC.md section 3.1).

``TextTower`` is a light view (no weight copies) of a causal, EOT-pooled text tower: token
and positional embedding, the residual blocks (``LayerView``: attention and MLP weights,
layer scale), final LayerNorm, projection, pooling rule, and the dtype it computes in.
``TowerFamily`` is what one family file provides: whether a model has its structure, the
view (or ``UnsupportedTextTower`` naming what was found), and the family's own forward
(``encode_text``, and the same from token embeddings), image encoding, token embedding
and context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

Tensor = torch.Tensor


class UnsupportedTextTower(ValueError):
    """The text tower is not causal with EOT pooling (or has features the prefix-shared
    encoder does not implement), so prefix sharing would not be exact."""


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


def pool_positions(ids: Tensor, pool_type: str, eos_id: Optional[int]) -> Tensor:
    """ids [N, L] -> [N] int64: the position a tower pools at by its rule: "argmax" (the
    largest id, OpenAI's EOT), "eos" (the first ``eos_id``), "first", "last"."""
    if pool_type == "argmax":
        return ids.argmax(dim=-1)
    if pool_type == "eos":
        return (ids == eos_id).int().argmax(dim=-1)
    if pool_type == "first":
        return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    if pool_type == "last":
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    raise ValueError(f"unsupported text pooling {pool_type!r}")


@dataclass
class TextTower:
    """A view of a causal, EOT-pooled CLIP text tower (the model's own weights).

    token_embedding:      ids [...] -> [..., W]
    positional_embedding: [context_length, W]
    layers:               the residual blocks, in order
    ln_final:             [..., W] -> [..., W]
    project:              [..., W] -> [..., D] (identity when the tower has no projection)
    pool_type:            "argmax" (pool at the largest token id) or "eos" (first eos_id)
    dtype:                the dtype the tower computes in (its linear weights' dtype)
    deep_ctx:             k when the blocks are MaPLe's deep-prompt blocks (layers 1.. replace
                          positions 1..k by the next deep prompt), else None
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
    dtype: torch.dtype
    deep_ctx: Optional[int] = None

    def pool_positions(self, ids: Tensor) -> Tensor:
        """ids [N, L] -> [N] int64: the position whose hidden state the tower pools."""
        return pool_positions(ids, self.pool_type, self.eos_id)


class TowerFamily:
    """One CLIP family (one file in ``demul_fast.towers``). ``model`` below is a model of
    the family: the whole CLIP model, its text model, or a module that registered the
    family's text modules under the same names (``CoOpTextEncoder``)."""

    name: str = ""

    def matches(self, model: nn.Module) -> bool:
        """True if ``model`` has this family's structure (attributes, not module paths)."""
        raise NotImplementedError

    def text_tower(self, model: nn.Module) -> TextTower:
        """The view, or ``UnsupportedTextTower`` naming what was found."""
        raise NotImplementedError

    def token_embedding(self, model: nn.Module) -> nn.Module:
        """The token embedding module (ids -> [..., W])."""
        raise NotImplementedError

    def context_length(self, model: nn.Module) -> int:
        raise NotImplementedError

    def compute_dtype(self, model: nn.Module) -> torch.dtype:
        """The dtype the family's own forward computes the text tower in."""
        raise NotImplementedError

    def pool_rule(self, model: nn.Module) -> Tuple[str, Optional[int]]:
        """(pool_type, eos_id) of ``pool_positions``."""
        raise NotImplementedError

    def encode_embeddings(self, model: nn.Module, x: Tensor, pool: Tensor) -> Tensor:
        """The family's own text forward from token embeddings x [N, L, W] (positional
        embedding not yet added; L <= context length), pooled at ``pool`` [N]: [N, D]. Runs
        the library's modules with the model's own attention mask (CoOp's TextEncoder)."""
        raise NotImplementedError

    def encode_text(self, model: nn.Module, ids: Tensor) -> Tensor:
        """The library's own text features of token ids [N, L]: [N, D]."""
        raise NotImplementedError

    def encode_images(self, model: nn.Module, images: Tensor) -> Tensor:
        """The library's own image features of images [B, 3, H, W]: [B, D]."""
        raise NotImplementedError

    def text_modules(self, model: nn.Module) -> Dict[str, object]:
        """What a text encoder registers to hold the tower (modules, parameters, buffers,
        plain attributes) under names for which ``matches`` and ``text_tower`` work on it."""
        raise NotImplementedError


def identity(x: Tensor) -> Tensor:
    return x


def is_causal_mask(mask: Optional[Tensor]) -> bool:
    """True if ``mask`` [L, L] is the additive causal mask (0 on and below the diagonal,
    -inf above). Reads the mask once, at construction."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    m = mask.detach().float().cpu()
    upper = torch.ones_like(m, dtype=torch.bool).triu(1)
    return bool((m[~upper] == 0).all()) and bool(torch.isneginf(m[upper]).all())


def describe_mask(mask: Optional[Tensor]) -> str:
    """A few words on what an attention mask is, for a refusal."""
    if mask is None:
        return "no attention mask (bidirectional attention)"
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return f"an attention mask of shape {tuple(mask.shape)}"
    m = mask.detach().float().cpu()
    if bool((m == 0).all()):
        return "an all-zero attention mask (bidirectional attention)"
    return f"a [{m.shape[0]}, {m.shape[1]}] attention mask that is not the causal one"


def mha_qkv(attn: nn.MultiheadAttention) -> Callable[[Tensor], Tuple[Tensor, Tensor, Tensor]]:
    """q, k, v of an ``nn.MultiheadAttention`` with packed in_proj weights."""
    def qkv(x: Tensor):
        return torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return qkv


def check_mha(attn: nn.Module, where: str) -> None:
    """Refuse an attention module the views do not implement exactly."""
    if not isinstance(attn, nn.MultiheadAttention):
        raise UnsupportedTextTower(f"{where}: attention is {type(attn).__name__}, not nn.MultiheadAttention "
                                   "(a custom attention block is not supported)")
    if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
        raise UnsupportedTextTower(f"{where}: attention with separate q/k/v weights, bias_k/bias_v "
                                   "or add_zero_attn is not supported")
    if attn.dropout and attn.training:
        raise UnsupportedTextTower(f"{where}: attention dropout {attn.dropout} in training mode")


def matmul_projection(proj: Optional[object]) -> Callable[[Tensor], Tensor]:
    """The text projection as a function: None -> identity, a module -> itself, a
    parameter [W, D] -> x @ proj."""
    if proj is None:
        return identity
    if isinstance(proj, nn.Module):
        return proj

    def project(x: Tensor, p=proj) -> Tensor:
        return x @ p
    return project
