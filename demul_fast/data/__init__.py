"""The data wing: where training images and class names come from.

* ``folders``: image folders (``root/<class>/<image>`` or ``root/train|val|test/...``), the
  few-shot sampling of such a folder, image decoding, the image dataset and transforms;
* ``coop_layouts``: the 11 few-shot benchmarks in CoOp's folder layouts and CoOp's sampling;
* ``sampling``: the training randomness (shuffle, crop, flip) keyed by (seed, epoch, image),
  the same at any world size, and the sampler of each rank's share of the global batches;
* ``classnames``: the shipped class-name lists (the ``<dataset>.txt`` files in this folder,
  package data) and the rule by which two class names are the same.

Everything here raises ``DataError`` (a ``ValueError``) for input that cannot be used. The
data wing imports no module of the application (``demul_fast.app``).
"""


class DataError(ValueError):
    """The dataset folder cannot be used as asked (missing, empty, too few images, unreadable)."""
