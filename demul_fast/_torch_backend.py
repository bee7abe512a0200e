"""The "torch" backend: the reference equations, accumulated in float32.

Half-precision inputs are upcast to float32 before the reference runs (float64 stays
float64), so this path obeys the package's float32-accumulation rule on every device.
Losses come back in float32 (or float64); class features and logits in the input dtype.
Gradients reach the original tensors through the casts.
"""

from __future__ import annotations

import torch

from . import reference
from .common import HeadOutput


def _up(x, like=None):
    """Cast a floating tensor to the compute dtype: float64 if ``like`` (default x) is
    float64, else float32. Non-tensors and None pass through."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return x
    ref = x if like is None else like
    return x.to(torch.float64 if ref.dtype == torch.float64 else torch.float32)


def aggregate_prompts(text_features, prompt_logits):
    out = reference.aggregate_prompts(_up(text_features), _up(prompt_logits, text_features))
    return out.to(text_features.dtype)


def cosine_cross_entropy(image_features, class_features, labels, scale, label_smoothing=0.0):
    return reference.cosine_cross_entropy(_up(image_features), _up(class_features), labels,
                                          _up(scale, image_features), label_smoothing)


def prompt_distill_loss(text_features, phi_weight, phi_bias, llm_embeddings):
    t = text_features
    return reference.prompt_distill_loss(_up(t), _up(phi_weight, t), _up(phi_bias, t), _up(llm_embeddings, t))


def demul_head(text_features, prompt_logits, image_features, labels, scale, llm_embeddings=None,
               phi_weight=None, phi_bias=None, alpha=1.0, label_smoothing=0.0, return_logits=False):
    t = text_features
    out = reference.demul_head(_up(t), _up(prompt_logits, t), _up(image_features, t), labels, _up(scale, t),
                               _up(llm_embeddings, t), _up(phi_weight, t), _up(phi_bias, t), alpha,
                               label_smoothing, return_logits)
    if out.logits is not None:
        out = out._replace(logits=out.logits.to(text_features.dtype))
    return out


__all__ = ["aggregate_prompts", "cosine_cross_entropy", "prompt_distill_loss", "demul_head", "HeadOutput"]
