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
pre-LN residual block. A block whose forward takes MaPLe's list ``[x, deeper, counter]`` is
probed as MaPLe's deep-prompt block (replace positions 1..k of x by ``deeper[counter]``
while counter < len(deeper), counter += 1, then the standard block; k read from what the
block does with a probe prompt; block 0 never replaces): such a tower is accepted with
``TextTower.deep_ctx = k`` and runs its deep prompts through ``prefix_shared_forward``;
anything else is refused, naming what the probe found.
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

_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, Optional[int]]" = weakref.WeakKeyDictionary()
# blocks whose forward was checked -> what it is (None standard, 0 / k MaPLe's)


def _plain_block(view: LayerView, x: Tensor) -> Tensor:
    """The standard causal pre-LN residual block on x [N, L, W] (the probe's expectation)."""
    n, length, w = x.shape
    q, k, v = (t.reshape(n, length, view.heads, w // view.heads).transpose(1, 2) for t in view.qkv(view.ln_1(x)))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, length, w)
    x = x + view.ls_1(view.out_proj(a))
    return x + view.ls_2(view.mlp(view.ln_2(x)))


def _probe_input(length: int, width: int, dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(length, 2, width, generator=gen).to(device=device, dtype=dtype)


def _deviation(got: Tensor, want: Tensor, x: Tensor, dtype: torch.dtype) -> Optional[str]:
    """None if ``got`` is ``want`` up to rounding, else what differs (for a refusal)."""
    if got.shape != want.shape:
        return f"hidden states of shape {tuple(got.shape)} where {tuple(want.shape)} was expected"
    err = float((got.float() - want.float()).abs().max())
    scale = float((want.float() - x.float()).abs().max())
    if err <= 64 * torch.finfo(dtype).eps * scale:
        return None
    return f"max deviation {err:.3g} on a probe whose update is {scale:.3g}"


def _replace_context(x: Tensor, prompt: Tensor) -> Tensor:
    """MaPLe's replacement on sequence-first x [L, N, W]: positions 1..k become prompt [k, W]."""
    k = prompt.shape[0]
    return torch.cat([x[:1], prompt.unsqueeze(1).expand(-1, x.shape[1], -1).to(x.dtype), x[1 + k:]])


def _probe_deep_block(blk: nn.Module, view: LayerView, length: int, width: int, dtype: torch.dtype,
                      device: torch.device) -> Tuple[Optional[int], str]:
    """MaPLe's deep-prompt block, recognised by what its forward computes on its list input
    ``[x, deeper, counter]``: (k, "") for a block that replaces positions 1..k by
    ``deeper[counter]`` while counter < len(deeper) (counter += 1) and then runs the standard
    block; (0, "") for one that never replaces (MaPLe's first layer); (None, what was found)
    otherwise. k is read from the length the block gives back for a probe prompt."""
    x = _probe_input(length, width, dtype, device, 0)
    plain = _plain_block(view, x.transpose(0, 1)).transpose(0, 1)

    def call(deeper, counter):
        out = blk([x, deeper, counter])
        if not (isinstance(out, (list, tuple)) and len(out) == 3 and isinstance(out[0], Tensor)):
            raise TypeError(f"returns {type(out).__name__}, not [x, deeper, counter]")
        return out[0], out[2]

    try:
        with torch.no_grad():
            got, counter = call([], 0)
            bad = _deviation(got, plain, x, dtype)
            if bad or counter != 0:
                return None, (f"on [x, [], 0] it is not the standard block ({bad or f'counter {counter}'})")
            k = None
            for trial in range(1, length - 1):  # the block's own k: the one that keeps the length
                deeper = [_probe_input(trial, width, dtype, device, 1 + j)[:, 0] for j in range(2)]
                try:
                    got, counter = call(deeper, 0)
                except RuntimeError:
                    continue
                if counter == 0 and _deviation(got, plain, x, dtype) is None:
                    return 0, ""  # never replaces (MaPLe's first layer)
                if counter == 1 and got.shape == x.shape:
                    k = trial
                    break
            if k is None:
                return None, "on [x, deeper, 0] it neither keeps x's length nor ignores deeper"
            for c in (0, 1, 2):  # replace with deeper[c] while c < len(deeper), then stop
                got, counter = call(deeper, c)
                want = _plain_block(view, (_replace_context(x, deeper[c]) if c < 2 else x).transpose(0, 1))
                bad = _deviation(got, want.transpose(0, 1), x, dtype)
                if bad or counter != min(c + 1, 2):
                    return None, (f"on [x, deeper, {c}] it does not compute MaPLe's deep-prompt block "
                                  f"({bad or f'counter {counter}'})")
    except Exception as exc:  # noqa: BLE001 - any failure is what was found
        return None, f"on [x, deeper, counter] it fails ({type(exc).__name__}: {exc})"
    return k, ""


def _check_block_forward(blk: nn.Module, view: LayerView, where: str, length: int, width: int,
                         dtype: torch.dtype, device: torch.device) -> Optional[int]:
    """Run the block's own forward on random sequence-first hidden states [L, 2, W] and
    compare with the standard block; a block whose forward takes MaPLe's list is probed as
    MaPLe's deep-prompt block. Returns None (standard block), 0 (MaPLe's, never replacing) or
    k (MaPLe's, replacing positions 1..k); refuses (naming what was found) otherwise."""
    if blk in _VERIFIED:
        return _VERIFIED[blk]
    x = _probe_input(length, width, dtype, device, 0)
    with torch.no_grad():
        try:
            got = blk(x)
        except Exception as exc:  # a custom forward (e.g. MaPLe's takes [x, prompts, counter])
            k, found = _probe_deep_block(blk, view, length, width, dtype, device)
            if k is None:
                raise UnsupportedTextTower(f"{where}: its forward fails on {dtype} hidden states [L, N, W] "
                                           f"({type(exc).__name__}: {exc}), and it is not MaPLe's deep-prompt "
                                           f"block: {found}; a custom attention block (or weights it cannot run "
                                           "in this dtype) is not supported") from exc
            _VERIFIED[blk] = k
            return k
        if not isinstance(got, Tensor) or got.shape != x.shape:
            raise UnsupportedTextTower(f"{where}: its forward returns {type(got).__name__}, not hidden states "
                                       "[L, N, W]; a custom attention block is not supported")
        bad = _deviation(got, _plain_block(view, x.transpose(0, 1)).transpose(0, 1), x, dtype)
    if bad:
        raise UnsupportedTextTower(f"{where}: its forward is not the standard causal pre-LN residual block "
                                   f"({bad}); a custom attention block is not supported")
    _VERIFIED[blk] = None
    return None


def _deep_schedule(kinds: List[Optional[int]]) -> Optional[int]:
    """k of a tower of MaPLe blocks (block 0 never replaces, blocks 1.. replace k positions),
    None for standard blocks; refuses any other mixture, naming it."""
    if all(kind is None for kind in kinds):
        return None
    found = ", ".join(f"resblock {i}: " + ("standard" if kind is None else "deep-prompt, never replaces" if kind == 0
                                           else f"deep-prompt, replaces {kind} positions")
                      for i, kind in enumerate(kinds))
    ks = set(kinds[1:])
    if kinds[0] != 0 or len(ks) != 1 or None in ks or 0 in ks:
        raise UnsupportedTextTower(f"the text blocks are not MaPLe's schedule (block 0 never replaces, every later "
                                   f"block replaces the same positions 1..k): {found}")
    return ks.pop() if kinds[1:] else None


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
        kinds: List[Optional[int]] = []
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
            kinds.append(_check_block_forward(blk, view, where, length, width, dtype, pos.device))
            layers.append(view)
        return TextTower(token_embedding=model.token_embedding, positional_embedding=pos, layers=layers,
                         ln_final=model.ln_final, project=matmul_projection(model.text_projection),
                         pool_type="argmax", eos_id=None, context_length=length, width=width, dtype=dtype,
                         deep_ctx=_deep_schedule(kinds))

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
