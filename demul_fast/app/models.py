"""The models a run uses: the frozen CLIP model (``load_clip``: open_clip names, config files,
checkpoints, OpenAI's TorchScript archives) with a fingerprint of its weights, and the
DeMul module trained on it (``build_module``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig


def load_clip(model: str, pretrained: str, device: torch.device, init_seed: int = 0):
    """(CLIP model, tokenizer, preprocess cfg, description). ``model`` is an open_clip
    name or a path to an open_clip model-config JSON (its file name is the model name);
    ``pretrained`` an open_clip tag, a local checkpoint file, or "none" (random init seeded
    by ``init_seed``, so that eval rebuilds the same model). An OpenAI checkpoint file (the
    TorchScript archives OpenAI ships) gives OpenAI's ``clip.model.CLIP`` and
    ``clip.tokenize``; ``model`` must then name the same architecture."""
    import open_clip

    from ..towers import openai_clip

    name = model
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"--model config {path} does not exist")
        open_clip.add_model_config(path)
        name = path.stem
    if name not in open_clip.list_models():
        raise ValueError(f"--model {model!r} is not an open_clip model name or config file "
                         f"(e.g. ViT-B-16; see open_clip.list_models())")
    random_init = pretrained.lower() == "none"
    looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if not random_init and looks_like_path and not Path(pretrained).is_file():
        raise FileNotFoundError(f"--pretrained checkpoint {pretrained} does not exist")
    if not random_init and looks_like_path and openai_clip.is_checkpoint(pretrained):
        clip, tokenizer, pre_cfg = openai_clip.load_checkpoint(pretrained, device)
        cfg = open_clip.get_model_config(name)
        found = openai_clip.architecture(clip)
        size = cfg["vision_cfg"]["image_size"]
        expected = (cfg["embed_dim"], cfg["text_cfg"]["width"], size[0] if isinstance(size, (list, tuple)) else size)
        if found != expected:
            raise ValueError(f"--pretrained {pretrained} is an OpenAI CLIP checkpoint with (embed dim, text width, "
                             f"image size) {found}, but --model {model} has {expected}")
        info = {"model_name": name, "random_init": False, "family": "openai_clip", "fingerprint": fingerprint(clip)}
        return clip, tokenizer, pre_cfg, info
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            clip = open_clip.create_model(name, pretrained=None if random_init else pretrained)
        except RuntimeError as exc:
            raise ValueError(f"could not load --pretrained {pretrained!r} for {name}: {exc}. Pass a local "
                               "checkpoint file, or --pretrained none for a randomly initialised model") from exc
    clip = clip.to(device).eval().requires_grad_(False)
    info = {"model_name": name, "random_init": random_init, "fingerprint": fingerprint(clip)}
    return clip, open_clip.get_tokenizer(name), open_clip.get_model_preprocess_cfg(clip), info


def fingerprint(model: nn.Module) -> str:
    """A short hash of the model's weights: eval refuses a model other than the trained one."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().float().cpu()
        h.update(name.encode())
        h.update(f"{tuple(t.shape)}:{float(t.sum()):.6e}:{float(t.abs().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def build_module(cfg: TrainConfig, clip, tokenizer, classnames, llm_embeddings, phi):
    """The trained module (``DeMul``, or ``DeMulReference`` with --reference), its context
    initialised from ``cfg.seed``."""
    from ..model import DeMul, DeMulReference

    cls = DeMulReference if cfg.reference else DeMul
    kwargs = dict(llm_embeddings=llm_embeddings, phi=phi, n_prompts=cfg.prompts, n_ctx=cfg.n_ctx,
                  ctx_init=cfg.ctx_init, alpha=cfg.alpha, backend=cfg.backend)
    if not cfg.reference:
        kwargs.update(text_encoder=cfg.text_encoder, checkpoint_text=cfg.checkpoint_text)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the context initialisation
        return cls(clip, tokenizer, classnames, **kwargs)
