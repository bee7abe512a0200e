"""Moved: zero-shot CLIP is ``demul_fast.app.zeroshot``. This stub keeps the old name for one
release (``demul_fast._moved``)."""

from ._moved import forward

__getattr__, __dir__ = forward(__name__, {"demul_fast.app.zeroshot": ("zeroshot",)})
