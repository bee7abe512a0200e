"""Input checks of the public API: bad input is refused here, before any kernel runs.

Validation only: whether a call is well formed, whatever backend runs it. Which backend
may run a well-formed call is a separate question (demul_fast.ops.capability), asked after.

Every error names the argument. Shape, dtype and device checks read only metadata.
Two checks must look at values: labels in [0, C) and a tensor ``scale`` being finite.
On CPU tensors they always run; on GPU tensors they cost one host synchronisation
per call, so they run unless ``DEMUL_FAST_CHECK_VALUES=0`` (then the kernels still
never read out of bounds, but an out-of-range label gives an undefined loss). Under
torch.compile they become ``torch._assert_async`` (no graph break, no sync). Tensors
without values (the ``meta`` device, fake tensors outside torch.compile) skip them, so
shape inference on meta tensors works.

Values are otherwise not inspected: NaN or inf in a feature propagates to the loss exactly
as in the reference (README, "Guarantees").
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch

from .distill_basis import DistillBasis

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


def _has_values(x: torch.Tensor) -> bool:
    """False for tensors without data: meta tensors and fake tensors (tracing)."""
    if x.device.type == "meta":
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        return True
    return not is_fake(x)


def _value_checks_enabled(x: torch.Tensor) -> bool:
    if not _has_values(x):
        return False
    if x.device.type == "cpu":
        return True
    return os.environ.get("DEMUL_FAST_CHECK_VALUES", "1") != "0"


def check_tensor(x, name: str, ndim: int, what: str, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor {what}, got layout {x.layout}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {what}, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {x.dtype}"
        )
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def check_same_device(**tensors) -> torch.device:
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}: all inputs must share a device")
    return device


def check_dim(actual: int, expected: int, name: str, axis: str, other: str) -> None:
    if actual != expected:
        raise ValueError(f"{name} has {axis}={actual} but {other} has {axis}={expected}")


def check_labels(labels, batch: int, num_classes: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor [B] of class indices, got {type(labels).__name__}")
    if labels.layout != torch.strided:
        raise TypeError(f"labels must be a dense (strided) tensor [B], got layout {labels.layout}")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape [B], got shape {tuple(labels.shape)}")
    if labels.dtype not in INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor (int64 or int32), got {labels.dtype}")
    if labels.shape[0] != batch:
        raise ValueError(f"labels has {labels.shape[0]} entries but image_features has B={batch} rows")
    if _is_compiling():
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(), "labels out of range [0, C)")
        return
    if not _value_checks_enabled(labels):
        return
    lo, hi = torch.aminmax(labels)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels must lie in [0, {num_classes}) (C={num_classes} classes), found {bad}")


def check_scale(scale, device: torch.device) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.Tensor)):
        raise TypeError(f"scale must be a float or a 0-dim tensor, got {type(scale).__name__}")
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.dim() > 1:
            raise ValueError(f"scale must be a 0-dim tensor, got shape {tuple(scale.shape)}")
        if scale.dtype not in FLOAT_DTYPES:
            raise TypeError(f"scale must be a floating tensor, got {scale.dtype}")
        if scale.device != device and scale.device.type != "cpu":
            raise ValueError(f"scale is on {scale.device} but the features are on {device}")
        if _is_compiling():
            torch._assert_async(torch.isfinite(scale).all(), "scale must be finite")
            return
        if _value_checks_enabled(scale) and not bool(torch.isfinite(scale).all()):
            raise ValueError(f"scale must be finite, got {scale.detach().cpu().item()}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def check_float(value, name: str, lo: Optional[float] = None, hi: Optional[float] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}")


def validate_aggregate(text_features, prompt_logits) -> None:
    check_tensor(text_features, "text_features", 3, "[C, M, D]")
    check_tensor(prompt_logits, "prompt_logits", 2, "[C, M]")
    check_same_device(text_features=text_features, prompt_logits=prompt_logits)
    c, m, _ = text_features.shape
    check_dim(prompt_logits.shape[0], c, "prompt_logits", "C", "text_features")
    check_dim(prompt_logits.shape[1], m, "prompt_logits", "M", "text_features")


def validate_cross_entropy(image_features, class_features, labels, scale, label_smoothing) -> None:
    check_tensor(image_features, "image_features", 2, "[B, D]")
    check_tensor(class_features, "class_features", 2, "[C, D]")
    device = check_same_device(image_features=image_features, class_features=class_features, labels=labels
                               if isinstance(labels, torch.Tensor) else None)
    check_dim(image_features.shape[1], class_features.shape[1], "image_features", "D", "class_features")
    if image_features.dtype != class_features.dtype:
        raise TypeError(
            f"image_features ({image_features.dtype}) and class_features ({class_features.dtype}) must share a dtype"
        )
    check_labels(labels, image_features.shape[0], class_features.shape[0])
    check_scale(scale, device)
    check_float(label_smoothing, "label_smoothing", 0.0, 1.0)


def validate_distill(text_features, phi_weight, phi_bias, llm_embeddings) -> None:
    check_tensor(text_features, "text_features", 3, "[C, M, D]")
    check_tensor(phi_weight, "phi_weight", 2, "[K, D]")
    check_tensor(llm_embeddings, "llm_embeddings", 2, "[C, K]")
    if phi_bias is not None:
        check_tensor(phi_bias, "phi_bias", 1, "[K]")
    check_same_device(text_features=text_features, phi_weight=phi_weight, phi_bias=phi_bias,
                      llm_embeddings=llm_embeddings)
    c, _, d = text_features.shape
    k = phi_weight.shape[0]
    check_dim(phi_weight.shape[1], d, "phi_weight", "D", "text_features")
    check_dim(llm_embeddings.shape[0], c, "llm_embeddings", "C", "text_features")
    check_dim(llm_embeddings.shape[1], k, "llm_embeddings", "K", "phi_weight")
    if phi_bias is not None:
        check_dim(phi_bias.shape[0], k, "phi_bias", "K", "phi_weight")


def validate_head(text_features, prompt_logits, image_features, labels, scale, llm_embeddings,
                  phi_weight, phi_bias, alpha, label_smoothing) -> None:
    validate_aggregate(text_features, prompt_logits)
    check_tensor(image_features, "image_features", 2, "[B, D]")
    check_same_device(text_features=text_features, image_features=image_features,
                      labels=labels if isinstance(labels, torch.Tensor) else None)
    check_dim(image_features.shape[1], text_features.shape[2], "image_features", "D", "text_features")
    if image_features.dtype != text_features.dtype:
        raise TypeError(
            f"image_features ({image_features.dtype}) and text_features ({text_features.dtype}) must share a dtype"
        )
    check_labels(labels, image_features.shape[0], text_features.shape[0])
    check_scale(scale, text_features.device)
    check_float(alpha, "alpha")
    check_float(label_smoothing, "label_smoothing", 0.0, 1.0)
    if llm_embeddings is None:
        if phi_weight is not None or phi_bias is not None:
            raise ValueError("phi_weight/phi_bias were given without llm_embeddings")
        return
    if phi_weight is None:
        raise ValueError("phi_weight [K, D] is required when llm_embeddings is given")
    validate_distill(text_features, phi_weight, phi_bias, llm_embeddings)


def validate_basis(text_features, distill_basis) -> None:
    """A DistillBasis (SPEC 4.3) for T [C, M, D]: R [r, D] (r <= D), c [r], F [C, r],
    delta [C], beta [] on T's device."""
    if not isinstance(distill_basis, DistillBasis):
        raise TypeError(f"distill_basis must be a demul_fast.DistillBasis, got {type(distill_basis).__name__}")
    R, c, F, delta, beta = distill_basis
    check_tensor(R, "distill_basis.R", 2, "[r, D]")
    check_tensor(c, "distill_basis.c", 1, "[r]")
    check_tensor(F, "distill_basis.F", 2, "[C, r]")
    check_tensor(delta, "distill_basis.delta", 1, "[C]")
    if not isinstance(beta, torch.Tensor) or beta.dim() != 0 or not beta.is_floating_point():
        raise ValueError("distill_basis.beta must be a 0-dim floating tensor")
    check_same_device(text_features=text_features, **{f"distill_basis.{n}": t for n, t in
                                                      zip(DistillBasis._fields, distill_basis)})
    cls, _, d = text_features.shape
    r = R.shape[0]
    check_dim(R.shape[1], d, "distill_basis.R", "D", "text_features")
    if r > d:
        raise ValueError(f"distill_basis.R must be [r, D] with r <= D={d}, got r={r}")
    check_dim(c.shape[0], r, "distill_basis.c", "r", "distill_basis.R")
    check_dim(F.shape[0], cls, "distill_basis.F", "C", "text_features")
    check_dim(F.shape[1], r, "distill_basis.F", "r", "distill_basis.R")
    check_dim(delta.shape[0], cls, "distill_basis.delta", "C", "text_features")
