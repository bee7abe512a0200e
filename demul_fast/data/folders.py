"""Image folders: ``root/<class>/<image>`` or ``root/train|val|test/<class>/<image>``.

Class names are the folder names, in sorted order. ``folder_split`` samples K images per
class (``sample_shots``, reproducible per class) from train/, or from the whole folder,
whose other images are then the test set; it returns the split record a run saves as
``split.json``. Also here: decoding an image completely (``open_rgb``), checking that every
image of a split decodes (``check_images``), the (image, label) dataset ``ImageList``, and
the training / evaluation transforms. Bad input raises ``DataError`` naming the problem.
"""

from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import DataError, sampling
from .classnames import check_classnames

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


SPLITS = ("train", "val", "test")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _class_dirs(folder: Path) -> List[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_in(folder: Path) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [str(Path(dirpath) / f) for f in sorted(filenames) if _is_image(Path(f))]
    return found


def _scan(folder: Path, what: str) -> Dict[str, List[str]]:
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} does not exist")
    classes = _class_dirs(folder)
    if not classes:
        raise DataError(f"{what} folder {folder} holds no class folders (expected {folder}/<class>/<image>)")
    images = {c.name: _images_in(c) for c in classes}
    empty = [c for c, files in images.items() if not files]
    if empty:
        raise DataError(f"{what} folder {folder}: class folder(s) without images ({', '.join(IMAGE_EXTENSIONS)}): "
                        + ", ".join(repr(c) for c in empty))
    return images


def discover(root) -> Dict[str, Dict[str, List[str]]]:
    """{split: {class: [image paths]}} for the ImageFolder or train/val/test layout."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a folder")
    subdirs = {p.name for p in _class_dirs(root)}
    if "train" in subdirs and subdirs <= set(SPLITS):
        splits = {s: _scan(root / s, f"{s} split") for s in SPLITS if s in subdirs}
        classes = list(splits["train"])
        for s, data in splits.items():
            check_classnames(list(data), classes, f"{root / s} (classes compared with train/)")
        return splits
    return {"all": _scan(root, "dataset")}


def folder_split(data, shots: int, seed: int, allow_fewer: bool) -> dict:
    """The split record of the image folder ``data``: K = ``shots`` images per class from
    train/ (or from the whole folder, whose other images are then the test set).

    returns {"layout", "classes", "short": {class: count}, "train": {class: [paths]},
             "eval": {split: {class: [paths]}}}"""
    found = discover(data)
    pool = found.get("train", found.get("all"))
    train_split, rest, short = sample_shots(pool, shots, seed, allow_fewer)
    evals = {s: found[s] for s in ("val", "test") if s in found}
    if "all" in found and any(rest.values()):
        evals["test"] = rest
    return {"layout": "splits" if "train" in found else "folder", "classes": list(pool), "short": short,
            "train": train_split, "eval": evals}


def sample_shots(images: Dict[str, List[str]], shots: int, seed: int, allow_fewer: bool) -> tuple:
    """K images per class, reproducibly: each class draws with its own RNG seeded from
    (seed, class name), so adding a class does not change the others' samples.

    returns (train {class: [paths]}, rest {class: [paths]}, short {class: count} of classes
    that had fewer than K images)."""
    if shots < 1:
        raise DataError(f"--shots must be >= 1, got {shots}")
    short = {c: len(files) for c, files in images.items() if len(files) < shots}
    if short and not allow_fewer:
        listing = ", ".join(f"{c!r} ({n})" for c, n in short.items())
        raise DataError(f"{len(short)} class(es) have fewer than --shots={shots} images: {listing}; "
                        "add images, lower --shots, or pass --allow-fewer to train with what exists")
    train, rest = {}, {}
    for c, files in images.items():
        digest = hashlib.sha256(f"{seed}\0{c}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        picked = set(rng.sample(range(len(files)), min(shots, len(files))))
        train[c] = [f for i, f in enumerate(files) if i in picked]
        rest[c] = [f for i, f in enumerate(files) if i not in picked]
    return train, rest, short


def open_rgb(path: str):
    """The image at ``path`` decoded completely, as RGB: how training and evaluation read it
    (a truncated file raises here, where ``Image.verify`` would pass it)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _decode_error(path: str) -> Optional[str]:
    try:
        open_rgb(path)
    except Exception as exc:  # noqa: BLE001 - every failure is reported with its path
        return f"{path} ({type(exc).__name__}: {' '.join(str(exc).split())})"
    return None


def check_images(paths: Sequence[str], threads: int = 1) -> None:
    """Decode every image as ``open_rgb`` does (``threads`` at a time) and raise DataError
    naming all unreadable ones, on one line."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        bad = [e for e in pool.map(_decode_error, paths) if e is not None]
    if bad:
        shown = "; ".join(bad[:20]) + (f"; ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{len(bad)} image file(s) cannot be read (remove or replace them): {shown}")


class ImageList(torch.utils.data.Dataset):
    """(image tensor, label) from a list of paths (the decoded image itself when ``transform`` is
    None); an unreadable file raises with its path."""

    def __init__(self, items: Sequence[tuple], transform):
        self.items, self.transform = list(items), transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            img = open_rgb(path)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
        return (img if self.transform is None else self.transform(img)), label


def items(split: Dict[str, List[str]], classes: List[str]) -> List[tuple]:
    """[(path, label)] of a {class: [paths]} split, labels by the position in ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    return [(p, index[c]) for c in classes for p in split.get(c, [])]


def build_transforms(preprocess_cfg: dict, augment: bool):
    """(train transform, eval transform) from open_clip's preprocess config: CoOp's random
    resized crop (scale 0.08..1, bicubic) + flip for training, drawn from the generator the
    training transform is called with (``sampling.KeyedAugment``; without ``augment``,
    ``sampling.Fixed`` of the evaluation transform); resize + centre crop to eval."""
    from torchvision import transforms as T

    size = preprocess_cfg.get("size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(
        preprocess_cfg.get("interpolation", "bicubic"), T.InterpolationMode.BICUBIC)
    norm = T.Normalize(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
                       preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
    evaluation = T.Compose([T.Resize(min(size), interpolation=interp), T.CenterCrop(size), T.ToTensor(), norm])
    if not augment:
        return sampling.Fixed(evaluation), evaluation
    return sampling.KeyedAugment(size, interp, T.Compose([T.ToTensor(), norm]), scale=(0.08, 1.0)), evaluation
