"""The conventions and helpers by which the kernel backends wrap their kernels in custom ops
(demul_fast.ops.triton_ops and demul_fast.ops.cuda_ops), so that both do it the same way.

Conventions of every kernel backend (docs/OPS.md):

* custom ops are named ``demul_fast::<backend>_<function>`` and
  ``demul_fast::<backend>_<function>_backward`` after the public function they implement
  (``aggregate_prompts``, ``cosine_cross_entropy``, ``prompt_distill_loss``, ``demul_head``);
* a forward op returns ``(output, *statistics)`` with the statistics it saves for its
  backward in SPEC order: n = |t|, w, r = |u|, lse, |x|, |z|, cos (those it keeps);
* the logit multiplier ``scale`` travels as a float32 0-dim tensor (no host sync, and a
  tensor scale gets its gradient);
* backward ops are not differentiable again (no double backward).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def scale_tensor(scale, device: torch.device) -> Tensor:
    """The logit multiplier as a float32 0-dim tensor on ``device`` (autograd flows back to a
    tensor ``scale``; a Python number costs no host synchronisation)."""
    if isinstance(scale, Tensor):
        return scale.to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), float(scale), dtype=torch.float32, device=device)


def empty_like_placeholder(like: Tensor) -> Tensor:
    """A placeholder output (custom ops cannot return None)."""
    return like.new_empty((0,))


def saved_tensors(ctx):
    """The saved tensors for a backward op. In a plain backward (grad mode off) they are
    detached: the backward ops are not differentiable. Under create_graph=True they stay
    attached so that differentiating a gradient reaches ``no_double_backward`` and raises."""
    ts = ctx.saved_tensors
    return ts if torch.is_grad_enabled() else tuple(t.detach() for t in ts)


def no_double_backward(backend: str) -> Callable:
    def _raise(ctx, *grads):
        raise NotImplementedError(f"the {backend} backend has no second derivatives (double backward); "
                                  "use backend='torch' for higher-order gradients")
    return _raise


def register_backward_op(op, backend: str) -> None:
    """Make a backward custom op raise when it is differentiated (double backward)."""
    op.register_autograd(no_double_backward(backend), setup_context=lambda ctx, inputs, output: None)


__all__ = ["scale_tensor", "empty_like_placeholder", "saved_tensors", "no_double_backward",
           "register_backward_op"]
