"""demul_fast: fused kernels and an exact prefix-shared text encoder for DeMul.

Public API (see README.md and docs/SPEC.md):

* ``aggregate_prompts``, ``cosine_cross_entropy``, ``prompt_distill_loss``, ``demul_head``:
  the DeMul head, each with ``backend=None | "cuda" | "triton" | "torch"``;
* ``HeadOutput``: what ``demul_head`` returns;
* ``DistillBasis``, ``build_distill_basis``: the frozen-phi basis of the K-free
  distillation (SPEC 4.3), for ``distill_basis=`` of the head functions;
* ``backends``: which implementation runs, and why (``demul_fast.ops.backends.describe()``);
* ``reference``: the specification in plain PyTorch.
* ``DeMul``: the whole module (prompts, prefix-shared text encoder, fused head);
  ``PrefixSharedTextEncoder``: the exact prefix-shared CLIP text encoder;
  ``nn.DeMulHead``: the head as a drop-in layer.

Not imported here: ``demul_fast.app`` (the ``demul-fast`` command: training, evaluation,
the sweep, torchrun plumbing) and ``demul_fast.data`` (image folders, CoOp's dataset
layouts, class-name lists). The layers and what each may import: README.md,
"How the code is layered" (enforced by tests/test_layers.py).
"""

from importlib import metadata as _metadata

from . import reference
from .ops import backends, functional
from .ops.functional import aggregate_prompts, cosine_cross_entropy, demul_head, prompt_distill_loss
from .common import HeadOutput
from .ops.distill_basis import DistillBasis, build_distill_basis
from . import nn
from .model import DeMul
from .text_encoder import PrefixSharedTextEncoder, UnsupportedTextTower

backends.preload()

try:
    __version__ = _metadata.version("demul-fast")  # one version: pyproject.toml's
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "aggregate_prompts",
    "cosine_cross_entropy",
    "prompt_distill_loss",
    "demul_head",
    "HeadOutput",
    "DistillBasis",
    "build_distill_basis",
    "backends",
    "reference",
    "nn",
    "DeMul",
    "PrefixSharedTextEncoder",
    "UnsupportedTextTower",
]
