"""Moved: a run's checkpoints are ``demul_fast.app.checkpoint``. This stub keeps the old names
for one release (``demul_fast._moved``)."""

from ._moved import forward

__getattr__, __dir__ = forward(__name__, {
    "demul_fast.app.checkpoint": ("POINTER_FILE", "PREFIX", "CheckpointError", "write_json", "current", "write",
                                  "staging_folder", "swap_in"),
})
