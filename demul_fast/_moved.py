"""Old import paths of what moved (into ``demul_fast.app``, ``demul_fast.data``, or out of
the specification into the module layer).

Each old module (``demul_fast.train``, ``demul_fast.datasets``, ...) is a stub whose moved
names resolve, on first use, to the same objects at their new place, with a
``DeprecationWarning`` naming that place. The forwards go away in the release after 0.1.
This module imports nothing of demul_fast (the specification may use it).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Callable, Dict, Iterable, List, Tuple


def forward(old: str, targets: Dict[str, Iterable[str]]) -> Tuple[Callable, Callable]:
    """(``__getattr__``, ``__dir__``) for the stub module ``old``.

    targets: {new module: names it holds that ``old`` used to define}
    """
    where = {name: module for module, names in targets.items() for name in names}

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} moved to {module}.{name}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)

    def __dir__() -> List[str]:
        return sorted(set(where) | set(vars(sys.modules[old])))

    return __getattr__, __dir__
