"""Moved: phi's fit, save and load are ``demul_fast.phi``; the class-name lists
``demul_fast.data.classnames``; ``fit_phi_for_model`` ``demul_fast.app.phi_cache``. This stub
keeps the old names for one release (``demul_fast._moved``)."""

from ._moved import forward

__getattr__, __dir__ = forward(__name__, {
    "demul_fast.phi": ("DEFAULT_TEMPLATE", "RIDGE_GRID", "clip_text_features", "PhiReport", "fit_phi", "save_phi",
                       "load_phi"),
    "demul_fast.data.classnames": ("DATASETS", "UNION_FILE", "dataset_classnames", "union_classnames",
                                   "compute_union"),
    "demul_fast.app.phi_cache": ("fit_phi_for_model",),
})
