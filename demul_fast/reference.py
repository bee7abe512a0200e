"""The specification in code: docs/SPEC.md section 4 in plain eager PyTorch.

Every function here computes in the dtype of its inputs (it is also the "plain PyTorch
path" whose own low-precision error the fast paths are measured against) and is
differentiable by autograd. It imports ``common`` and nothing else of demul_fast (no kernel,
no module; tests/test_layers.py checks it): the modules built from these functions (the
full-length text encoder ``text_encoder.FullTextEncoder``, the reference head
``nn.ReferenceHead`` and ``model.DeMulReference``) live in the module layer.

Shapes (docs/SPEC.md section 2): C classes, M prompts, D joint embedding dim, B images,
K LLM embedding dim.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ._moved import forward as _forward
from .common import EPS, HeadOutput, Scale, l2_normalize  # noqa: F401  (part of the spec: EPS, HeadOutput)


def aggregate_prompts(text_features: torch.Tensor, prompt_logits: torch.Tensor) -> torch.Tensor:
    """Prompt-weighted class features (SPEC 4: t^, w, u, u^).

    text_features: [C, M, D]  per-prompt text features t (unnormalised)
    prompt_logits: [C, M]     prompt weight logits A
    returns:       [C, D]     unit-norm class features u^
    """
    t_hat = l2_normalize(text_features)
    w = torch.softmax(prompt_logits, dim=-1)
    u = torch.einsum("cm,cmd->cd", w, t_hat)
    return l2_normalize(u)


def cosine_logits(image_features: torch.Tensor, class_features: torch.Tensor, scale: Scale) -> torch.Tensor:
    """s = scale * <x^, class_features>: [B, D] x [C, D] -> [B, C].

    ``class_features`` are used as given (aggregate_prompts returns them unit norm).
    """
    return scale * (l2_normalize(image_features) @ class_features.transpose(0, 1))


def _smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """(1/B) sum_b ( logsumexp_c s[b,:] - sum_c q[b,c] s[b,c] ), written out (SPEC 4)."""
    num_classes = logits.shape[-1]
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    loss = lse - (1.0 - label_smoothing) * target
    if label_smoothing:
        loss = loss - (label_smoothing / num_classes) * logits.sum(dim=-1)
    return loss.mean()


def cosine_cross_entropy(
    image_features: torch.Tensor,
    class_features: torch.Tensor,
    labels: torch.Tensor,
    scale: Scale,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of scaled cosine logits (SPEC 4: x^, s, q, L_ce).

    image_features: [B, D]  image features x (normalised here)
    class_features: [C, D]  class features (used as given; unit norm from aggregate_prompts)
    labels:         [B]     int64 in [0, C)
    scale:          float or 0-dim tensor, the logit multiplier tau (= logit_scale.exp())
    returns:        scalar loss
    """
    return _smoothed_ce(cosine_logits(image_features, class_features, scale), labels, label_smoothing)


def prompt_distill_loss(
    text_features: torch.Tensor,
    phi_weight: torch.Tensor,
    phi_bias: Optional[torch.Tensor],
    llm_embeddings: torch.Tensor,
) -> torch.Tensor:
    """Distillation of LLM class-name embeddings into the prompts (SPEC 4: z, cos, L_dist).

    text_features:  [C, M, D]  per-prompt text features t (normalised here)
    phi_weight:     [K, D]     W of the frozen affine map phi
    phi_bias:       [K] or None
    llm_embeddings: [C, K]     LLM embedding e of each class name (normalised here)
    returns:        scalar, mean over (c, m) of 1 - cos(W t^ + b, e)
    """
    t_hat = l2_normalize(text_features)
    z = t_hat @ phi_weight.transpose(0, 1)  # [C, M, K]
    if phi_bias is not None:
        z = z + phi_bias
    e_hat = l2_normalize(llm_embeddings)  # [C, K]
    cos = (l2_normalize(z) * e_hat.unsqueeze(1)).sum(dim=-1)  # [C, M]
    return (1.0 - cos).mean()


def demul_head(
    text_features: torch.Tensor,
    prompt_logits: torch.Tensor,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    scale: Scale,
    llm_embeddings: Optional[torch.Tensor] = None,
    phi_weight: Optional[torch.Tensor] = None,
    phi_bias: Optional[torch.Tensor] = None,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    return_logits: bool = False,
) -> HeadOutput:
    """The whole DeMul head: L = L_ce + alpha * L_dist (SPEC 4).

    text_features:  [C, M, D]   prompt_logits: [C, M]   image_features: [B, D]
    labels: [B]   scale: float or 0-dim tensor   llm_embeddings: [C, K] or None
    phi_weight: [K, D] (required with llm_embeddings)   phi_bias: [K] or None
    returns: HeadOutput(loss, ce_loss, distill_loss, logits [B, C] or None)
    """
    class_features = aggregate_prompts(text_features, prompt_logits)
    logits = cosine_logits(image_features, class_features, scale)
    ce = _smoothed_ce(logits, labels, label_smoothing)
    if llm_embeddings is not None:
        if phi_weight is None:
            raise ValueError("phi_weight is required when llm_embeddings is given")
        dist = prompt_distill_loss(text_features, phi_weight, phi_bias, llm_embeddings)
        loss = ce + alpha * dist
    else:
        dist = torch.zeros((), dtype=ce.dtype, device=ce.device)
        loss = ce
    return HeadOutput(loss, ce, dist, logits if return_logits else None)


def mlp_distill_loss(text_features: torch.Tensor, pre: nn.Module, phi_weight: torch.Tensor,
                     phi_bias: Optional[torch.Tensor], llm_embeddings: torch.Tensor) -> torch.Tensor:
    """SPEC 4's L_dist when phi is an MLP: z = W pre(t^) + b, mean over (c, m) of 1 - cos(z, e).

    text_features [C, M, D], llm_embeddings [C, K] -> scalar, computed in the dtype of
    text_features (the MLP's hidden features are not unit norm, so the fused loss, which
    normalises its input, does not apply).
    """
    dtype = text_features.dtype
    h = pre(l2_normalize(text_features).to(phi_weight.dtype)).to(dtype)
    z = h @ phi_weight.to(dtype).transpose(0, 1)
    if phi_bias is not None:
        z = z + phi_bias.to(dtype)
    cos = (l2_normalize(z) * l2_normalize(llm_embeddings.to(dtype)).unsqueeze(1)).sum(-1)
    return (1.0 - cos).mean()


def neg_entropy(prompt_logits: torch.Tensor) -> torch.Tensor:
    """mean_c sum_m w log w of w = softmax_m(A) (the optional regulariser of SPEC 4): [C, M] -> scalar."""
    log_w = torch.log_softmax(prompt_logits, -1)
    return (log_w.exp() * log_w).sum(-1).mean()


# the reference modules moved to the module layer; their old names resolve for one release
__getattr__, __dir__ = _forward(__name__, {
    "demul_fast.text_encoder": ("FullTextEncoder",),
    "demul_fast.nn": ("ReferenceHead",),
    "demul_fast.model": ("DeMulReference",),
    "demul_fast.prompt_learner": ("DeMulModule", "HeadParameters"),
})
