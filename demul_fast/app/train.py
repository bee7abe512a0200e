"""The few-shot DeMul training loop (what ``demul-fast train`` runs); a saved run is evaluated
by ``evaluate``, its files are ``run_folder``'s.

Data layout (``--data``): ``root/<class>/<image>`` (K images per class are sampled for
training, the rest is the test set), or ``root/train|val|test/<class>/<image>`` (K per class
sampled from train/; val/ and test/ are used whole). Class names are the folder names
(underscores become spaces in prompts), in sorted order. With ``--dataset NAME --root DIR``
one of the 11 benchmarks is read in CoOp's layout instead (``demul_fast.data.coop_layouts``).
Both produce the same split record (``data_split``), which the run saves as ``split.json``.

The run folder it writes (run.json, split.json, the LLM embeddings and phi, checkpoints) is
described in ``run_folder``; a new run (also one that replaces another with --overwrite) is
built in a hidden folder beside the output folder and moved to its place once its first
checkpoint exists.

The optimisation follows CoOp: SGD (momentum 0.9, weight decay 5e-4), lr 0.002, a cosine
schedule over the epochs after one warm-up epoch at constant lr 1e-5, batch size 32,
random resized crop (scale 0.08..1) + horizontal flip on top of the model's own resize and
normalisation, each image's drawn from (seed, epoch, image) alone (``data.sampling``: the
same at any world size). Checkpoints are taken after every epoch and, with
``--checkpoint-every``, within epochs; a group restarted by torchrun resumes by itself
(``elastic``). Bad input (an image that does not decode included) raises ``DataError`` /
``CheckpointError`` / ``OutputExistsError`` (all ``ValueError`` or ``FileExistsError``)
before anything is written.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import List

import torch

from .. import compiled_step
from .. import phi as phi_mod
from ..data import coop_layouts
from ..data import sampling
from ..data.folders import ImageList, build_transforms, check_images, discover, folder_split, items
from ..sharded import ShardedDeMul
from . import checkpoint, elastic, llm, processes, runtime
from .checkpoint import CheckpointError
from .config import TrainConfig
from .evaluate import accuracy, image_features
from .models import build_module, load_clip
from .phi_cache import llm_and_phi, save_llm_and_phi
from .run_folder import (LLM_FILE, LOG_FILE, PHI_FILE, PROMPTS_DIR, RUN_FILE, SPLIT_FILE, STATE_FILE,
                         check_resume, checkpoint_folder, load_prompts, prepare_output, resumed_sums,
                         save_checkpoint, save_step_checkpoint)


def check_source(cfg: TrainConfig) -> None:
    """ValueError unless the data source is --data alone or --dataset with --root."""
    if cfg.dataset is None and (cfg.root is not None or not cfg.data):
        raise ValueError("give --data DIR (an image folder), or --dataset NAME with --root DIR (CoOp's layout)")
    if cfg.dataset is not None and (cfg.data or not cfg.root):
        raise ValueError("--dataset reads CoOp's layout under --root DIR and excludes --data")


def data_split(cfg: TrainConfig) -> dict:
    """The run's split record, from --data (the folder layouts) or --dataset/--root (CoOp's):
    {"layout", "classes", "short": {class: count}, "train": {class: [paths]},
     "eval": {split: {class: [paths]}}}"""
    check_source(cfg)
    if cfg.dataset is None:
        return folder_split(cfg.data, cfg.shots, cfg.seed, cfg.allow_fewer)
    return coop_layouts.coop_split(cfg.dataset, cfg.root, cfg.shots, cfg.seed, cfg.allow_fewer)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """CoOp's schedule: constant warm-up lr, then cosine over all epochs (0-based epoch)."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * epoch / cfg.epochs))


