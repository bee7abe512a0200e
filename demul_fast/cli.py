"""The ``demul-fast`` command as a module: ``python -m demul_fast.cli ...`` and
``torchrun --nproc_per_node N -m demul_fast.cli train ...``. The command line itself is
``demul_fast.app.cli``."""

import sys

from .app.cli import build_parser, main  # noqa: F401  (the entry point's names)

if __name__ == "__main__":
    sys.exit(main())
