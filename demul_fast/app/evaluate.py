"""Evaluation: frozen image features of a loader, top-1 of a module's class features, and
``evaluate``, the top-1 of a saved run (``demul-fast eval``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .. import reference
from ..data import DataError
from ..data.classnames import ClassNameMismatch, check_classnames
from ..data.folders import ImageList, build_transforms, check_images, discover, items
from . import runtime
from .checkpoint import CheckpointError
from .config import TrainConfig
from .models import build_module, load_clip
from .run_folder import PROMPTS_DIR, RUN_FILE, RUN_FILES, SPLIT_FILE, checkpoint_folder, load_prompts

@torch.no_grad()
def image_features(clip, loader, device, amp_dtype, progress: bool, desc: str, encode=None) -> tuple:
    """Frozen image features [N, D] (float32) and labels [N] of a whole loader. encode:
    images -> features in place of ``clip.encode_image`` under autocast (a compiled one,
    ``demul_fast.compiled_step.CompiledEval.encode``)."""
    from tqdm.auto import tqdm

    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if encode is not None:
            f = encode(images.to(device, non_blocking=True))
        else:
            with runtime.autocast(device, amp_dtype):
                f = clip.encode_image(images.to(device, non_blocking=True))
        feats.append(f.float())
        labels.append(y.to(device))
    if not feats:  # a rank whose share of a small split is empty
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def accuracy(module, feats: torch.Tensor, labels: torch.Tensor, class_features=None) -> float:
    """Top-1 (%) of cached class features u^ [C, D] against image features [N, D].
    class_features: a callable giving u^ in place of ``module.class_features`` (compiled)."""
    module.eval()
    u = (module.class_features() if class_features is None else class_features()).float()
    pred = reference.cosine_logits(feats, u, 1.0).argmax(-1)
    return 100.0 * float((pred == labels).sum()) / max(1, labels.numel())


def evaluate(checkpoint, data: Optional[str] = None, split: Optional[str] = None, device: Optional[str] = None,
             batch_size: Optional[int] = None, workers: int = 0, progress: bool = True) -> dict:
    """Top-1 of a saved run on one split: ``test`` (default when present), ``val`` or ``train``.

    data: another dataset folder with the same classes (default: the run's own split). Its
          ``test``/``val`` folder, or for a plain folder all its images, are evaluated.
    """
    out = Path(checkpoint)
    missing = [f for f in RUN_FILES if not (out / f).exists()]
    if missing:
        raise CheckpointError(f"{out} is not a run folder written by demul-fast train (missing {', '.join(missing)})")
    run = json.loads((out / RUN_FILE).read_text())
    saved_split = json.loads((out / SPLIT_FILE).read_text())
    cfg = TrainConfig(**{k: v for k, v in run["config"].items()})
    classnames = run["classnames"]
    dev = runtime.choose_device(device)
    amp_dtype = runtime.amp_dtype(cfg.precision if dev.type == "cuda" else "fp32", dev)

    if data is None:
        available = dict(saved_split["eval"], train=saved_split["train"])
        split = split or ("test" if "test" in available else "val" if "val" in available else "train")
        if split not in available:
            raise DataError(f"the run has no {split!r} split (it has {', '.join(available)})")
        images = available[split]
    else:
        found = discover(data)
        split = split or ("test" if "test" in found else "val" if "val" in found else "all")
        if split not in found:
            raise DataError(f"{data} has no {split!r} split (it has {', '.join(found)})")
        images = found[split]
        try:
            check_classnames(list(images), classnames, f"dataset {data}")
        except ClassNameMismatch as exc:
            raise CheckpointError(f"the checkpoint's classes differ from the data: {exc}") from exc
    check_images([p for files in images.values() for p in files], threads=workers)

    clip, tokenizer, pre_cfg, info = load_clip(cfg.model, cfg.pretrained, dev, cfg.init_seed)
    if info["fingerprint"] != run["clip"]["fingerprint"]:
        raise CheckpointError(f"the CLIP model built from {cfg.model!r} / {cfg.pretrained!r} differs from the one "
                              f"the prompts in {out} were trained with (weights fingerprint)")
    cfg.alpha = 0.0  # accuracy needs no LLM embeddings
    module = build_module(cfg, clip, tokenizer, classnames, None, None).to(dev)
    load_prompts(module, checkpoint_folder(out) / PROMPTS_DIR)
    _, eval_tf = build_transforms(run.get("preprocess", pre_cfg), False)
    loader = torch.utils.data.DataLoader(ImageList(items(images, classnames), eval_tf),
                                         batch_size=batch_size or cfg.eval_batch_size, shuffle=False,
                                         num_workers=workers)
    feats, labels = image_features(clip, loader, dev, amp_dtype, progress, f"{split} features")
    acc = accuracy(module, feats, labels)
    return {"split": split, "top1": acc, "n": int(labels.numel()), "checkpoint": str(out),
            "data": data or cfg.data or f"{cfg.dataset} in {cfg.root}"}
