"""The public functional API: validate, choose a backend, run it.

Per call: the arguments are validated once (demul_fast.ops.validate: errors name the
argument), then ``backends.select`` asks each backend it considers, once, whether it can
run the call (its ``capability``, demul_fast.ops.capability), then the chosen backend runs.

Each function has the reference's signature (demul_fast.reference) plus ``backend``:
``None`` (best available for the tensors' device and dtype, see demul_fast.ops.backends),
``"cuda"``, ``"triton"`` or ``"torch"``. Inputs are checked here, before any kernel runs
(demul_fast.ops.validate). Fast backends return losses in float32 and tensors in the input
dtype; the torch backend computes in float32 (float64 stays float64).

phi (W, b) and the LLM embeddings E are frozen in DeMul: the distillation then runs in the
K-free form of SPEC 4.3 on the basis built from them once (``demul_fast.ops.distill_basis``;
every backend module takes it: ``DISTILL_BASIS``). When a
caller asks for a gradient of W, b or E, the direct form of SPEC 4.1 runs (torch backend).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import validate as v
from .backends import select
from ..common import HeadOutput, Scale, accumulation_dtype
from .distill_basis import DistillBasis, frozen_basis


def aggregate_prompts(text_features: torch.Tensor, prompt_logits: torch.Tensor,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Prompt-weighted, unit-norm class features (SPEC 4).

    text_features: [C, M, D], prompt_logits: [C, M] -> class features [C, D]
    """
    v.validate_aggregate(text_features, prompt_logits)
    impl = select(backend, text_features.device, text_features.dtype,
                  ("aggregate_prompts", dict(text_features=text_features, prompt_logits=prompt_logits))).module
    return impl.aggregate_prompts(text_features, prompt_logits)


def cosine_cross_entropy(image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor,
                         scale: Scale, label_smoothing: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """Cross-entropy of ``scale`` * cosine logits (SPEC 4).

    image_features: [B, D], class_features: [C, D] (unit norm), labels: [B] -> scalar loss
    """
    v.validate_cross_entropy(image_features, class_features, labels, scale, label_smoothing)
    impl = select(backend, image_features.device, image_features.dtype,
                  ("cosine_cross_entropy", dict(image_features=image_features, class_features=class_features))).module
    return impl.cosine_cross_entropy(image_features, class_features, labels, scale, label_smoothing)


def _select(backend: Optional[str], fn: str, args: dict):
    """The backend module for a call (demul_fast.ops.backends.select)."""
    t = args["text_features"]
    return select(backend, t.device, t.dtype, (fn, args)).module


def _basis(text_features: torch.Tensor, phi_weight, phi_bias, llm_embeddings,
           distill_basis: Optional[DistillBasis]) -> Optional[DistillBasis]:
    """The basis of SPEC 4.3 the call runs with, or None for the direct form of SPEC 4.1.

    A given ``distill_basis`` is used as it is; otherwise ``distill_basis.frozen_basis``
    decides (the rule, written once), in the accumulation dtype of the text features.
    """
    if distill_basis is not None:
        return distill_basis
    return frozen_basis(phi_weight, phi_bias, llm_embeddings, accumulation_dtype(text_features.dtype))


def prompt_distill_loss(text_features: torch.Tensor, phi_weight: Optional[torch.Tensor] = None,
                        phi_bias: Optional[torch.Tensor] = None, llm_embeddings: Optional[torch.Tensor] = None,
                        backend: Optional[str] = None, distill_basis: Optional[DistillBasis] = None) -> torch.Tensor:
    """Mean (1 - cos(W t^ + b, e)) over classes and prompts (SPEC 4).

    text_features: [C, M, D], phi_weight: [K, D], phi_bias: [K] or None, llm_embeddings: [C, K]
    -> scalar loss. With frozen phi/E the K-free form of SPEC 4.3 runs (its basis cached,
    see ``_basis``); ``distill_basis`` (a ``DistillBasis`` of [C, r] classes) replaces
    phi/E, which may then be omitted.
    """
    if distill_basis is None or phi_weight is not None or llm_embeddings is not None:
        v.validate_distill(text_features, phi_weight, phi_bias, llm_embeddings)
    if distill_basis is not None:
        v.validate_basis(text_features, distill_basis)
    impl = _select(backend, "prompt_distill_loss",
                   dict(text_features=text_features, phi_weight=phi_weight, phi_bias=phi_bias,
                        llm_embeddings=llm_embeddings, distill_basis=distill_basis))
    basis = _basis(text_features, phi_weight, phi_bias, llm_embeddings, distill_basis)
    if basis is None:
        return impl.prompt_distill_loss_direct(text_features, phi_weight, phi_bias, llm_embeddings)
    return impl.prompt_distill_loss(text_features, basis)


def demul_head(text_features: torch.Tensor, prompt_logits: torch.Tensor, image_features: torch.Tensor,
               labels: torch.Tensor, scale: Scale, llm_embeddings: Optional[torch.Tensor] = None,
               phi_weight: Optional[torch.Tensor] = None, phi_bias: Optional[torch.Tensor] = None,
               alpha: float = 1.0, label_smoothing: float = 0.0, return_logits: bool = False,
               backend: Optional[str] = None, distill_basis: Optional[DistillBasis] = None) -> HeadOutput:
    """The whole DeMul head, L = L_ce + alpha * L_dist (SPEC 4).

    text_features: [C, M, D], prompt_logits: [C, M], image_features: [B, D], labels: [B],
    scale: float or 0-dim tensor, llm_embeddings: [C, K] or None, phi_weight: [K, D],
    phi_bias: [K] or None -> HeadOutput(loss, ce_loss, distill_loss, logits [B, C] or None)
    With frozen phi/E the distillation runs in the K-free form of SPEC 4.3 (its basis
    cached, see ``_basis``); ``distill_basis`` replaces phi/E, which may then be omitted.
    """
    v.validate_head(text_features, prompt_logits, image_features, labels, scale, llm_embeddings, phi_weight,
                    phi_bias, alpha, label_smoothing)
    if distill_basis is not None:
        v.validate_basis(text_features, distill_basis)
    impl = _select(backend, "demul_head",
                   dict(text_features=text_features, prompt_logits=prompt_logits, image_features=image_features,
                        llm_embeddings=llm_embeddings, phi_weight=phi_weight, phi_bias=phi_bias,
                        distill_basis=distill_basis))
    basis = None
    if distill_basis is not None or llm_embeddings is not None:
        basis = _basis(text_features, phi_weight, phi_bias, llm_embeddings, distill_basis)
        if basis is None:
            return impl.demul_head_direct(text_features, prompt_logits, image_features, labels, scale,
                                          llm_embeddings, phi_weight, phi_bias, alpha, label_smoothing,
                                          return_logits)
    return impl.demul_head(text_features, prompt_logits, image_features, labels, scale, basis, alpha,
                           label_smoothing, return_logits)
