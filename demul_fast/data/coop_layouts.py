"""The 11 few-shot benchmarks in CoOp's folder layouts, and CoOp's few-shot sampling.

``--root`` is the folder that holds the datasets as CoOp's DATASETS.md lays them out
(``root/oxford_pets/images/...`` beside ``root/oxford_pets/split_zhou_OxfordPets.json``);
the dataset's own folder is accepted as ``--root`` too. Three kinds of layout:

* a split file ``{"train" | "val" | "test": [[relative_path, label, classname], ...]}``, its
  paths relative to the dataset's image folder (nine datasets; Stanford Cars' paths are
  relative to the dataset folder itself);
* ImageNet: ``classnames.txt`` (``<wnid> <class name>`` per line) and
  ``images/train|val/<wnid>/<image>``; labels in sorted wnid order, ``val/`` is the test set
  and, as in CoOp, there is no separate validation split;
* FGVC-Aircraft: ``variants.txt`` (the labels, in order) and ``images_variant_<split>.txt``
  (``<image id> <variant>`` per line) for ``images/<image id>.jpg``.

Class names and their label order come from the dataset's files; a name that differs from
the shipped list (``demul_fast/data/<dataset>.txt``) at the same label is reported once as a
``ClassNamesDiffer`` warning (custom or miniature splits are allowed).

Few-shot sampling (``fewshot``) follows CoOp/Dassl's ``generate_fewshot_dataset``: one
``random.Random(seed)`` draws ``random.sample(images of the class, K)`` class by class in the
order the classes first appear in the split, first K per class from train, then with the
same generator min(K, 4) per class from val; a class with fewer images keeps all of them.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from . import DataError
from .classnames import dataset_classnames, display_name

SPLITS = ("train", "val", "test")
VAL_SHOTS = 4  # CoOp's few-shot validation set: min(K, 4) images per class


@dataclass(frozen=True)
class Layout:
    """Where one dataset lives under ``--root`` and how CoOp reads it.

    folder:   the dataset's folder under --root
    images:   its image folder; split paths are relative to it ("" = the dataset folder)
    split:    CoOp's split file in the dataset folder ("" = the dataset's own list files)
    title:    the name tables and plots print
    template: CoOp's zero-shot CLIP prompt (trainers/zsclip.py CUSTOM_TEMPLATES)
    """

    folder: str
    images: str
    split: str
    title: str
    template: str


# the order of classnames.DATASETS (the paper's table order)
LAYOUTS: Dict[str, Layout] = {
    "imagenet": Layout("imagenet", "images", "", "ImageNet", "a photo of a {}."),
    "caltech101": Layout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "Caltech101",
                         "a photo of a {}."),
    "oxford_pets": Layout("oxford_pets", "images", "split_zhou_OxfordPets.json", "OxfordPets",
                          "a photo of a {}, a type of pet."),
    "stanford_cars": Layout("stanford_cars", "", "split_zhou_StanfordCars.json", "StanfordCars",
                            "a photo of a {}."),
    "oxford_flowers": Layout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "Flowers102",
                             "a photo of a {}, a type of flower."),
    "food101": Layout("food-101", "images", "split_zhou_Food101.json", "Food101", "a photo of {}, a type of food."),
    "fgvc_aircraft": Layout("fgvc_aircraft", "images", "", "FGVCAircraft", "a photo of a {}, a type of aircraft."),
    "sun397": Layout("sun397", "SUN397", "split_zhou_SUN397.json", "SUN397", "a photo of a {}."),
    "dtd": Layout("dtd", "images", "split_zhou_DescribableTextures.json", "DTD", "{} texture."),
    "eurosat": Layout("eurosat", "2750", "split_zhou_EuroSAT.json", "EuroSAT", "a centered satellite photo of {}."),
    "ucf101": Layout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "UCF101",
                     "a photo of a person doing {}."),
}
# the files that mark a dataset folder when the split is not one JSON file
MARKERS = {"imagenet": "classnames.txt", "fgvc_aircraft": "variants.txt"}


class ClassNamesDiffer(UserWarning):
    """A dataset's class names differ from the shipped list (a custom or miniature split)."""


@dataclass
class CoopData:
    """One dataset as its files list it.

    classes: class names, index = label
    items:   {split: [(image path, label), ...]} in file order; "val" may be empty
    """

    name: str
    folder: Path
    classes: List[str]
    items: Dict[str, List[Tuple[str, int]]] = field(default_factory=dict)


def layout(name: str) -> Layout:
    key = name.lower()
    if key not in LAYOUTS:
        raise DataError(f"--dataset {name!r} is not one of {', '.join(LAYOUTS)}")
    return LAYOUTS[key]


def dataset_folder(name: str, root) -> Path:
    """``root/<CoOp folder>``, or ``root`` itself when it is the dataset's folder."""
    lay, root = layout(name), Path(root)
    if not root.is_dir():
        raise DataError(f"--root {root} is not a folder")
    marker = lay.split or MARKERS[name.lower()]
    if not (root / lay.folder).is_dir() and (root / marker).is_file():
        return root
    return root / lay.folder


