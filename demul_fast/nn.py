"""The DeMul head as layers (docs/SPEC.md section 4), and the one composition of its loss.

``DeMulHead`` owns what the DeMul head learns and keeps frozen (the prompt weight logits,
the LLM class-name embeddings and the map phi) and calls the fused ``demul_fast.demul_head``
with its ``backend``; ``ReferenceHead`` is the same layer computed by the specification's
``reference.demul_head`` in the input dtype. Both, and ``sharded.ShardedDeMul``, finish the
loss with ``compose_head`` (an MLP phi's distillation, the entropy regulariser), written once
here. ``CoOpTextEncoder`` (coop.py) is the drop-in text encoder for CoOp-style code.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import reference
from .common import HeadOutput, Scale, l2_normalize
from .ops import functional
from .ops.distill_basis import DistillBasis, DistillBasisCache, build_distill_basis
from .ops.torch_ops import distill_rows
from .prompt_learner import HeadParameters

Tensor = torch.Tensor
Phi = Union[nn.Linear, nn.Sequential, Tuple[Tensor, Optional[Tensor]], Sequence]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: what the heads accumulate in."""
    return torch.promote_types(dtype, torch.float32)


def linear_phi(head: HeadParameters) -> bool:
    """True when the head distils through a linear phi (the fused loss applies)."""
    return head.llm_embeddings is not None and head.phi_pre is None


def mlp_distill(head: HeadParameters, text_features: Tensor, rows: slice = slice(None),
                basis: Optional[DistillBasis] = None) -> Tensor:
    """L_dist of an MLP phi over the classes ``rows`` (SPEC 4), accumulated in float32: its
    earlier layers on t^, then its last linear layer directly, or in the K-free form of
    SPEC 4.3 when ``basis`` (built from the same rows) is given."""
    t32 = text_features.to(accumulation_dtype(text_features.dtype))
    if basis is None:
        return reference.mlp_distill_loss(t32, head.phi_pre, head.phi_weight, head.phi_bias,
                                          head.llm_embeddings[rows])
    h = head.phi_pre(l2_normalize(t32).to(head.phi_weight.dtype)).to(t32.dtype)
    return distill_rows(h, basis)


def compose_head(head: HeadParameters, out: HeadOutput, text_features: Tensor, prompt_logits: Tensor,
                 mlp: Callable[[Tensor], Tensor], share: float = 1.0) -> HeadOutput:
    """The rest of SPEC 4's loss after a head op: ``out`` holds its cross-entropy (and, with a
    linear phi, its distillation and their sum). An MLP phi's distillation ``mlp(T)`` replaces
    the op's; the entropy regulariser lambda * mean_c sum_m w log w of ``prompt_logits`` is
    added when the weights are learned. Both extra terms are scaled by ``share``, the class
    share C_r / C of one rank of ``ShardedDeMul`` (1 elsewhere), and ``distill_loss`` is the
    scaled term. The one place DeMulHead, ReferenceHead and ShardedDeMul add these terms.
    """
    if head.phi_pre is not None:
        dist = share * mlp(text_features).to(out.ce_loss.dtype)
        out = out._replace(loss=out.ce_loss + head.alpha * dist, distill_loss=dist)
    if head.entropy_weight and head.learn_weights:
        ent = share * reference.neg_entropy(prompt_logits).to(out.loss.dtype)
        out = out._replace(loss=out.loss + head.entropy_weight * ent)
    return out


