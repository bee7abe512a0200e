"""The specification in code: docs/SPEC.md section 4 in plain eager PyTorch.

Every function here computes in the dtype of its inputs (it is also the "plain PyTorch
path" whose own low-precision error the fast paths are measured against) and is
differentiable by autograd. Nothing here imports a kernel.

Shapes (docs/SPEC.md section 2): C classes, M prompts, D joint embedding dim, B images,
K LLM embedding dim.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .common import EPS, HeadOutput, Scale, l2_normalize  # noqa: F401  (part of the spec: EPS, HeadOutput)
from . import towers
from .prompt_learner import DeMulModule, HeadParameters
from .prompts import build_prompts

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


# --------------------------------------------------------------------------------------
# docs/SPEC.md section 3: the text encoder the CoOp way, and the whole DeMul module
# --------------------------------------------------------------------------------------

class FullTextEncoder(nn.Module):
    """Per-prompt text features the CoOp way (SPEC 3): all C*M prompts at full context
    length through the CLIP text tower.

    clip_model: open_clip ``CLIP`` / ``CustomTextCLIP``, transformers ``CLIPModel`` or OpenAI
                ``clip.model.CLIP`` (used in place, not registered as a submodule)
    tokenizer, classnames, n_ctx: as ``demul_fast.prompts.build_prompts``

    ``forward(ctx [M, n_ctx, width]) -> T [C, M, D]``: token embeddings with positions
    1..n_ctx replaced by ctx[m], then the family's own text forward
    (``towers.TowerFamily.encode_embeddings``: + positional embedding, the transformer with
    the model's own attention mask, ln_final, the hidden state at the pooled (EOT)
    position, text_projection), in the dtype the family computes in.
    """

    def __init__(self, clip_model: nn.Module, tokenizer, classnames, n_ctx: int):
        super().__init__()
        self.__dict__["clip_model"] = clip_model
        family = towers.family(clip_model)
        self.__dict__["family"] = family
        pool_type, eos_id = family.pool_rule(clip_model)
        prompts = build_prompts(classnames, n_ctx, tokenizer, lambda ids: towers.pool_positions(ids, pool_type, eos_id),
                                family.context_length(clip_model))
        self.n_ctx = n_ctx
        self.classnames = prompts.classnames
        self.register_buffer("ids", prompts.ids, persistent=False)    # [C, L]
        self.register_buffer("eot", prompts.eot, persistent=False)    # [C]

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx [M, n_ctx, width] -> T [C, M, D]."""
        model = self.clip_model
        ctx = ctx.to(self.family.compute_dtype(model))
        x = self.family.token_embedding(model)(self.ids).to(ctx.dtype)        # [C, L, W]
        c, length, w = x.shape
        m = ctx.shape[0]
        x = x.unsqueeze(1).expand(c, m, length, w)
        x = torch.cat([x[:, :, :1], ctx.unsqueeze(0).expand(c, m, self.n_ctx, w), x[:, :, 1 + self.n_ctx:]], dim=2)
        pool = self.eot.repeat_interleave(m)                                  # rows are (c, m), m fastest
        return self.family.encode_embeddings(model, x.reshape(c * m, length, w), pool).view(c, m, -1)


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


class ReferenceHead(HeadParameters):
    """The DeMul head as a module, computed by ``demul_head`` above in the input dtype."""

    def class_features(self, text_features: torch.Tensor) -> torch.Tensor:
        """T [C, M, D] -> u^ [C, D]."""
        return aggregate_prompts(text_features, self.prompt_logits.to(text_features.dtype))

    def forward(self, text_features: torch.Tensor, image_features: torch.Tensor,
                labels: Optional[torch.Tensor] = None, scale: Scale = 100.0, return_logits: bool = False) -> HeadOutput:
        dtype = text_features.dtype
        if labels is None:
            return HeadOutput(None, None, None, cosine_logits(image_features.to(dtype),
                                                              self.class_features(text_features), scale))
        fused = self.llm_embeddings is not None and self.phi_pre is None
        out = demul_head(text_features, self.prompt_logits.to(dtype), image_features.to(dtype), labels, scale,
                         llm_embeddings=self.llm_embeddings.to(dtype) if fused else None,
                         phi_weight=self.phi_weight.to(dtype) if fused else None,
                         phi_bias=self.phi_bias.to(dtype) if fused and self.phi_bias is not None else None,
                         alpha=self.alpha, label_smoothing=self.label_smoothing, return_logits=return_logits)
        if self.phi_pre is not None:
            dist = mlp_distill_loss(text_features, self.phi_pre, self.phi_weight, self.phi_bias, self.llm_embeddings)
            out = out._replace(loss=out.ce_loss + self.alpha * dist, distill_loss=dist)
        if self.entropy_weight and self.learn_weights:
            out = out._replace(loss=out.loss + self.entropy_weight * neg_entropy(self.prompt_logits.to(dtype)))
        return out


class DeMulReference(DeMulModule):
    """DeMul built from ``FullTextEncoder`` (all prompts at full length) and ``demul_head``
    above: the specification of ``demul_fast.DeMul``, with the same constructor and
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