def train(cfg: TrainConfig) -> dict:
    """Run few-shot training; returns the final log record (see ``log.json``). A new run that
    stops before its first checkpoint leaves nothing behind (a run it was to replace intact)."""
    staged: List[Path] = []
    try:
        return _train(cfg, staged)
    except BaseException:
        for folder in staged:  # gone already once swapped in
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, staged: List[Path]) -> dict:
    from tqdm.auto import tqdm

    for name in ("epochs", "batch_size", "prompts", "n_ctx"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0 (0: per epoch only), got {cfg.checkpoint_every}")
    if not (cfg.lr > 0 and math.isfinite(cfg.alpha) and cfg.alpha >= 0):
        raise ValueError(f"--lr must be > 0 and --alpha >= 0, got {cfg.lr} and {cfg.alpha}")
    proc = processes.init_from_env(cfg.device)  # torchrun: join the process group; else one process
    device = proc.device
    mode = compiled_step.compile_mode(cfg.compile, device)
    if proc.world_size > 1 and mode != "none":
        if cfg.compile is not None:
            raise ValueError(f"--compile {cfg.compile} runs in one process; with several processes use --compile none")
        mode = "none"
    if cfg.log_every < 1:
        raise ValueError(f"--log-every must be >= 1, got {cfg.log_every}")
    if not proc.is_main:  # rank 0 alone shows progress and writes files
        cfg = TrainConfig(**{**asdict(cfg), "progress": False})
    amp_dtype = runtime.amp_dtype(cfg.precision, device)
    if not cfg.resume and elastic.resumes_own_run(Path(cfg.out), asdict(cfg)):  # restarted by torchrun
        runtime.log(f"restart {elastic.restart_count()} of this torchrun job: resuming {cfg.out}", cfg.progress)
        cfg = TrainConfig(**{**asdict(cfg), "resume": True, "overwrite": False})
    out = prepare_output(cfg)
    proc.barrier()  # every rank has checked the output folder before rank 0 writes to it

    # data: everything is checked before the output folder is touched
    if cfg.resume:
        split = json.loads((out / SPLIT_FILE).read_text())
        classnames = split["classes"]
        check_resume(out, cfg, dataset_classes(cfg))
        short = split.get("short", {})
    else:
        split = data_split(cfg)
        classnames, short = split["classes"], split["short"]
    check_images([p for part in [split["train"], *split["eval"].values()] for files in part.values() for p in files],
                 threads=cfg.workers)
    if short:
        runtime.log(f"--allow-fewer: {len(short)} class(es) have fewer than {cfg.shots} images and train with all they "
             "have: " + ", ".join(f"{c} ({n})" for c, n in short.items()), cfg.progress)

    clip, tokenizer, pre_cfg, clip_info = load_clip(cfg.model, cfg.pretrained, device, cfg.init_seed)
    if cfg.resume:
        saved = json.loads((out / RUN_FILE).read_text())
        if saved["clip"]["fingerprint"] != clip_info["fingerprint"]:
            raise CheckpointError(f"--resume: the CLIP model differs from the one the checkpoint in {out} was "
                                  "trained with (weights fingerprint)")
        emb = phi = None
        if cfg.alpha != 0:
            emb = llm.load_embeddings(out / LLM_FILE, classnames)
            phi, _ = phi_mod.load_phi(out / PHI_FILE)
        module = build_module(cfg, clip, tokenizer, classnames, emb, phi).to(device)
        work = out
    else:
        # everything that can fail on bad input runs before the output folder is written
        emb, phi, report = llm_and_phi(cfg, clip, tokenizer, classnames, device, clip_info["fingerprint"])
        module = build_module(cfg, clip, tokenizer, classnames, emb, phi).to(device)
        work = out  # the other ranks of a torchrun job write nothing
        if proc.is_main:
            job = elastic.job_tag()
            if job is not None and elastic.restart_count() > 0:  # what this job's killed attempts left
                for left in checkpoint.remove_staging(out, job):
                    runtime.log(f"restart {elastic.restart_count()}: removed {left.name}, left by an earlier attempt",
                                cfg.progress)
            work = checkpoint.staging_folder(out, job)  # moved to out (over an --overwrite'd run) at the first checkpoint
            staged.append(work)
            checkpoint.write_json(work / SPLIT_FILE, split)
            save_llm_and_phi(work, cfg, classnames, emb, phi, report)

    train_tf, eval_tf = build_transforms(pre_cfg, cfg.augment)
    train_ds = sampling.KeyedImages(ImageList(items(split["train"], classnames), None), train_tf, cfg.seed)
    sharded = None
    if proc.world_size > 1:
        sharded = ShardedDeMul(module, tokenizer)
        sharded.broadcast_parameters()
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    start, history, resumed = 0, [], None
    if cfg.resume:
        last = checkpoint_folder(out)
        load_prompts(module, last / PROMPTS_DIR)
        state = torch.load(last / STATE_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = state["epoch"] + (state.get("step") is None)
        if state.get("step") is not None:  # a checkpoint within epoch `start`
            resumed = resumed_sums(state, proc.rank, proc.world_size)
        history = json.loads((last / LOG_FILE).read_text())["epochs"]
    run = {"config": asdict(cfg), "classnames": classnames, "clip": clip_info,
           "device": str(device), "amp": str(amp_dtype), "module": type(module).__name__,
           "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in pre_cfg.items()},
           "n_train": len(train_ds), "world_size": proc.world_size, "compile": mode,
           "elastic": elastic.identity()}
    if proc.is_main:
        checkpoint.write_json(work / RUN_FILE, run)

    # the step and the evaluation, compiled in --compile's mode (demul_fast.compiled_step)
    step = compiled_step.TrainStep(module, optimizer, mode, batch_size=cfg.batch_size, encode_images=clip.encode_image,
                                   autocast=amp_dtype, scaler=scaler,
                                   **({} if sharded is None else dict(forward=sharded, after_backward=sharded.reduce_gradients)))
    evaluator = compiled_step.CompiledEval(module, clip.encode_image, mode, batch_size=cfg.eval_batch_size,
                                           autocast=amp_dtype)
    eval_sets = {}
    for s, data in split["eval"].items():
        loader = torch.utils.data.DataLoader(ImageList(proc.share(items(data, classnames)), eval_tf),
                                             batch_size=cfg.eval_batch_size, shuffle=False, **loader_kw)
        eval_sets[s] = image_features(clip, loader, device, amp_dtype, cfg.progress, f"{s} features",
                                      encode=evaluator.encode)

    runtime.log(f"training {type(module).__name__} on {len(classnames)} classes, {len(train_ds)} images "
         f"({cfg.shots} shots), {cfg.epochs} epochs, device {device}, world size {proc.world_size}, output {out}",
         cfg.progress)
    # global batches of cfg.batch_size, each split over the processes, their images, crops and
    # flips keyed by (seed, epoch, image): the same steps at any world size (data.sampling)
    sampler = sampling.KeyedBatchSampler(len(train_ds), cfg.batch_size, cfg.seed, proc.rank, proc.world_size)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, **loader_kw)
    every = cfg.checkpoint_every if 0 < cfg.checkpoint_every < len(sampler) else 0
    record = history[-1] if history else {}
    for epoch in range(start, cfg.epochs):
        lr = lr_at(cfg, epoch)
        compiled_step.set_lr(optimizer, lr)
        sampler.set_epoch(epoch)
        done, partial = resumed or (0, None)
        sampler.skip(done)  # the steps that a step checkpoint holds already
        resumed = None
        module.train()
        t0 = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        step.reset_totals()
        if partial is not None:
            step.load_totals(partial)  # the epoch's sums up to the step checkpoint
        steps0 = step.steps
        for i, (images, labels) in enumerate(bar, start=done):
            # the loss stays on the device: read every --log-every steps and at the epoch's end
            step(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            if cfg.progress and (i + 1) % cfg.log_every == 0:
                m = step.means(step.read_totals())
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['train_acc']:.1f}")
            if every and (i + 1) % every == 0 and i + 1 < len(sampler):
                work = save_step_checkpoint(work, out, proc, module, optimizer, scaler, epoch, i + 1,
                                            step.read_totals(), history)
        totals = step.read_totals()  # waits for the epoch's last step
        steps_per_s = (step.steps - steps0) / max(time.time() - t0, 1e-9)
        tot = proc.all_reduce_sums({k: totals[k] for k in compiled_step.TOTAL_KEYS})
        record = {"epoch": epoch + 1, "lr": lr, "seconds": round(time.time() - t0, 3), "world_size": proc.world_size,
                  **{k: tot[k] / tot["n"] for k in ("loss", "ce_loss", "distill_loss")},
                  "train_acc": 100.0 * tot["correct"] / tot["n"], "steps_per_s": round(steps_per_s, 3)}
        for s, (f, y) in eval_sets.items():
            record[f"{s}_acc"] = (accuracy(module, f, y, class_features=evaluator.class_features)
                                  if sharded is None else sharded.accuracy(f, y))
        history.append(record)
        if proc.is_main:
            work = save_checkpoint(work, out, module, optimizer, scaler, epoch, history)
        runtime.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} (ce {record['ce_loss']:.4f}, "
             f"distill {record['distill_loss']:.4f}), train acc {record['train_acc']:.2f}%"
             + "".join(f", {s} acc {record[s + '_acc']:.2f}%" for s in eval_sets)
             + f", lr {lr:.2e}, {record['seconds']:.1f}s, {record['steps_per_s']:.2f} steps/s", cfg.progress)
    return record


def dataset_classes(cfg: TrainConfig) -> List[str]:
    """The class names of the configured data source, as its files list them."""
    check_source(cfg)
    if cfg.dataset is not None:
        return coop_layouts.read(cfg.dataset, cfg.root).classes
    found = discover(cfg.data)
    return list(found.get("train", found.get("all")))
