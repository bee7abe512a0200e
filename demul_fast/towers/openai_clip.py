"""OpenAI's ``clip`` package: ``clip.model.CLIP``, and the copies of it that CoOp, CoCoOp,
KgCoOp, MaPLe, PromptSRC and most prompt-learning code bases vendor as ``clip/``.

Structure: ``token_embedding``, ``positional_embedding``, ``transformer.resblocks``,
``ln_final`` and ``text_projection`` (a Parameter ``[W, D]``) on the model; each residual
block keeps its own additive ``attn_mask`` (that is what tells this family from
open_clip's, whose model holds one mask for the tower); the transformer is
sequence-first ``[L, N, W]``; pooling at the argmax of the ids. ``clip.build_model``
casts the linear weights and the projection to float16 and leaves the embeddings and
LayerNorms in float32 (its LayerNorm computes in float32 and returns the input dtype): the
tower computes in the linear weights' dtype, as CoOp's ``TextEncoder`` does.

Vendored copies may change a block's forward (MaPLe's deep prompts take a list, not a
tensor), which no attribute reveals: ``text_tower`` runs each block's own forward once on
a random ``[L, 2, W]`` input and refuses a block that does not compute the standard causal
pre-LN residual block.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import (LayerView, TextTower, TowerFamily, UnsupportedTextTower, check_mha, describe_mask, identity,
                   is_causal_mask, matmul_projection, mha_qkv)

Tensor = torch.Tensor

_VERIFIED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # blocks whose forward was checked


def _plain_block(view: LayerView, x: Tensor) -> Tensor:
    """The standard causal pre-LN residual block on x [N, L, W] (the probe's expectation)."""
    n, length, w = x.shape
    q, k, v = (t.reshape(n, length, view.heads, w // view.heads).transpose(1, 2) for t in view.qkv(view.ln_1(x)))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, length, w)
    x = x + view.ls_1(view.out_proj(a))
    return x + view.ls_2(view.mlp(view.ln_2(x)))


def _check_block_forward(blk: nn.Module, view: LayerView, where: str, length: int, width: int,
                         dtype: torch.dtype, device: torch.device) -> None:
    """Run the block's own forward on random sequence-first hidden states [L, 2, W] and
    compare with the standard block; refuse (naming what was found) if it differs."""
    if blk in _VERIFIED:
        return
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(length, 2, width, generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        try:
            got = blk(x)
        except Exception as exc:  # a custom forward (e.g. MaPLe's takes [x, prompts, counter])
            raise UnsupportedTextTower(f"{where}: its forward fails on {dtype} hidden states [L, N, W] "
                                       f"({type(exc).__name__}: {exc}); a custom attention block (or "
                                       "weights it cannot run in this dtype) is not supported") from exc
        if not isinstance(got, Tensor) or got.shape != x.shape:
            raise UnsupportedTextTower(f"{where}: its forward returns {type(got).__name__}, not hidden states "
                                       "[L, N, W]; a custom attention block is not supported")
        want = _plain_block(view, x.transpose(0, 1)).transpose(0, 1)
        err = float((got.float() - want.float()).abs().max())
        scale = float((want.float() - x.float()).abs().max())
    if not err <= 64 * torch.finfo(dtype).eps * scale:
        raise UnsupportedTextTower(f"{where}: its forward is not the standard causal pre-LN residual block "
                                   f"(max deviation {err:.3g} on a probe whose update is {scale:.3g}); a custom "
                                   "attention block is not supported")
    _VERIFIED.add(blk)


class OpenAIClipFamily(TowerFamily):
    name = "openai_clip"

    def matches(self, model: nn.Module) -> bool:
        blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
        return (isinstance(blocks, nn.Module) and hasattr(model, "token_embedding")
                and any(hasattr(blk, "attn_mask") for blk in blocks))

    def pool_rule(self, model: nn.Module) -> Tuple[str, Optional[int]]:
        return "argmax", None

    def compute_dtype(self, model: nn.Module) -> torch.dtype:
        for blk in model.transformer.resblocks:
            weight = getattr(getattr(blk, "attn", None), "in_proj_weight", None)
            if weight is not None:
                return weight.dtype
        return model.text_projection.dtype

    def text_tower(self, model: nn.Module) -> TextTower:
        pos = model.positional_embedding
        length, width = pos.shape
        dtype = self.compute_dtype(model)
        layers: List[LayerView] = []
        for i, blk in enumerate(model.transformer.resblocks):
            where = f"resblock {i} ({type(blk).__name__})"
            if not is_causal_mask(blk.attn_mask):
                raise UnsupportedTextTower(f"{where} has {describe_mask(blk.attn_mask)}: the text tower is not "
                                           "causal, so prefix sharing would not be exact")
            missing = [a for a in ("ln_1", "ln_2", "mlp") if not isinstance(getattr(blk, a, None), nn.Module)]
            if missing:
                raise UnsupportedTextTower(f"{where} has no {', '.join(missing)}: not a standard residual "
                                           "attention block (custom attention is not supported)")
            check_mha(getattr(blk, "attn", None), where)
            view = LayerView(ln_1=blk.ln_1, qkv=mha_qkv(blk.attn), out_proj=blk.attn.out_proj, ls_1=identity,
                             ln_2=blk.ln_2, mlp=blk.mlp, ls_2=identity, heads=blk.attn.num_heads)
            _check_block_forward(blk, view, where, length, width, dtype, pos.device)
            layers.append(view)
        return TextTower(token_embedding=model.token_embedding, positional_embedding=pos, layers=layers,
                         ln_final=model.ln_final, project=matmul_projection(model.text_projection),
                         pool_type="argmax", eos_id=None, context_length=length, width=width, dtype=dtype)

    def token_embedding(self, model: nn.Module) -> nn.Module:
        return model.token_embedding

    def context_length(self, model: nn.Module) -> int:
        return model.positional_embedding.shape[0]

    def encode_embeddings(self, model: nn.Module, x: Tensor, pool: Tensor) -> Tensor:
        """CoOp's ``TextEncoder.forward`` (the blocks' masks are [context_length]^2, so L
        must be the context length)."""
        dtype = self.compute_dtype(model)
        x = x.to(dtype) + model.positional_embedding.to(dtype)[:x.shape[1]]
        x = model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # NLD -> LND -> NLD
        x = model.ln_final(x).to(dtype)
        return x[torch.arange(x.shape[0], device=x.device), pool] @ model.text_projection

    def encode_text(self, model: nn.Module, ids: Tensor) -> Tensor:
        return model.encode_text(ids)

    def encode_images(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.encode_image(images)

    def text_modules(self, model: nn.Module) -> Dict[str, object]:
        return {"token_embedding": model.token_embedding, "positional_embedding": model.positional_embedding,
                "transformer": model.transformer, "ln_final": model.ln_final,
                "text_projection": model.text_projection}


FAMILY = OpenAIClipFamily()


# --------------------------------------------------------------------------------------
# Checkpoint files (``demul-fast train --pretrained FILE``)
# --------------------------------------------------------------------------------------

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def is_checkpoint(path: str) -> bool:
    """True if ``path`` is a TorchScript archive (how OpenAI ships its CLIP weights). A
    plain state dict in OpenAI's layout is open_clip's layout too: open_clip loads it."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def architecture(model: nn.Module) -> Tuple[int, int, int]:
    """(embed dim, text width, image size) of a ``clip.model.CLIP``, to check it against an
    open_clip model config."""
    return model.text_projection.shape[1], model.ln_final.weight.shape[0], model.visual.input_resolution


def load_checkpoint(path: str, device: torch.device):
    """(``clip.model.CLIP``, ``clip.tokenize`` truncating to 77 tokens, preprocess cfg) from
    an OpenAI TorchScript checkpoint, as ``clip.load(jit=False)`` builds it: weights cast to
    float16 (``clip.build_model``), float32 on CPU."""
    import functools

    import clip
    import clip.model

    state = torch.jit.load(path, map_location="cpu").state_dict()
    model = clip.model.build_model(state)
    if device.type == "cpu":
        model = model.float()
    model = model.to(device).eval().requires_grad_(False)
    size = model.visual.input_resolution
    preprocess = {"size": (size, size), "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic"}
    return model, functools.partial(clip.tokenize, truncate=True), preprocess
