"""open_clip: ``CLIP`` (text modules on the model) and ``CustomTextCLIP`` (an open_clip
``TextTransformer`` as ``model.text``).

Structure: a ``transformer`` with ``resblocks`` and a ``token_embedding`` on the model or
on ``model.text``; the causal mask is one ``attn_mask`` for the whole tower (the blocks
hold none, unlike OpenAI's); blocks may carry LayerScale (``ls_1``, ``ls_2``); the
projection is a Parameter ``[W, D]`` or an ``nn.Linear``; pooling ``argmax`` or ``eos``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .base import (TextTower, TowerFamily, LayerView, UnsupportedTextTower, check_mha, describe_mask,
                   is_causal_mask, matmul_projection, mha_qkv)

Tensor = torch.Tensor


def _blocks_hold_masks(transformer: nn.Module) -> bool:
    return any(hasattr(blk, "attn_mask") for blk in getattr(transformer, "resblocks", ()))


def _parts(model: nn.Module) -> dict:
    """The pieces of the text tower that ``encode_text`` uses, from ``model.text``
    (CustomTextCLIP) or the model itself (CLIP)."""
    text = getattr(model, "text", None)
    if text is not None:
        if not (hasattr(text, "transformer") and hasattr(text, "token_embedding")):
            raise UnsupportedTextTower(f"text tower {type(text).__name__} is not an open_clip TextTransformer "
                                       "(e.g. a Hugging Face text model inside open_clip); not supported")
        src, pool_attr, eos_attr = text, "pool_type", "eos_id"
    else:
        src, pool_attr, eos_attr = model, "text_pool_type", "text_eos_id"
    return dict(text=text, token_embedding=src.token_embedding, positional_embedding=src.positional_embedding,
                transformer=src.transformer, ln_final=src.ln_final, text_projection=src.text_projection,
                attn_mask=getattr(src, "attn_mask", None), pool_type=getattr(src, pool_attr, "argmax"),
                eos_id=getattr(src, eos_attr, None))


class OpenClipFamily(TowerFamily):
    name = "open_clip"

    def matches(self, model: nn.Module) -> bool:
        text = getattr(model, "text", None)
        if isinstance(text, nn.Module):
            return True
        transformer = getattr(model, "transformer", None)
        return (isinstance(transformer, nn.Module) and hasattr(model, "token_embedding")
                and not _blocks_hold_masks(transformer))

    def text_tower(self, model: nn.Module) -> TextTower:
        p = _parts(model)
        text = p["text"]
        if text is not None and getattr(text, "cls_emb", None) is not None:
            raise UnsupportedTextTower("open_clip text tower with a class token (CoCa-style embed_cls) appended "
                                       "after the text: it pools that last token, not EOT, so prefix sharing "
                                       "does not apply")
        if text is not None and getattr(text, "use_pad_mask", False):
            raise UnsupportedTextTower("open_clip text tower uses a padding mask (bidirectional attention): "
                                       "not causal")
        if not is_causal_mask(p["attn_mask"]):
            raise UnsupportedTextTower(f"the open_clip text tower has {describe_mask(p['attn_mask'])}: not causal, "
                                       "so prefix sharing would not be exact")
        pool_type, eos_id = p["pool_type"], p["eos_id"]
        if pool_type not in ("argmax", "eos"):
            found = {"first": " (a class token in front)", "last": " (a class token at the end)"}.get(pool_type, "")
            raise UnsupportedTextTower(f"text pooling {pool_type!r}{found} is not EOT pooling ('argmax' or 'eos')")
        if pool_type == "eos" and eos_id is None:
            raise UnsupportedTextTower("pool_type 'eos' without an eos id")
        layers = []
        for i, blk in enumerate(p["transformer"].resblocks):
            where = f"resblock {i} ({type(blk).__name__})"
            if hasattr(blk, "ln_attn") or hasattr(blk, "ln_1_kv"):
                raise UnsupportedTextTower(f"{where} is not a standard residual attention block "
                                           "(it has ln_attn / ln_1_kv: custom attention is not supported)")
            check_mha(getattr(blk, "attn", None), where)
            attn = blk.attn
            layers.append(LayerView(ln_1=blk.ln_1, qkv=mha_qkv(attn), out_proj=attn.out_proj, ls_1=blk.ls_1,
                                    ln_2=blk.ln_2, mlp=blk.mlp, ls_2=blk.ls_2, heads=attn.num_heads))
        pos = p["positional_embedding"]
        return TextTower(token_embedding=p["token_embedding"], positional_embedding=pos, layers=layers,
                         ln_final=p["ln_final"], project=matmul_projection(p["text_projection"]),
                         pool_type=pool_type, eos_id=eos_id, context_length=pos.shape[0], width=pos.shape[-1],
                         dtype=pos.dtype)

    def token_embedding(self, model: nn.Module) -> nn.Module:
        return getattr(model, "text", model).token_embedding

    def context_length(self, model: nn.Module) -> int:
        return getattr(model, "text", model).positional_embedding.shape[0]

    def compute_dtype(self, model: nn.Module) -> torch.dtype:
        return getattr(model, "text", model).positional_embedding.dtype

    def pool_rule(self, model: nn.Module) -> Tuple[str, Optional[int]]:
        p = _parts(model)
        return p["pool_type"], p["eos_id"]

    def encode_embeddings(self, model: nn.Module, x: Tensor, pool: Tensor) -> Tensor:
        p = _parts(model)
        x = x.to(p["positional_embedding"].dtype) + p["positional_embedding"][:x.shape[1]]
        # open_clip >= 2.23's Transformer takes [N, L, W] (it has ``batch_first``); older ones [L, N, W]
        batch_first = hasattr(p["transformer"], "batch_first")
        mask = p["attn_mask"]
        if mask is not None:
            mask = mask[:x.shape[1], :x.shape[1]]
        if not batch_first:
            x = x.permute(1, 0, 2)
        x = p["transformer"](x, attn_mask=mask)
        if not batch_first:
            x = x.permute(1, 0, 2)
        x = p["ln_final"](x)
        x = x[torch.arange(x.shape[0], device=x.device), pool]
        return matmul_projection(p["text_projection"])(x)

    def encode_text(self, model: nn.Module, ids: Tensor) -> Tensor:
        return model.encode_text(ids)

    def encode_images(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.encode_image(images)

    def text_modules(self, model: nn.Module) -> Dict[str, object]:
        if isinstance(getattr(model, "text", None), nn.Module):   # CustomTextCLIP
            return {"text": model.text}
        return {"token_embedding": model.token_embedding, "positional_embedding": model.positional_embedding,
                "transformer": model.transformer, "ln_final": model.ln_final,
                "text_projection": model.text_projection, "attn_mask": model.attn_mask,
                "text_pool_type": getattr(model, "text_pool_type", "argmax"),
                "text_eos_id": getattr(model, "text_eos_id", None)}


FAMILY = OpenClipFamily()
