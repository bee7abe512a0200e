"""Which backend may run a call: the capability question, kept apart from whether the call
is well formed.

Two questions, asked in this order, each once per call:

* validation (demul_fast.ops.validate): is the call well formed at all? Shapes, dtypes,
  devices, label range, finite scale. A malformed call raises an error naming the argument,
  whatever the backend, before any backend is asked anything.
* capability (here): may this backend run this well-formed call? Every backend module
  defines one function ``capability(call: Call) -> Capability``; ``Capability.reason`` is
  None when it can, else why not (an explicit ``backend=`` request raises
  ``BackendUnavailable`` with it; the automatic choice moves on to the next backend).
  ``Capability.plan`` is what the backend had to work out to answer (the Triton backend:
  the launch configurations of the call's shapes, which its launches then read back
  instead of working them out again). demul_fast.ops.backends.select asks each backend it
  considers exactly once per call.

A ``Call`` with ``fn=None`` asks about (device, dtype) alone: what the backend report
(``python -m demul_fast``) shows.

The refusals every kernel backend shares are written here once: the dtypes the kernels
take, and frozen operands (phi, b, E, a given basis) that require grad, which the kernels
give no gradient (SPEC 4.1, 4.3).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, Optional

import torch

from ..common import KERNEL_DTYPES

FUNCTIONS = ("aggregate_prompts", "cosine_cross_entropy", "prompt_distill_loss", "demul_head")
_NO_ARGS: Mapping[str, Any] = MappingProxyType({})


class Call(NamedTuple):
    """What a backend is asked about: the tensors' device and dtype, which public function
    (one of ``FUNCTIONS``, or None for "any call"), and its tensor arguments by name
    (text_features, prompt_logits, image_features, class_features, phi_weight, phi_bias,
    llm_embeddings, distill_basis; absent ones may be missing or None)."""

    device: Optional[torch.device]
    dtype: Optional[torch.dtype]
    fn: Optional[str] = None
    args: Mapping[str, Any] = _NO_ARGS

    def arg(self, name: str):
        return self.args.get(name)


class Capability(NamedTuple):
    """A backend's answer: ``reason`` None (it can run the call) or why it cannot; ``plan``,
    what it worked out to answer (None where it needed nothing)."""

    reason: Optional[str] = None
    plan: Any = None

    @property
    def ok(self) -> bool:
        return self.reason is None


CAN = Capability()


def kernel_dtype(backend: str, dtype: Optional[torch.dtype]) -> Optional[str]:
    """The kernel backends take float32, bfloat16 and float16."""
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return f"the {backend} backend takes float32, bfloat16 or float16 inputs, got {dtype}"
    return None


def frozen_operands(backend: str, call: Call) -> Optional[str]:
    """phi and the LLM embeddings are frozen (SPEC 4.1): the kernel backends compute no
    gradient for them, so a request for one is refused rather than silently dropped."""
    if not torch.is_grad_enabled():
        return None
    for name in ("phi_weight", "phi_bias", "llm_embeddings"):
        t = call.arg(name)
        if t is not None and t.requires_grad:
            return (f"{name} requires grad, but the {backend} backend treats phi_weight, phi_bias and llm_embeddings "
                    f"as frozen (SPEC 4.1) and computes no gradient for them; detach {name} or use backend='torch'")
    return None


def frozen_basis(backend: str, call: Call) -> Optional[str]:
    """A given DistillBasis (SPEC 4.3) gets no gradient from the kernel backends either."""
    basis = call.arg("distill_basis")
    if basis is not None and any(t.requires_grad for t in basis):
        return f"the {backend} backend gives the distillation basis no gradient (phi and E are frozen, SPEC 4.3)"
    return None


def distill_rank(call: Call) -> int:
    """The rank r of the basis the call's distillation runs with (0: no distillation): a
    given basis's, else min(K, D) (the reduced QR of phi_weight [K, D], SPEC 4.3)."""
    basis = call.arg("distill_basis")
    if basis is not None:
        return basis.R.shape[0]
    if call.fn in ("prompt_distill_loss", "demul_head") and call.arg("llm_embeddings") is not None:
        weight = call.arg("phi_weight")
        return min(weight.shape[0], weight.shape[1])
    return 0


__all__ = ["FUNCTIONS", "Call", "Capability", "CAN", "kernel_dtype", "frozen_operands", "frozen_basis",
           "distill_rank"]
