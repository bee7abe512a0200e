"""Class names: the lists shipped for CoOp's 11 few-shot benchmarks (``<dataset>.txt`` and
``union.txt`` in this folder) and the rule by which a stored name and a requested one are the
same class (underscores as spaces, surrounding whitespace trimmed, order significant).
"""

from __future__ import annotations

from importlib import resources
from typing import Sequence

# CoOp's 11 few-shot benchmarks; class-name lists in <key>.txt beside this file
DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
            "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
UNION_FILE = "union.txt"


def _read_names(filename: str) -> list:
    text = resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def dataset_classnames(dataset: str) -> list:
    """Class names of one of the 11 standard few-shot datasets (names as CoOp uses them)."""
    key = dataset.lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return _read_names(key + ".txt")


def union_classnames() -> list:
    """The union of the 11 datasets' class names (``data/union.txt``): names compared after
    underscores -> spaces and lower-casing, first spelling kept, in dataset order."""
    return _read_names(UNION_FILE)


def compute_union(lists: Sequence[Sequence[str]]) -> list:
    """Union of name lists, deduplicated case-insensitively with underscores as spaces."""
    seen, out = set(), []
    for names in lists:
        for n in names:
            key = " ".join(n.replace("_", " ").lower().split())
            if key not in seen:
                seen.add(key)
                out.append(n)
    return out


class ClassNameMismatch(ValueError):
    """An embeddings file or checkpoint holds other class names than the ones requested."""


def display_name(name: str) -> str:
    """The text used for a class: underscores to spaces, surrounding whitespace trimmed."""
    return " ".join(name.replace("_", " ").split())


def check_classnames(found: Sequence[str], expected: Sequence[str], where: str) -> None:
    """Raise ClassNameMismatch naming the first differing class (index and both names).

    found:    names stored in ``where`` (a file, a checkpoint)
    expected: the names asked for, in order
    """
    found = list(found)
    expected = list(expected)
    for i, (f, e) in enumerate(zip(found, expected)):
        if display_name(f) != display_name(e):
            raise ClassNameMismatch(
                f"{where}: class {i} is {f!r} but the requested class {i} is {e!r} "
                f"(class names must match in order)"
            )
    if len(found) != len(expected):
        i = min(len(found), len(expected))
        extra = found[i] if len(found) > i else expected[i]
        side = "only in the file" if len(found) > i else "missing from the file"
        raise ClassNameMismatch(
            f"{where}: holds {len(found)} classes but {len(expected)} were requested; "
            f"the first differing class is {i}: {extra!r} ({side})"
        )
