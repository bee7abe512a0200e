"""The DeMul module: M learned prompts, per-class prompt weights, LLM distillation.

``DeMul`` = the CoOp prompt learner (``ctx [M, n_ctx, width]``), the exact prefix-shared
text encoder (``demul_fast.text_encoder``, SPEC 3.1) and ``demul_fast.nn.DeMulHead`` (the
fused head, SPEC 4) over a frozen CLIP model. ``DeMulReference`` is the same module built
from the full-length text encoder (``text_encoder.FullTextEncoder``) and the reference head
(``nn.ReferenceHead``), with the same constructor and ``state_dict`` keys; both derive from
``prompt_learner.DeMulModule`` (the frozen CLIP model, ``ctx``, forward, cached class
features, saving and loading).

The learned prompts are saved as ``prompts.safetensors`` (ctx, prompt_logits) and
``config.json`` (class names and configuration) by ``save_prompts``; ``load_prompts``
reads them back into a module built for the same classes.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from .nn import DeMulHead, Phi, ReferenceHead
from .prompt_learner import DeMulModule, read_prompt_config
from .text_encoder import FullTextEncoder, PrefixSharedTextEncoder

Tensor = torch.Tensor


class DeMul(DeMulModule):
    """DeMul over a frozen CLIP model, with the exact prefix-shared text encoder.

    clip_model:     open_clip ``CLIP``/``CustomTextCLIP`` or transformers ``CLIPModel``; it is
                    frozen (requires_grad False) and kept in eval mode
    tokenizer:      the model's tokenizer
    classnames:     C class names
    llm_embeddings: [C, K] LLM embeddings of the class names, or None (no distillation)
    phi:            nn.Linear(D, K), (W, b), or nn.Sequential ending in nn.Linear
    n_prompts M, n_ctx: prompts and context tokens per prompt
    ctx_init:       None (normal, std 0.02) or a phrase (or M phrases) of n_ctx tokens
    alpha:          distillation weight; learn_weights: False fixes uniform weights
    text_encoder:   "prefix" (exact prefix sharing, refuses unsupported towers), "auto"
                    (prefix, else the full path) or "full" (FullTextEncoder)
    backend:        head backend: None | "cuda" | "triton" | "torch"
    label_smoothing, entropy_weight: SPEC 4 options
    checkpoint_text: activation checkpointing per layer of the prefix-shared encoder (exact;
                    trades a second forward of each layer for its activations)

    Parameters: ``ctx [M, n_ctx, width]``, ``head.prompt_logits [C, M]``.
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Callable, classnames: Sequence[str],
                 llm_embeddings: Optional[Tensor] = None, phi: Optional[Phi] = None, n_prompts: int = 4,
                 n_ctx: int = 16, ctx_init: Union[None, str, Sequence[str]] = None, alpha: float = 1.0,
                 learn_weights: bool = True, text_encoder: str = "prefix", backend: Optional[str] = None,
                 label_smoothing: float = 0.0, entropy_weight: float = 0.0, checkpoint_text: bool = False):
        super().__init__()
        if checkpoint_text and text_encoder == "full":
            raise ValueError("checkpoint_text applies to the prefix-shared text encoder, not text_encoder='full'")
        self._setup(clip_model, tokenizer, classnames, n_prompts, n_ctx, ctx_init, alpha, learn_weights)
        if text_encoder == "prefix":
            self.text_encoder = PrefixSharedTextEncoder(clip_model, tokenizer, classnames, n_ctx,
                                                        checkpoint=checkpoint_text)
        elif text_encoder == "auto":
            self.text_encoder = PrefixSharedTextEncoder(clip_model, tokenizer, classnames, n_ctx, fallback="full",
                                                        checkpoint=checkpoint_text)
        elif text_encoder == "full":
            self.text_encoder = FullTextEncoder(clip_model, tokenizer, classnames, n_ctx)
        else:
            raise ValueError(f"text_encoder must be 'prefix', 'auto' or 'full', got {text_encoder!r}")
        self.head = DeMulHead(len(self.config["classnames"]), n_prompts, llm_embeddings=llm_embeddings, phi=phi,
                              alpha=alpha, learn_weights=learn_weights, label_smoothing=label_smoothing,
                              entropy_weight=entropy_weight, backend=backend)
        if getattr(self.text_encoder, "mode", None) == "prefix":
            self.text_encoder.plan(n_prompts)  # the packed layout, once (re-planned by .to())


class DeMulReference(DeMulModule):
    """DeMul built from ``FullTextEncoder`` (all prompts at full length) and ``ReferenceHead``
    (the specification's ``demul_head``): the reference of ``DeMul``, with the same constructor and
    ``state_dict`` keys (``ctx``, ``head.prompt_logits``, the head's frozen buffers and the
    CLIP model's weights under ``clip_model.``). ``text_encoder`` and ``backend`` are
    accepted for the same signature; the reference always runs the full path in eager
    PyTorch.
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Callable, classnames: Sequence[str],
                 llm_embeddings: Optional[torch.Tensor] = None, phi=None, n_prompts: int = 4, n_ctx: int = 16,
                 ctx_init=None, alpha: float = 1.0, learn_weights: bool = True, text_encoder: str = "full",
                 backend: Optional[str] = None, label_smoothing: float = 0.0, entropy_weight: float = 0.0):
        super().__init__()
        self._setup(clip_model, tokenizer, classnames, n_prompts, n_ctx, ctx_init, alpha, learn_weights)
        self.text_encoder = FullTextEncoder(clip_model, tokenizer, classnames, n_ctx)
        self.head = ReferenceHead(len(self.config["classnames"]), n_prompts, llm_embeddings=llm_embeddings, phi=phi,
                                  alpha=alpha, learn_weights=learn_weights, label_smoothing=label_smoothing,
                                  entropy_weight=entropy_weight)


__all__ = ["DeMul", "DeMulReference", "read_prompt_config"]
