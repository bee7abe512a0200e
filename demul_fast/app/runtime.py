"""Where and how a command runs: the device, the autocast dtype, progress messages, and the
error for an optional dependency a command needs but does not find."""

from __future__ import annotations

from typing import Optional

import torch


class MissingExtra(RuntimeError):
    """An optional dependency a command needs (e.g. matplotlib for the sweep) is not installed."""


def choose_device(name: Optional[str]) -> torch.device:
    """``name`` as a device; by default CUDA when available, else the CPU."""
    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``--precision`` (None = float32): auto is bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"--precision {precision} needs a CUDA device")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """torch.autocast on ``device`` with ``dtype``; disabled when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def log(msg: str, progress: bool) -> None:
    """A progress message: through tqdm (above the bars) when ``progress``, else printed."""
    from tqdm.auto import tqdm

    tqdm.write(msg) if progress else print(msg, flush=True)
