"""Miniature datasets in CoOp's layouts (DATASETS.md), written by the tests.

``make_dataset(root, name)`` writes ``root/<CoOp folder>/`` for one of the 11 datasets: a
few classes named as the shipped list names its first labels, a few 32x32 JPEG images per
class and split, and the dataset's split files (``split_zhou_*.json``; for ImageNet
``classnames.txt`` and ``images/train|val/<wnid>/``; for FGVC-Aircraft ``variants.txt`` and
``images_variant_<split>.txt``). Returns the dataset folder.
"""

import json
from pathlib import Path

import numpy as np

from demul_fast.data import classnames
from demul_fast.data.coop_layouts import LAYOUTS

COUNTS = {"train": 6, "val": 3, "test": 2}  # images per class
COLOURS = ((220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 50))


def _save(path: Path, label: int, rng) -> None:
    from PIL import Image

    img = np.array(COLOURS[label % len(COLOURS)], np.float64)[None, None, :] + rng.normal(0, 20, (32, 32, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, format="JPEG")


def make_dataset(root, name: str, n_classes: int = 3, counts=None, seed: int = 0) -> Path:
    counts = counts or COUNTS
    lay = LAYOUTS[name]
    folder = Path(root) / lay.folder
    classes = classnames.dataset_classnames(name)[:n_classes]
    rng = np.random.default_rng(seed)
    if name == "imagenet":
        wnids = [f"n{i:08d}" for i in range(n_classes)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in zip(wnids, classes)))
        for sub, n in (("train", counts["train"]), ("val", counts["test"])):
            for label, w in enumerate(wnids):
                for i in range(n):
                    _save(folder / "images" / sub / w / f"{w}_{i}.JPEG", label, rng)
        return folder
    if name == "fgvc_aircraft":
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "variants.txt").write_text("".join(c + "\n" for c in classes))
        for s, n in counts.items():
            lines = []
            for label, c in enumerate(classes):
                for i in range(n):
                    image_id = f"{s[:2]}{label}{i:04d}"
                    _save(folder / "images" / f"{image_id}.jpg", label, rng)
                    lines.append(f"{image_id} {c}\n")
            (folder / f"images_variant_{s}.txt").write_text("".join(lines))
        return folder
    image_dir = folder / lay.images if lay.images else folder
    split = {}
    for s, n in counts.items():
        split[s] = []
        for label, c in enumerate(classes):
            for i in range(n):
                rel = f"{'cars_' + s if name == 'stanford_cars' else c.replace('/', '_')}/{s}_{label}_{i}.jpg"
                _save(image_dir / rel, label, rng)
                split[s].append([rel, label, c])
    (folder / lay.split).write_text(json.dumps(split))
    return folder