def read(name: str, root) -> CoopData:
    """Read a dataset's split as CoOp does; raise DataError (one line) when it cannot be used:
    a missing split file, a malformed one, a label with two names (or a name with two labels),
    labels that are not 0..C-1 in train, or images the split names that do not exist."""
    key, lay = name.lower(), layout(name)
    folder = dataset_folder(key, root)
    if key == "imagenet":
        data = _read_imagenet(folder, lay)
    elif key == "fgvc_aircraft":
        data = _read_aircraft(folder, lay)
    else:
        data = _read_split_file(key, folder, lay)
    missing = [p for items in data.items.values() for p, _ in items if not os.path.isfile(p)]
    if missing:
        where = folder / lay.images if lay.images else folder
        raise DataError(f"{key}: the split names {len(missing)} image(s) that do not exist under {where}, "
                        f"the first: {os.path.relpath(missing[0], where)}")
    _warn_if_renamed(key, data.classes)
    return data


def _read_split_file(key: str, folder: Path, lay: Layout) -> CoopData:
    path = folder / lay.split
    if not path.is_file():
        raise DataError(f"{key}: split file {path} not found (CoOp's DATASETS.md: {lay.folder}/{lay.split} "
                        f"beside {lay.folder}/{lay.images or '<images>'}/)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{key}: cannot read split file {path}: {exc}") from exc
    if not isinstance(raw, dict) or any(not isinstance(raw.get(s), list) for s in SPLITS):
        raise DataError(f"{key}: split file {path} must be a JSON object with lists 'train', 'val' and 'test'")
    image_dir = folder / lay.images if lay.images else folder
    names: Dict[int, Tuple[str, str]] = {}  # label -> (name, the split it was first seen in)
    items = {}
    for s in SPLITS:
        items[s] = []
        for n, entry in enumerate(raw[s]):
            if (not isinstance(entry, (list, tuple)) or len(entry) != 3 or not isinstance(entry[0], str)
                    or isinstance(entry[1], bool) or not isinstance(entry[1], int) or not isinstance(entry[2], str)):
                raise DataError(f"{key}: {path} {s}[{n}] is {entry!r}, not [relative path, integer label, class name]")
            rel, label, cname = entry
            seen = names.setdefault(label, (cname, s))
            if seen[0] != cname:
                raise DataError(f"{key}: {path} gives label {label} two class names: {seen[0]!r} (in {seen[1]}) "
                                f"and {cname!r} ({s}[{n}])")
            items[s].append((os.path.join(image_dir, rel), label))
    return CoopData(key, folder, _classes(key, path, names, items), items)


def _classes(key: str, where, names: Dict[int, Tuple[str, str]], items) -> List[str]:
    """Class names by label, once checked: train holds every label 0..C-1, val/test no other,
    and no two labels share a name."""
    train_labels = {label for _, label in items["train"]}
    n = len(train_labels)
    if not train_labels or train_labels != set(range(n)):
        raise DataError(f"{key}: {where}: the train labels must be 0..C-1 with every class present "
                        f"(found {len(train_labels)} label(s), largest {max(train_labels, default=None)})")
    extra = sorted(set(names) - train_labels)
    if extra:
        raise DataError(f"{key}: {where}: label {extra[0]} ({names[extra[0]][0]!r}) is in {names[extra[0]][1]} "
                        "but not in train")
    classes = [names[i][0] for i in range(n)]
    first = {}
    for i, c in enumerate(classes):
        if display_name(c) in first:
            raise DataError(f"{key}: {where}: labels {first[display_name(c)]} and {i} share the class "
                            f"name {c!r}")
        first[display_name(c)] = i
    return classes


def _read_lines(path: Path, key: str) -> List[List[str]]:
    if not path.is_file():
        raise DataError(f"{key}: {path} not found (see CoOp's DATASETS.md)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{key}: cannot read {path}: {exc}") from exc
    return [line.strip().split(" ") for line in text.splitlines() if line.strip()]


def _files(folder: Path) -> List[str]:
    # CoOp lists every non-hidden entry, in the file system's order; sorted here, so that the
    # same seed draws the same images on every machine
    return sorted(f for f in os.listdir(folder) if not f.startswith("."))


def _read_imagenet(folder: Path, lay: Layout) -> CoopData:
    wnid_names = {}
    for parts in _read_lines(folder / MARKERS["imagenet"], "imagenet"):
        wnid_names[parts[0]] = " ".join(parts[1:])
    items, wnids = {}, None
    for s, sub in (("train", "train"), ("test", "val")):
        split_dir = folder / lay.images / sub
        if not split_dir.is_dir():
            raise DataError(f"imagenet: image folder {split_dir} not found (CoOp's DATASETS.md: "
                            "imagenet/images/train|val/<wnid>/)")
        found = sorted(d.name for d in os.scandir(split_dir) if d.is_dir())
        if wnids is None:
            wnids = found
        elif found != wnids:
            other = sorted(set(found) ^ set(wnids))
            raise DataError(f"imagenet: {split_dir} holds other class folders than images/train (first: {other[0]})")
        unknown = [w for w in found if w not in wnid_names]
        if unknown:
            raise DataError(f"imagenet: class folder {unknown[0]} of {split_dir} is not in classnames.txt")
        items[s] = [(str(split_dir / w / f), label) for label, w in enumerate(found) for f in _files(split_dir / w)]
    if not wnids:
        raise DataError(f"imagenet: {folder / lay.images / 'train'} holds no class folders")
    items["val"] = []
    return CoopData("imagenet", folder, [wnid_names[w] for w in wnids], items)


