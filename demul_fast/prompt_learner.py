"""The module plumbing that ``demul_fast.DeMul``, ``demul_fast.nn.DeMulHead`` and
``model.DeMulReference`` share: the learned context and its initialisation, the head's
parameters and frozen buffers, the frozen CLIP model, forward, cached class features, and
saving/loading the learned prompts. The equations live in ``reference`` (the specification)
and in the op layer, the head's composition in ``nn``; nothing here computes a loss.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import reference, towers
from .common import HeadOutput
from .prompts import init_phrase_tokens

PROMPTS_FILE = "prompts.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def split_phi(phi) -> Tuple[Optional[nn.Module], torch.Tensor, Optional[torch.Tensor]]:
    """phi -> (layers before the last linear map or None, W [K, D], b [K] or None), detached.

    phi: ``nn.Linear(D, K)``, a pair ``(W [K, D], b [K] or None)``, or an ``nn.Sequential``
    whose last layer is an ``nn.Linear`` (its earlier layers run on t^ first, SPEC 4).
    """
    if isinstance(phi, nn.Linear):
        return None, phi.weight.detach(), None if phi.bias is None else phi.bias.detach()
    if isinstance(phi, nn.Sequential):
        if len(phi) == 0 or not isinstance(phi[-1], nn.Linear):
            raise ValueError("phi as nn.Sequential must end with an nn.Linear (its W, b enter the fused loss)")
        pre = phi[:-1] if len(phi) > 1 else None
        return pre, phi[-1].weight.detach(), None if phi[-1].bias is None else phi[-1].bias.detach()
    if isinstance(phi, (tuple, list)) and len(phi) == 2 and isinstance(phi[0], torch.Tensor):
        w, b = phi
        if w.dim() != 2 or (b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0])):
            raise ValueError(f"phi as (W, b) needs W [K, D] and b [K] or None, got {tuple(w.shape)} and "
                             f"{None if b is None else tuple(b.shape)}")
        return None, w.detach(), None if b is None else b.detach()
    raise TypeError(f"phi must be nn.Linear, nn.Sequential ending in nn.Linear, or a (W, b) pair; got {type(phi)}")


class HeadParameters(nn.Module):
    """What the DeMul head learns and keeps frozen (SPEC 4), with the names every DeMul
    head uses: ``prompt_logits [C, M]`` (a Parameter, init 0; a zero buffer when
    ``learn_weights=False``), buffers ``llm_embeddings [C, K]``, ``phi_weight [K, D]``,
    ``phi_bias [K]`` and the frozen ``phi_pre`` (an MLP phi's earlier layers)."""

    def __init__(self, num_classes: int, num_prompts: int, llm_embeddings: Optional[torch.Tensor] = None,
                 phi=None, alpha: float = 1.0, learn_weights: bool = True, label_smoothing: float = 0.0,
                 entropy_weight: float = 0.0):
        super().__init__()
        if num_classes < 1 or num_prompts < 1:
            raise ValueError(f"num_classes and num_prompts must be >= 1, got {num_classes}, {num_prompts}")
        self.num_classes, self.num_prompts = num_classes, num_prompts
        self.alpha, self.label_smoothing = float(alpha), float(label_smoothing)
        self.entropy_weight, self.learn_weights = float(entropy_weight), bool(learn_weights)
        logits = torch.zeros(num_classes, num_prompts)
        if learn_weights:
            self.prompt_logits = nn.Parameter(logits)
        else:
            self.register_buffer("prompt_logits", logits)
        self.phi_pre = None
        w = b = e = None
        if llm_embeddings is not None:
            if phi is None:
                raise ValueError("phi is required when llm_embeddings is given (it maps CLIP text features "
                                 "into the LLM embedding space)")
            if llm_embeddings.dim() != 2 or llm_embeddings.shape[0] != num_classes:
                raise ValueError(f"llm_embeddings must be [C={num_classes}, K], got {tuple(llm_embeddings.shape)}")
            pre, w, b = split_phi(phi)
            if w.shape[0] != llm_embeddings.shape[1]:
                raise ValueError(f"phi maps to K={w.shape[0]} but llm_embeddings has K={llm_embeddings.shape[1]}")
            if pre is not None:  # a frozen copy: the caller's module is left as it is
                self.phi_pre = copy.deepcopy(pre).requires_grad_(False)
            e, w, b = llm_embeddings.detach().clone(), w.clone(), None if b is None else b.clone()
        self.register_buffer("llm_embeddings", e)
        self.register_buffer("phi_weight", w)
        self.register_buffer("phi_bias", b)


def init_context(clip_model: nn.Module, tokenizer: Callable, n_prompts: int, n_ctx: int,
                 ctx_init: Union[None, str, Sequence[str]] = None, generator: Optional[torch.Generator] = None,
                 ) -> torch.Tensor:
    """Initial context ``[M, n_ctx, width]`` (CoOp): normal(std 0.02), or the token
    embeddings of a phrase (one phrase for all prompts, or one per prompt) whose token
    count must equal n_ctx. Float32, or float64 for a float64 model."""
    family = towers.family(clip_model)
    emb = family.token_embedding(clip_model)
    width = emb.weight.shape[1]
    dtype = torch.float64 if emb.weight.dtype == torch.float64 else torch.float32
    if ctx_init is None:
        ctx = torch.empty(n_prompts, n_ctx, width, dtype=dtype, device=emb.weight.device)
        return nn.init.normal_(ctx, std=0.02, generator=generator)
    phrases = [ctx_init] * n_prompts if isinstance(ctx_init, str) else list(ctx_init)
    if len(phrases) != n_prompts:
        raise ValueError(f"ctx_init has {len(phrases)} phrases but n_prompts={n_prompts}")
    rows = []
    pool_type, eos_id = family.pool_rule(clip_model)
    for phrase in phrases:
        ids = init_phrase_tokens(phrase, tokenizer, lambda t: towers.pool_positions(t, pool_type, eos_id),
                                 context_length=family.context_length(clip_model))
        if ids.numel() != n_ctx:
            raise ValueError(f"ctx_init {phrase!r} has {ids.numel()} tokens but n_ctx={n_ctx}: they must match")
        with torch.no_grad():
            rows.append(emb(ids.to(emb.weight.device)).to(dtype))
    return torch.stack(rows)


def encode_images(clip_model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Frozen CLIP image features [B, D] (the family's own image encoder), without gradient."""
    with torch.no_grad():
        return towers.family(clip_model).encode_images(clip_model, images)


def logit_scale(clip_model: nn.Module) -> torch.Tensor:
    """tau = exp(logit_scale), detached (CLIP is frozen)."""
    return clip_model.logit_scale.detach().exp()


class DeMulModule(nn.Module):
    """What ``DeMul`` and ``DeMulReference`` share: parameters, the frozen CLIP
    model, forward, cached class features, saving/loading the learned prompts. A subclass
    sets ``self.text_encoder`` and ``self.head``."""

    def _setup(self, clip_model: nn.Module, tokenizer: Callable, classnames: Sequence[str], n_prompts: int,
               n_ctx: int, ctx_init, alpha: float, learn_weights: bool) -> None:
        if len(list(classnames)) == 0:
            raise ValueError("classnames is empty: at least one class is needed")
        if n_prompts < 1:
            raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
        self.clip_model = clip_model.requires_grad_(False).eval()
        self.config = dict(classnames=[str(c) for c in classnames], n_prompts=int(n_prompts), n_ctx=int(n_ctx),
                           ctx_init=ctx_init, alpha=float(alpha), learn_weights=bool(learn_weights))
        self.ctx = nn.Parameter(init_context(clip_model, tokenizer, n_prompts, n_ctx, ctx_init))
        self._cache = None

    # -- training / inference --------------------------------------------------------
    def train(self, mode: bool = True):
        """Train mode for the prompt learner; CLIP itself stays in eval mode (frozen)."""
        super().train(mode)
        self.clip_model.eval()
        self._cache = None
        return self

    def text_features(self) -> torch.Tensor:
        """Per-prompt text features T [C, M, D] of the current context."""
        return self.text_encoder(self.ctx)

    def plan(self, dtype: Optional[torch.dtype] = None) -> "DeMulModule":
        """Decide, outside any step, what does not change from step to step: the text
        encoder's packed layout for ``n_prompts`` prompts and the head's distillation basis
        (both guarded by identity and version counters: a repeated call compares host
        metadata only, no device access). A compiled forward then runs without building
        either, so a whole step is free of host synchronisation. Returns self."""
        plan = getattr(self.text_encoder, "plan", None)
        if plan is not None:
            plan(self.config["n_prompts"])
        head_plan = getattr(self.head, "plan", None)
        if head_plan is not None:
            head_plan(dtype or self.ctx.dtype)
        return self

    def _cache_key(self):
        a = self.head.prompt_logits
        return (id(self.ctx), self.ctx._version, id(a), a._version, self.ctx.device, self.ctx.dtype)

    def class_features(self) -> torch.Tensor:
        """Unit-norm class features u^ [C, D]. In eval mode computed once without gradient and
        cached until ``ctx`` or ``prompt_logits`` change (in place or replaced) or the
        module goes back to training mode."""
        if self.training:
            self._cache = None
            return self.head.class_features(self.text_features())
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.head.class_features(self.text_features()))
        return self._cache[1]

    def forward(self, images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                image_features: Optional[torch.Tensor] = None) -> HeadOutput:
        """images [B, 3, H, W] (encoded by the frozen image tower) or image_features [B, D];
        labels [B] or None.

        returns ``HeadOutput(loss, ce_loss, distill_loss, logits [B, C])``; without labels
        only the logits (loss fields None). In eval mode without labels the cached class
        features are used (the text encoder does not run, SPEC 5).
        """
        if image_features is None:
            if images is None:
                raise ValueError("give images or image_features")
            image_features = encode_images(self.clip_model, images)
        scale = logit_scale(self.clip_model)
        if labels is None and not self.training:
            u = self.class_features()
            logits = reference.cosine_logits(image_features.to(u.dtype), u, scale.to(u.dtype))
            return HeadOutput(None, None, None, logits)
        return self.head(self.text_features(), image_features, labels, scale=scale, return_logits=True)

    # -- saving / loading the learned prompts -------------------------------------------
    def save_prompts(self, directory: str) -> None:
        """Write ``prompts.safetensors`` (ctx [M, n_ctx, width], prompt_logits [C, M]) and
        ``config.json`` (class names, n_prompts, n_ctx, ctx_init, alpha, learn_weights)."""
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        save_file({"ctx": self.ctx.detach().cpu().contiguous(),
                   "prompt_logits": self.head.prompt_logits.detach().cpu().contiguous()},
                  os.path.join(directory, PROMPTS_FILE))
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump({"format_version": FORMAT_VERSION, **self.config}, f, indent=1)

    def load_prompts(self, directory: str) -> "DeMulModule":
        """Read prompts saved by ``save_prompts`` into this module (same class names and
        shapes, else ValueError). Returns self."""
        from safetensors.torch import load_file
        config = read_prompt_config(directory)
        if config["classnames"] != self.config["classnames"]:
            raise ValueError("saved prompts are for other class names than this module's")
        tensors = load_file(os.path.join(directory, PROMPTS_FILE))
        with torch.no_grad():
            for name, dst in (("ctx", self.ctx), ("prompt_logits", self.head.prompt_logits)):
                if tuple(tensors[name].shape) != tuple(dst.shape):
                    raise ValueError(f"saved {name} has shape {tuple(tensors[name].shape)}, "
                                     f"this module's {tuple(dst.shape)}")
                dst.copy_(tensors[name])
        return self

    @classmethod
    def from_saved_prompts(cls, directory: str, clip_model: nn.Module, tokenizer: Callable,
                           llm_embeddings: Optional[torch.Tensor] = None, phi=None, **kwargs):
        """Build a module from ``config.json`` (class names, sizes) and load the prompts."""
        config = read_prompt_config(directory)
        kw = dict(n_prompts=config["n_prompts"], n_ctx=config["n_ctx"], alpha=config["alpha"],
                  learn_weights=config["learn_weights"])
        kw.update(kwargs)
        return cls(clip_model, tokenizer, config["classnames"], llm_embeddings=llm_embeddings, phi=phi,
                   **kw).load_prompts(directory)


def read_prompt_config(directory: str) -> dict:
    """The ``config.json`` written by ``save_prompts``."""
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = json.load(f)
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unknown prompt file format {config.get('format_version')!r} in {directory}")
    return config
