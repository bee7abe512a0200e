"""The run folder of ``demul-fast train``: its files, checking it before a run, its
checkpoints (written through ``checkpoint``), and reading them back.

An output folder holds everything a run needs to be evaluated or resumed:

    run.json                   the configuration, the class names, what was resolved
    split.json                 the sampled training images and the evaluation images
    llm_embeddings.safetensors the LLM class-name embeddings used (names inside)
    phi.safetensors, phi.json  the frozen map phi and its fit report
    checkpoint.json            names the current checkpoint folder
    checkpoint-<epoch>/        the last finished epoch, replaced as one unit (checkpoint.py);
                               checkpoint-<epoch>-step<step>/ when taken within an epoch
                               (--checkpoint-every):
      prompts/                 the learned prompts (DeMul.save_prompts: safetensors + JSON)
      trainer_state.pt         optimizer state, the epoch (0-based) and, within an epoch, the
                               steps done and every rank's running sums (for --resume)
      log.json                 per-epoch loss, accuracy, learning rate and time

A new run (also one that replaces another with --overwrite) is built in a hidden folder
beside the output folder and moved to its place once its first checkpoint exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch

from .. import compiled_step
from ..data.classnames import ClassNameMismatch, check_classnames
from . import checkpoint
from .checkpoint import CheckpointError
from .config import TrainConfig

RUN_FILE, SPLIT_FILE, LOG_FILE, STATE_FILE = "run.json", "split.json", "log.json", "trainer_state.pt"

RUN_FILES = (RUN_FILE, SPLIT_FILE, checkpoint.POINTER_FILE)  # what every finished run folder holds

PROMPTS_DIR, LLM_FILE, PHI_FILE = "prompts", "llm_embeddings.safetensors", "phi.safetensors"

RESUME_KEYS = ("shots", "seed", "model", "pretrained", "llm", "phi", "phi_names", "prompts", "n_ctx", "ctx_init",
               "dataset", "alpha", "allow_fewer", "reference", "text_encoder", "init_seed", "batch_size")


class OutputExistsError(FileExistsError):
    """The output folder already holds files and neither --resume nor --overwrite was given."""


def save_checkpoint(work: Path, out: Path, module, optimizer, scaler, epoch: int, history: List[dict],
                    step: Optional[int] = None, partial: Optional[List[dict]] = None) -> Path:
    """Write the checkpoint of ``epoch`` (0-based), or of its first ``step`` steps: prompts,
    trainer state (with ``partial``, every rank's running sums of the epoch) and log, as one
    unit (checkpoint.write), into the run folder ``work``. A new run's first checkpoint then
    moves it from its staging folder to ``out`` (replacing an --overwrite'd run only now).
    Returns the run's folder. All writes during training go through here."""

    def write_files(folder: Path) -> None:
        module.save_prompts(str(folder / PROMPTS_DIR))
        torch.save({"epoch": epoch, "step": step, "partial": partial, "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, folder / STATE_FILE)
        checkpoint.write_json(folder / LOG_FILE, {"epochs": history})

    checkpoint.write(work, epoch + 1, write_files, step=step)
    if work != out:
        checkpoint.swap_in(work, out)
    return out


def save_step_checkpoint(work: Path, out: Path, proc, module, optimizer, scaler, epoch: int, step: int,
                         tot: dict, history: List[dict]) -> Path:
    """``save_checkpoint`` after ``step`` steps of ``epoch``, called on every rank: one
    all-reduce brings every rank's running sums of the epoch (``tot``: the TOTAL_KEYS of
    ``compiled_step.TrainStep.read_totals``) to rank 0, which writes."""
    keys = compiled_step.TOTAL_KEYS
    sums = proc.all_reduce_sums({f"{r}/{k}": float(tot[k]) if r == proc.rank else 0.0
                                 for r in range(proc.world_size) for k in keys})
    per_rank = [{k: sums[f"{r}/{k}"] for k in keys} for r in range(proc.world_size)]
    if proc.is_main:
        work = save_checkpoint(work, out, module, optimizer, scaler, epoch, history, step, per_rank)
    return work


def resumed_sums(state: dict, rank: int, world_size: int) -> tuple:
    """(steps done, this rank's running sums) of the epoch that the step checkpoint ``state``
    stopped in: the rank's own at the same world size (the epoch's log then comes out as
    without the stop), else their total on rank 0 and zeros elsewhere."""
    per_rank = state["partial"]
    if len(per_rank) == world_size:
        return state["step"], dict(per_rank[rank])
    return state["step"], {k: sum(p[k] for p in per_rank) if rank == 0 else 0.0 for k in per_rank[0]}


def checkpoint_folder(out: Path) -> Path:
    """The run's current checkpoint folder; CheckpointError when it has none."""
    folder = checkpoint.current(out)
    if folder is None:
        raise CheckpointError(f"{out} holds no checkpoint ({checkpoint.POINTER_FILE} is missing)")
    return folder


def run_log(out: Path) -> Optional[List[dict]]:
    """The per-epoch log records of the run in ``out``; None when no epoch has finished."""
    folder = checkpoint.current(out)
    return None if folder is None else json.loads((folder / LOG_FILE).read_text(encoding="utf-8"))["epochs"]


def prepare_output(cfg: TrainConfig) -> Path:
    """``cfg.out``, once it is proven usable for a new run, a --resume or an --overwrite
    (OutputExistsError / CheckpointError otherwise); nothing is written."""
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a folder")
    if cfg.resume:
        missing = [f for f in RUN_FILES if not (out / f).exists()]
        if missing:
            raise CheckpointError(f"--resume: {out} is not a resumable run folder (missing {', '.join(missing)})")
        checkpoint_folder(out)
        return out
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise OutputExistsError(f"output folder {out} already exists and is not empty; pass --resume to "
                                    "continue that run or --overwrite to replace it")
        if not (out / RUN_FILE).is_file():
            raise OutputExistsError(f"--overwrite replaces a run folder written by demul-fast train, and {out} "
                                    f"is not one (no {RUN_FILE}); choose another --out or empty it")
    return out


def check_resume(out: Path, cfg: TrainConfig, classnames: List[str]) -> dict:
    """The saved run.json, once the dataset's classes and the RESUME_KEYS settings match it."""
    saved = json.loads((out / RUN_FILE).read_text())
    try:
        check_classnames(classnames, saved.get("classnames", []),
                                 f"--resume: the dataset {cfg.data or cfg.dataset}")
    except ClassNameMismatch as exc:
        raise CheckpointError(str(exc)) from exc
    for key in RESUME_KEYS:
        if saved["config"].get(key) != getattr(cfg, key):
            raise CheckpointError(f"--resume: {key} is {getattr(cfg, key)!r} but the checkpoint in {out} was "
                                  f"trained with {saved['config'].get(key)!r}")
    return saved


def load_prompts(module, folder: Path) -> None:
    """Load the prompts saved in ``folder`` into ``module``; CheckpointError when they do not fit."""
    from ..prompt_learner import read_prompt_config

    try:
        saved = read_prompt_config(str(folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the prompts in {folder}: {exc}") from exc
    try:
        check_classnames(saved.get("classnames", []), module.config["classnames"], f"checkpoint {folder}")
    except ClassNameMismatch as exc:
        raise CheckpointError(str(exc)) from exc
    try:
        module.load_prompts(str(folder))
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {folder} does not fit this model: {exc}") from exc