def _read_aircraft(folder: Path, lay: Layout) -> CoopData:
    variants = [" ".join(parts) for parts in _read_lines(folder / MARKERS["fgvc_aircraft"], "fgvc_aircraft")]
    label_of = {v: i for i, v in enumerate(variants)}
    items = {}
    for s in SPLITS:
        path = folder / f"images_variant_{s}.txt"
        items[s] = []
        for n, parts in enumerate(_read_lines(path, "fgvc_aircraft")):
            variant = " ".join(parts[1:])
            if variant not in label_of:
                raise DataError(f"fgvc_aircraft: {path} line {n + 1} names variant {variant!r}, not in variants.txt")
            items[s].append((str(folder / lay.images / (parts[0] + ".jpg")), label_of[variant]))
    names = {i: (v, "variants.txt") for i, v in enumerate(variants)}
    return CoopData("fgvc_aircraft", folder, _classes("fgvc_aircraft", folder, names, items), items)


def _warn_if_renamed(key: str, classes: Sequence[str]) -> None:
    """One ClassNamesDiffer warning at the first label whose name differs from the shipped
    list's (a subset with the same names, such as a miniature, is not reported)."""
    for i, (found, known) in enumerate(zip(classes, dataset_classnames(key))):
        if display_name(found) != display_name(known):
            warnings.warn(f"{key}: class {i} is {found!r} where the shipped {key} list has {known!r} (a custom "
                          "split?); the split's names are used", ClassNamesDiffer, stacklevel=3)
            return


def fewshot(items: Sequence[Tuple[str, int]], shots: int, rng: random.Random) -> Tuple[list, Dict[int, int]]:
    """CoOp's few-shot draw: ``shots`` items per label, classes in first-appearance order.

    returns (sampled items, {label: count} of the labels with fewer than ``shots`` items,
    which keep them all)."""
    by_label: Dict[int, list] = {}
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    out, short = [], {}
    for label, group in by_label.items():
        if len(group) >= shots:
            out += rng.sample(group, shots)
        else:
            out += group
            short[label] = len(group)
    return out, short


def coop_split(name: str, root, shots: int, seed: int, allow_fewer: bool) -> dict:
    """The run's split record (as ``folders.folder_split`` writes it): K shots per class from
    train and min(K, 4) from val drawn with ``random.Random(seed)``, the whole test split.

    returns {"layout", "classes", "short", "train": {class: [paths]},
             "eval": {"val"?: {class: [paths]}, "test": {class: [paths]}}}"""
    if shots < 1:
        raise DataError(f"--shots must be >= 1, got {shots}")
    data = read(name, root)
    check_shots(data, shots, allow_fewer)
    rng = random.Random(seed)
    train, short = fewshot(data.items["train"], shots, rng)
    val, _ = fewshot(data.items["val"], min(shots, VAL_SHOTS), rng)
    evals = {"val": _by_class(val, data.classes), "test": _by_class(data.items["test"], data.classes)}
    return {"layout": f"coop:{data.name}", "classes": data.classes,
            "short": {data.classes[c]: n for c, n in short.items()}, "train": _by_class(train, data.classes),
            "eval": {s: v for s, v in evals.items() if v}}


def _by_class(items: Sequence[Tuple[str, int]], classes: Sequence[str]) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for path, label in items:
        out.setdefault(classes[label], []).append(path)
    return out


def parse_names(text: str) -> List[str]:
    """``all`` or a comma-separated list of dataset names -> the names, in table order."""
    if text.strip().lower() == "all":
        return list(LAYOUTS)
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise DataError("--datasets is empty (give 'all' or names such as dtd,eurosat)")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise DataError(f"--datasets: {unknown[0]!r} is not one of {', '.join(LAYOUTS)}")
    if len(set(names)) != len(names):
        raise DataError(f"--datasets names a dataset twice: {text}")
    return [n for n in LAYOUTS if n in names]


def check_shots(data: CoopData, shots: int, allow_fewer: bool) -> None:
    """Raise DataError when a class has fewer than ``shots`` training images (unless allowed)."""
    counts: Dict[int, int] = {}
    for _, label in data.items["train"]:
        counts[label] = counts.get(label, 0) + 1
    short = {c: n for c, n in counts.items() if n < shots}
    if short and not allow_fewer:
        c, n = next(iter(short.items()))
        raise DataError(f"{data.name}: {len(short)} class(es) have fewer than --shots={shots} "
                        f"training images (the first: {data.classes[c]!r}, {n}); pass --allow-fewer to train "
                        "with what exists")
