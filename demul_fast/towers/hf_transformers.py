"""Hugging Face transformers: ``CLIPModel``, ``CLIPTextModel``,
``CLIPTextModelWithProjection``.

Structure: a text transformer (``model.text_model``, possibly wrapped once more) with
``embeddings`` (token and position embedding), ``encoder.layers`` (``self_attn`` with
q/k/v/out projections, ``layer_norm1/2``, ``mlp``) and ``final_layer_norm``; an optional
``text_projection`` (nn.Linear) on the outer model. The tower builds its causal mask
itself. Pooling: argmax of the ids for the legacy ``eos_token_id == 2``, else the first
``eos_token_id`` (transformers' own rule, written once here).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .base import LayerView, TextTower, TowerFamily, UnsupportedTextTower, identity

Tensor = torch.Tensor


def _text_model(model: nn.Module) -> nn.Module:
    text = getattr(model, "text_model", model)
    return getattr(text, "text_model", text)  # CLIPTextModel wraps a CLIPTextTransformer


def _qkv(attn: nn.Module) -> Callable[[Tensor], Tuple[Tensor, Tensor, Tensor]]:
    def qkv(x: Tensor):
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    return qkv


def _unwrap(out):
    """A layer's or a model's output: the tensor itself or the first field."""
    if isinstance(out, Tensor):
        return out
    return out[0] if isinstance(out, tuple) else out.pooler_output


def _refuse_bidirectional(text: nn.Module) -> None:
    """CLIP's text transformer builds a causal mask and pools at EOT; SigLIP-style text
    models (a pooling ``head``, no causal mask) attend both ways and pool the last token."""
    if isinstance(getattr(text, "head", None), nn.Module):
        raise UnsupportedTextTower(f"{type(text).__name__} has a pooling head (SigLIP-style): bidirectional "
                                   "attention pooled at the last token, not a causal EOT-pooled CLIP tower")


class TransformersFamily(TowerFamily):
    name = "transformers"

    def matches(self, model: nn.Module) -> bool:
        text = _text_model(model)
        return (hasattr(text, "embeddings") and hasattr(text, "final_layer_norm")
                and hasattr(getattr(text, "encoder", None), "layers"))

    def pool_rule(self, model: nn.Module) -> Tuple[str, Optional[int]]:
        text = _text_model(model)
        config = getattr(text, "config", None) or model.config
        config = getattr(config, "text_config", config)
        eos_id = getattr(text, "eos_token_id", getattr(config, "eos_token_id", None))
        return ("argmax", None) if eos_id in (None, 2) else ("eos", eos_id)

    def text_tower(self, model: nn.Module) -> TextTower:
        text = _text_model(model)
        _refuse_bidirectional(text)
        layers = []
        for i, layer in enumerate(text.encoder.layers):
            attn = getattr(layer, "self_attn", None)
            where = f"layer {i} ({type(layer).__name__})"
            if attn is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj")):
                raise UnsupportedTextTower(f"{where}: attention {type(attn).__name__} has no q/k/v/out projections "
                                           "(a custom attention block is not supported)")
            if getattr(attn, "dropout", 0.0) and attn.training:
                raise UnsupportedTextTower(f"{where}: attention dropout {attn.dropout} in training mode")
            if not math.isclose(attn.scale, attn.head_dim ** -0.5):
                raise UnsupportedTextTower(f"{where}: attention scale {attn.scale} is not head_dim ** -0.5")
            layers.append(LayerView(ln_1=layer.layer_norm1, qkv=_qkv(attn), out_proj=attn.out_proj, ls_1=identity,
                                    ln_2=layer.layer_norm2, mlp=layer.mlp, ls_2=identity, heads=attn.num_heads))
        pool_type, eos_id = self.pool_rule(model)
        pos = text.embeddings.position_embedding.weight
        projection = getattr(model, "text_projection", None)
        return TextTower(token_embedding=text.embeddings.token_embedding, positional_embedding=pos, layers=layers,
                         ln_final=text.final_layer_norm, project=projection if projection is not None else identity,
                         pool_type=pool_type, eos_id=eos_id, context_length=pos.shape[0], width=pos.shape[-1],
                         dtype=pos.dtype)

    def token_embedding(self, model: nn.Module) -> nn.Module:
        return _text_model(model).embeddings.token_embedding

    def context_length(self, model: nn.Module) -> int:
        return _text_model(model).embeddings.position_embedding.weight.shape[0]

    def compute_dtype(self, model: nn.Module) -> torch.dtype:
        return _text_model(model).embeddings.position_embedding.weight.dtype

    def encode_embeddings(self, model: nn.Module, x: Tensor, pool: Tensor) -> Tensor:
        text = _text_model(model)
        _refuse_bidirectional(text)  # the causal mask below is CLIP's; a SigLIP tower has none
        pos = text.embeddings.position_embedding.weight
        length = x.shape[1]
        x = x.to(pos.dtype) + pos[:length]
        mask = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        for layer in text.encoder.layers:
            x = _unwrap(layer(x, mask[None, None]))
        x = text.final_layer_norm(x)
        x = x[torch.arange(x.shape[0], device=x.device), pool]
        proj = getattr(model, "text_projection", None)
        return proj(x) if proj is not None else x

    def encode_text(self, model: nn.Module, ids: Tensor) -> Tensor:
        if hasattr(model, "get_text_features"):
            return _unwrap(model.get_text_features(input_ids=ids))
        out = model(input_ids=ids)
        return out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output

    def encode_images(self, model: nn.Module, images: Tensor) -> Tensor:
        return _unwrap(model.get_image_features(pixel_values=images))

    def text_modules(self, model: nn.Module) -> Dict[str, object]:
        return {"text_model": model.text_model, "text_projection": getattr(model, "text_projection", None)}


FAMILY = TransformersFamily()