class DeMulHead(HeadParameters):
    """The DeMul head as a layer (SPEC 4).

    num_classes C, num_prompts M
    llm_embeddings: [C, K] LLM embeddings of the class names (frozen buffer) or None (no
                    distillation)
    phi:            nn.Linear(D, K), (W [K, D], b [K] or None), or nn.Sequential ending in
                    nn.Linear (frozen); required with llm_embeddings
    alpha:          distillation weight; label_smoothing: ls of SPEC 4
    learn_weights:  False fixes the prompt weights uniform (``prompt_logits`` a zero buffer)
    entropy_weight: lambda of the optional regulariser lambda * mean_c sum_m w log w
    backend:        None | "cuda" | "triton" | "torch", passed to ``demul_fast.demul_head``

    Parameters/buffers: ``prompt_logits [C, M]`` (init 0), ``llm_embeddings [C, K]``,
    ``phi_weight [K, D]``, ``phi_bias [K]``, and ``phi_pre`` (the MLP's earlier layers), as
    ``prompt_learner.HeadParameters`` defines them (so ``ReferenceHead`` loads the same
    state). With frozen phi the distillation runs in the K-free form of SPEC 4.3 on a basis
    built from these buffers (``distill_basis``); an MLP phi runs its earlier layers on t^,
    then its last linear layer in that form (torch backend).
    """

    def __init__(self, num_classes: int, num_prompts: int, llm_embeddings: Optional[Tensor] = None,
                 phi: Optional[Phi] = None, alpha: float = 1.0, learn_weights: bool = True,
                 label_smoothing: float = 0.0, entropy_weight: float = 0.0, backend: Optional[str] = None):
        super().__init__(num_classes, num_prompts, llm_embeddings=llm_embeddings, phi=phi, alpha=alpha,
                         learn_weights=learn_weights, label_smoothing=label_smoothing,
                         entropy_weight=entropy_weight)
        self.backend = backend
        self._basis_cache = DistillBasisCache(2)  # float32 and float64 compute
        self._planned_basis = {}  # dtype -> the basis ``plan`` pinned for compiled code

    def plan(self, dtype: torch.dtype = torch.float32) -> Optional[DistillBasis]:
        """Decide the distillation basis outside any step and pin it for compiled code.

        Eager calls fetch it from the cache (keyed by identity, version counter and storage of
        W, b, E: ``demul_fast.ops.distill_basis``), so a repeated ``plan`` only compares
        host metadata; a changed buffer rebuilds it. A forward under torch.compile then takes
        the pinned basis as a graph input instead of factoring phi in the graph on every
        step. Call it again after editing phi or E (``demul_fast.compiled_step`` does, before
        every step). dtype: the compute dtype of T (float64 pins a float64 basis)."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        with torch.no_grad():
            basis = self.distill_basis(dtype)
        if basis is None:
            self._planned_basis.pop(dtype, None)
        else:
            self._planned_basis[dtype] = basis
        return basis

    def distill_basis(self, dtype: torch.dtype = torch.float32) -> Optional[DistillBasis]:
        """The basis of SPEC 4.3 of the frozen ``phi_weight``, ``phi_bias``, ``llm_embeddings``
        (None without distillation, or when one of them requires grad: then the direct form
        runs). Built on first use and rebuilt whenever a buffer changes: edited in place,
        replaced, moved to another device or dtype (demul_fast.ops.distill_basis's rule; it is
        not state, so ``state_dict`` does not hold it). Inside torch.compile the basis that
        ``plan`` pinned is used, else it is built in the graph (compiled code cannot key a
        cache on storage)."""
        tensors = (self.phi_weight, self.phi_bias, self.llm_embeddings)
        if self.llm_embeddings is None or (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in tensors)):
            return None
        if torch.compiler.is_compiling():
            pinned = self._planned_basis.get(dtype)
            if pinned is not None and pinned.R.device == self.phi_weight.device:
                return pinned
            return build_distill_basis(*tensors, dtype=dtype)
        return self._basis_cache.get(*tensors, dtype=dtype)

    def class_features(self, text_features: Tensor) -> Tensor:
        """T [C, M, D] -> unit-norm class features u^ [C, D] (for inference)."""
        return functional.aggregate_prompts(text_features, self.prompt_logits.to(text_features.dtype),
                                            backend=self.backend)

    def forward(self, text_features: Tensor, image_features: Tensor, labels: Optional[Tensor] = None,
                scale: Scale = 100.0, return_logits: bool = False) -> HeadOutput:
        """T [C, M, D], X [B, D], labels [B] or None, scale (CLIP's logit_scale.exp()).

        With labels: ``HeadOutput(loss, ce_loss, distill_loss, logits [B, C] if
        return_logits)``. Without: ``HeadOutput(None, None, None, logits [B, C])``.
        """
        dtype = text_features.dtype
        if labels is None:
            return HeadOutput(None, None, None, reference.cosine_logits(image_features.to(dtype),
                                                                        self.class_features(text_features), scale))
        basis = self.distill_basis(accumulation_dtype(dtype))
        linear = linear_phi(self)
        out = functional.demul_head(text_features, self.prompt_logits.to(dtype), image_features.to(dtype), labels,
                                    scale, llm_embeddings=self.llm_embeddings if linear else None,
                                    phi_weight=self.phi_weight if linear else None,
                                    phi_bias=self.phi_bias if linear else None,
                                    distill_basis=basis if linear else None, alpha=self.alpha,
                                    label_smoothing=self.label_smoothing, return_logits=return_logits,
                                    backend=self.backend)
        a32 = self.prompt_logits.to(accumulation_dtype(self.prompt_logits.dtype))
        return compose_head(self, out, text_features, a32, lambda t: mlp_distill(self, t, basis=basis))


class ReferenceHead(HeadParameters):
    """The DeMul head as a layer computed by the specification (``reference.demul_head``,
    ``reference.mlp_distill_loss``) in the input dtype: ``DeMulHead``'s reference, with the
    same parameters, buffers and ``state_dict``."""

    def class_features(self, text_features: Tensor) -> Tensor:
        """T [C, M, D] -> u^ [C, D]."""
        return reference.aggregate_prompts(text_features, self.prompt_logits.to(text_features.dtype))

    def forward(self, text_features: Tensor, image_features: Tensor, labels: Optional[Tensor] = None,
                scale: Scale = 100.0, return_logits: bool = False) -> HeadOutput:
        dtype = text_features.dtype
        if labels is None:
            return HeadOutput(None, None, None, reference.cosine_logits(image_features.to(dtype),
                                                                        self.class_features(text_features), scale))
        linear = linear_phi(self)
        out = reference.demul_head(text_features, self.prompt_logits.to(dtype), image_features.to(dtype), labels,
                                   scale, llm_embeddings=self.llm_embeddings.to(dtype) if linear else None,
                                   phi_weight=self.phi_weight.to(dtype) if linear else None,
                                   phi_bias=self.phi_bias.to(dtype) if linear and self.phi_bias is not None else None,
                                   alpha=self.alpha, label_smoothing=self.label_smoothing,
                                   return_logits=return_logits)
        return compose_head(self, out, text_features, self.prompt_logits.to(dtype),
                            lambda t: reference.mlp_distill_loss(t, self.phi_pre, self.phi_weight, self.phi_bias,
                                                                 self.llm_embeddings))


__all__ = ["DeMulHead", "ReferenceHead", "compose_head", "CoOpTextEncoder"]


def __getattr__(name):
    # The CoOp drop-in encoder lives in coop.py; it is imported on first use because its
    # torch.compiler.disable decorator imports torch._dynamo (about 2 s on import).
    if name == "CoOpTextEncoder":
        from .coop import CoOpTextEncoder
        return CoOpTextEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
