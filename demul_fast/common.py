"""What every layer of demul_fast shares: the constants of the method, the ``Scale`` type,
``HeadOutput`` and the one normalisation (docs/SPEC.md section 4).

Constants are defined here once. The Triton kernels import them; the CUDA extension is
compiled with them (setup.py passes them as macros) and exports what it was built with,
which tests/test_constants.py compares with this module.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import torch

EPS = 1e-6  # the norm floor max(||v||, EPS) of SPEC section 4
MAX_PROMPTS = 4096  # the most prompts M the kernel backends take (the CUDA aggregation keeps 2*M floats in shared memory)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the cuda and triton backends accept

Scale = Union[float, torch.Tensor]


class HeadOutput(NamedTuple):
    """What the DeMul head returns.

    loss:         scalar, ``ce_loss + alpha * distill_loss``
    ce_loss:      scalar, cosine-logit cross-entropy
    distill_loss: scalar, mean (1 - cos) of the projected prompt features against the LLM
                  embeddings (a zero tensor when no LLM embeddings were given)
    logits:       [B, C] scaled cosine logits, or None unless ``return_logits=True``
    """

    loss: torch.Tensor
    ce_loss: torch.Tensor
    distill_loss: torch.Tensor
    logits: Optional[torch.Tensor] = None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a computation on ``dtype`` accumulates in: float32, and float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def l2_normalize(v: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """v / max(||v||, eps) along ``dim`` (the floor is a constant for autograd)."""
    return v / torch.linalg.vector_norm(v, dim=dim, keepdim=True).clamp_min(eps)


__all__ = ["EPS", "MAX_PROMPTS", "KERNEL_DTYPES", "Scale", "HeadOutput", "interpreting", "accumulation_dtype",
           "l2_normalize"]
