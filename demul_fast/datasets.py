"""Moved: CoOp's dataset layouts are ``demul_fast.data.coop_layouts``. This stub keeps the old
names for one release (``demul_fast._moved``)."""

from ._moved import forward

__getattr__, __dir__ = forward(__name__, {
    "demul_fast.data.coop_layouts": ("SPLITS", "VAL_SHOTS", "Layout", "LAYOUTS", "MARKERS", "ClassNamesDiffer",
                                     "CoopData", "layout", "dataset_folder", "read", "fewshot", "coop_split",
                                     "parse_names", "check_shots"),
    "demul_fast.data": ("DataError",),
})
