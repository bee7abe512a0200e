"""The training run's configuration (``TrainConfig``), filled by ``demul-fast train``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional

def default_workers() -> int:
    """Data loader processes by default: min(4, the CPU cores this process may run on)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        cores = os.cpu_count() or 1
    return min(4, cores)


@dataclass
class TrainConfig:
    """Everything ``train`` needs; the command line fills it (see app/cli.py for the help texts)."""

    data: Optional[str]
    out: str
    dataset: Optional[str] = None  # one of demul_fast.data.coop_layouts.LAYOUTS, read from root instead of data
    root: Optional[str] = None
    shots: int = 16
    seed: int = 1
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    llm: str = "minilm"
    phi: Optional[str] = None
    phi_names: str = "union"
    prompts: int = 4
    n_ctx: int = 16
    ctx_init: Optional[str] = None
    alpha: float = 1.0
    epochs: int = 50
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    batch_size: int = 32
    eval_batch_size: int = 128
    workers: int = field(default_factory=default_workers)
    device: Optional[str] = None
    precision: str = "auto"
    augment: bool = True
    reference: bool = False
    text_encoder: str = "prefix"
    checkpoint_text: bool = False
    backend: Optional[str] = None
    compile: Optional[str] = None  # demul_fast.compiled_step.COMPILE_MODES; None: per device
    log_every: int = 50
    allow_fewer: bool = False
    resume: bool = False
    checkpoint_every: int = 0
    overwrite: bool = False
    progress: bool = True
    init_seed: int = 0
    extra: Dict = field(default_factory=dict)
