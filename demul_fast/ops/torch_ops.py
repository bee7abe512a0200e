"""The "torch" backend: the head in as few PyTorch passes as PyTorch allows.

Not the reference (demul_fast.reference is SPEC 4 written out literally); the same math
computed with less work:

* t^ is computed once and shared by the aggregation and the distillation;
* the distillation runs in the K-free form of SPEC 4.3 (``DistillBasis``): one
  [C*M, D] x [D, r] product and an [C*M, r] epilogue, never a [C, M, K] tensor, with its
  gradient finished during the forward (SPEC 4.2, gradient-in-forward: one
  [C*M, r] x [r, D] product) and only scaled by grad_output in the backward;
* the logits are one [B, D] x [D, C] product; the cross-entropy reads them once for the
  log-sum-exp and once for sum_c q[b,c] s[b,c] (SPEC 4's q, label smoothing included).

Half-precision inputs are upcast to float32 once (float64 stays float64), so every sum
accumulates in float32. Losses come back in float32 (or float64); class features and
logits in the input dtype. The backend-module API (demul_fast.ops.functional): the basis
functions below (``DISTILL_BASIS = True``), and ``*_direct`` for the direct form of
SPEC 4.1, which functional runs when a caller asks for gradients of W, b or E.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as nnf

from .. import reference
from ..common import EPS, HeadOutput, accumulation_dtype, l2_normalize
from .capability import CAN, Call, Capability
from .distill_basis import DistillBasis

DISTILL_BASIS = True  # prompt_distill_loss and demul_head take a DistillBasis (SPEC 4.3)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return accumulation_dtype(x.dtype)


def _up(x, dtype: torch.dtype):
    """A floating tensor in the compute dtype; non-tensors and None pass through."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return x
    return x.to(dtype)


def _class_features(t_hat: torch.Tensor, prompt_logits: torch.Tensor) -> torch.Tensor:
    """t^ [C, M, D], A [C, M] -> u^ [C, D] (one batched product for u)."""
    w = torch.softmax(prompt_logits, dim=-1)
    return l2_normalize(torch.bmm(w.unsqueeze(1), t_hat).squeeze(1))


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """(1/B) sum_b (lse_b - (1 - ls) s[b, y_b] - (ls / C) sum_c s[b, c]): [B, C] -> scalar."""
    picked = logits.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    per_row = torch.logsumexp(logits, dim=-1) - (1.0 - label_smoothing) * picked
    if label_smoothing:
        per_row = per_row - (label_smoothing / logits.shape[-1]) * logits.sum(dim=-1)
    return per_row.mean()


_logits = reference.cosine_logits  # the one logits formula (SPEC 4), in the dtype it is given


def _kfree(t_hat, R, c, F, delta, beta, with_grad: bool):
    """(L_dist, dL_dist/dt^ or None) of rows t^ [C, M, D] in the basis of SPEC 4.3.

    v = R t^ + c, |z| = sqrt(|v|^2 + beta), cos = (<v, F> + delta) / max(|z|, eps);
    dL/dt^ = R^T g, g = -(1/(C*M)) (F - cos v / |z|) / |z| (below eps: -(1/(C*M)) F / eps).
    """
    cls, m, d = t_hat.shape
    v = torch.addmm(c, t_hat.reshape(cls * m, d), R.t()).view(cls, m, -1)  # [C, M, r]
    z_norm = (v.square().sum(-1) + beta).sqrt()  # [C, M]
    z_floor = z_norm.clamp_min(EPS)
    cos = (torch.einsum("cmr,cr->cm", v, F) + delta.unsqueeze(1)) / z_floor
    loss = (1.0 - cos).mean()
    if not with_grad:
        return loss, None
    inv = 1.0 / z_floor
    # below the floor the cos term drops out (the floor is a constant, SPEC 4.1)
    cos_term = torch.where(z_norm >= EPS, cos * inv, torch.zeros_like(cos))
    g = (v * cos_term.unsqueeze(-1) - F.unsqueeze(1)) * (inv / (cls * m)).unsqueeze(-1)  # [C, M, r]
    return loss, (g.view(cls * m, -1) @ R).view(cls, m, d)


