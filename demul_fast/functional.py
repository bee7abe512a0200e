"""The public functional API: validate, choose a backend, run it.

Each function has the reference's signature (demul_fast.reference) plus ``backend``:
``None`` (best available for the tensors' device and dtype, see demul_fast.backends),
``"cuda"``, ``"triton"`` or ``"torch"``. Inputs are checked here, before any kernel runs
(demul_fast._validate). Fast backends return losses in float32 and tensors in the input
dtype; the torch backend computes the reference equations in float32 (float64 stays
float64).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _validate as v
from .backends import select
from .common import HeadOutput, Scale


def aggregate_prompts(text_features: torch.Tensor, prompt_logits: torch.Tensor,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Prompt-weighted, unit-norm class features (SPEC 4).

    text_features: [C, M, D], prompt_logits: [C, M] -> class features [C, D]
    """
    v.validate_aggregate(text_features, prompt_logits)
    _, impl = select(backend, text_features.device, text_features.dtype,
                     ("aggregate_prompts", dict(text_features=text_features, prompt_logits=prompt_logits)))
    return impl.aggregate_prompts(text_features, prompt_logits)


def cosine_cross_entropy(image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor,
                         scale: Scale, label_smoothing: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """Cross-entropy of ``scale`` * cosine logits (SPEC 4).

    image_features: [B, D], class_features: [C, D] (unit norm), labels: [B] -> scalar loss
    """
    v.validate_cross_entropy(image_features, class_features, labels, scale, label_smoothing)
    _, impl = select(backend, image_features.device, image_features.dtype,
                     ("cosine_cross_entropy", dict(image_features=image_features, class_features=class_features)))
    return impl.cosine_cross_entropy(image_features, class_features, labels, scale, label_smoothing)


def prompt_distill_loss(text_features: torch.Tensor, phi_weight: torch.Tensor, phi_bias: Optional[torch.Tensor],
                        llm_embeddings: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Mean (1 - cos(W t^ + b, e)) over classes and prompts (SPEC 4).

    text_features: [C, M, D], phi_weight: [K, D], phi_bias: [K] or None, llm_embeddings: [C, K]
    -> scalar loss
    """
    v.validate_distill(text_features, phi_weight, phi_bias, llm_embeddings)
    _, impl = select(backend, text_features.device, text_features.dtype,
                     ("prompt_distill_loss", dict(text_features=text_features, phi_weight=phi_weight,
                                                  phi_bias=phi_bias, llm_embeddings=llm_embeddings)))
    return impl.prompt_distill_loss(text_features, phi_weight, phi_bias, llm_embeddings)


def demul_head(text_features: torch.Tensor, prompt_logits: torch.Tensor, image_features: torch.Tensor,
               labels: torch.Tensor, scale: Scale, llm_embeddings: Optional[torch.Tensor] = None,
               phi_weight: Optional[torch.Tensor] = None, phi_bias: Optional[torch.Tensor] = None,
               alpha: float = 1.0, label_smoothing: float = 0.0, return_logits: bool = False,
               backend: Optional[str] = None) -> HeadOutput:
    """The whole DeMul head, L = L_ce + alpha * L_dist (SPEC 4).

    text_features: [C, M, D], prompt_logits: [C, M], image_features: [B, D], labels: [B],
    scale: float or 0-dim tensor, llm_embeddings: [C, K] or None, phi_weight: [K, D],
    phi_bias: [K] or None -> HeadOutput(loss, ce_loss, distill_loss, logits [B, C] or None)
    """
    v.validate_head(text_features, prompt_logits, image_features, labels, scale, llm_embeddings,
                    phi_weight, phi_bias, alpha, label_smoothing)
    _, impl = select(backend, text_features.device, text_features.dtype,
                     ("demul_head", dict(text_features=text_features, prompt_logits=prompt_logits,
                                         image_features=image_features, llm_embeddings=llm_embeddings,
                                         phi_weight=phi_weight, phi_bias=phi_bias)))
    return impl.demul_head(text_features, prompt_logits, image_features, labels, scale, llm_embeddings,
                           phi_weight, phi_bias, alpha, label_smoothing, return_logits)