class _KFreeDistill(torch.autograd.Function):
    """L_dist from t^ [C, M, D] and the basis (R, c, F, delta, beta) of SPEC 4.3, with its
    gradient made in the forward (SPEC 4.2) and scaled by grad_output in the backward. Under
    create_graph=True the backward recomputes that gradient differentiably (double backward)."""

    @staticmethod
    def forward(ctx, t_hat, R, c, F, delta, beta):
        loss, grad_t_hat = _kfree(t_hat, R, c, F, delta, beta, ctx.needs_input_grad[0])
        if grad_t_hat is not None:
            ctx.save_for_backward(grad_t_hat, t_hat, R, c, F, delta, beta)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_t_hat, *inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is itself differentiable
            grad_t_hat = _kfree(*inputs, with_grad=True)[1]
        return grad_t_hat * grad_loss, None, None, None, None, None


def distill_rows(rows: torch.Tensor, basis: DistillBasis) -> torch.Tensor:
    """mean (1 - cos(W h + b, e)) of rows h [C, M, D] (t^, or an MLP phi's hidden features),
    in the K-free form (SPEC 4.3), computed in the dtype of ``rows``."""
    return _KFreeDistill.apply(rows, *(b.to(rows.dtype) for b in basis))


def aggregate_prompts(text_features, prompt_logits):
    dtype = _compute_dtype(text_features)
    u_hat = _class_features(l2_normalize(_up(text_features, dtype)), _up(prompt_logits, dtype))
    return u_hat.to(text_features.dtype)


def cosine_cross_entropy(image_features, class_features, labels, scale, label_smoothing=0.0):
    dtype = _compute_dtype(image_features)
    logits = _logits(_up(image_features, dtype), _up(class_features, dtype), _up(scale, dtype))
    return _cross_entropy(logits, labels, label_smoothing)


def prompt_distill_loss(text_features, basis: DistillBasis):
    return distill_rows(l2_normalize(_up(text_features, _compute_dtype(text_features))), basis)


def demul_head(text_features, prompt_logits, image_features, labels, scale, basis: Optional[DistillBasis] = None,
               alpha=1.0, label_smoothing=0.0, return_logits=False):
    return _head(text_features, prompt_logits, image_features, labels, scale, alpha, label_smoothing,
                 return_logits, lambda t_hat: distill_rows(t_hat, basis) if basis is not None else None)


def _head(text_features, prompt_logits, image_features, labels, scale, alpha, label_smoothing, return_logits,
          distill) -> HeadOutput:
    """The head with t^ shared; ``distill(t^) -> L_dist or None``."""
    dtype = _compute_dtype(text_features)
    t_hat = l2_normalize(_up(text_features, dtype))
    logits = _logits(_up(image_features, dtype), _class_features(t_hat, _up(prompt_logits, dtype)),
                     _up(scale, dtype))
    ce = _cross_entropy(logits, labels, label_smoothing)
    dist = distill(t_hat)
    if dist is None:
        dist, loss = torch.zeros((), dtype=ce.dtype, device=ce.device), ce
    else:
        loss = ce + alpha * dist
    return HeadOutput(loss, ce, dist, logits.to(text_features.dtype) if return_logits else None)


def _direct_distill(t_hat, phi_weight, phi_bias, llm_embeddings):
    """SPEC 4.1's direct form (z in K dimensions), for gradients of W, b or E."""
    z = nnf.linear(t_hat, phi_weight.to(t_hat.dtype), _up(phi_bias, t_hat.dtype))  # [C, M, K]
    e_hat = l2_normalize(llm_embeddings.to(t_hat.dtype))
    return (1.0 - (l2_normalize(z) * e_hat.unsqueeze(1)).sum(-1)).mean()


def prompt_distill_loss_direct(text_features, phi_weight, phi_bias, llm_embeddings):
    return _direct_distill(l2_normalize(_up(text_features, _compute_dtype(text_features))), phi_weight, phi_bias,
                           llm_embeddings)


def demul_head_direct(text_features, prompt_logits, image_features, labels, scale, llm_embeddings=None,
                      phi_weight=None, phi_bias=None, alpha=1.0, label_smoothing=0.0, return_logits=False):
    def distill(t_hat):
        return None if llm_embeddings is None else _direct_distill(t_hat, phi_weight, phi_bias, llm_embeddings)

    return _head(text_features, prompt_logits, image_features, labels, scale, alpha, label_smoothing,
                 return_logits, distill)


def capability(call: Call) -> Capability:
    """Every device, dtype and call (demul_fast.ops.capability): the torch backend is the
    fallback that never refuses (float64 included; phi/E that require grad run the direct
    form of SPEC 4.1)."""
    return CAN


__all__ = ["DISTILL_BASIS", "capability", "aggregate_prompts", "cosine_cross_entropy", "prompt_distill_loss", "demul_head",
           "prompt_distill_loss_direct", "demul_head_direct", "distill_rows", "HeadOutput"]
