"""The package's layers import one way (issue 24), read from the source with ``ast``.

    spec     common.py, reference.py         imports ``common`` only (reference: also the
                                             ``_moved`` forwards of its old names)
    kernels  kernels/                        the spec's ``common``, nothing above
    ops      ops/                            spec, kernels, ``_C``; never modules, data, app
    modules  every other file, towers/       spec, kernels, ops; never data or app
    data     data/                           the layers above; never the app
    app      app/, cli.py (the entry point)  anything but the deprecated stubs

The deprecated stubs (``train.py``, ``datasets.py``, ``mapping.py`` ...) import only
``_moved``: their forwards name the new places as strings, resolved when an old name is
used. Every import statement counts, also those inside functions. Nothing in the package
imports a stub, and the module-level imports form no circle.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demul_fast")
STUBS = {"train", "datasets", "llm", "checkpoint", "zeroshot", "sweep", "distributed", "mapping"}
# layer -> the layers it may import
ALLOWED = {
    "common": set(),
    "spec": {"common", "moved"},
    "kernels": {"common", "kernels"},
    "ops": {"common", "spec", "kernels", "ops", "ext"},
    "modules": {"common", "spec", "kernels", "ops", "modules", "ext"},
    "data": {"common", "spec", "kernels", "ops", "modules", "ext", "data"},
    "app": {"common", "spec", "kernels", "ops", "modules", "ext", "data", "app"},
    "stub": {"moved"},
    "moved": set(),
}


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside demul_fast."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ("__init__", "__main__"):
        return "modules"
    first = parts[0]
    if first == "common":
        return "common"
    if first == "reference":
        return "spec"
    if first == "_moved":
        return "moved"
    if first == "_C":
        return "ext"
    if first in ("kernels", "ops", "data", "app"):
        return first
    if first == "cli":
        return "app"
    if first in STUBS:
        return "stub"
    return "modules"


def _is_module(dotted: str) -> bool:
    if dotted == "demul_fast._C":  # the compiled extension: no source file
        return True
    path = os.path.join(os.path.dirname(ROOT), *dotted.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def imports(module: str, source: str, is_package: bool = False):
    """(line, imported demul_fast module, at module level) of every import in ``source``."""
    package = module if is_package else module.rsplit(".", 1)[0]
    tree = ast.parse(source)
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, id(node) in top) for a in node.names if a.name.split(".")[0] == "demul_fast"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "demul_fast":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if _is_module(sub) else target, id(node) in top))
    return out


def _sources():
    for folder, _, files in os.walk(ROOT):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                is_package = rel.endswith(".__init__")
                module = rel[:-len(".__init__")] if is_package else rel
                with open(path, encoding="utf-8") as f:
                    yield module, f.read(), is_package


def violations(module: str, source: str, is_package: bool = False):
    layer = layer_of(module if not is_package else module + ".__init__")
    found = []
    for line, target, _ in imports(module, source, is_package):
        if target == module:
            continue
        if layer_of(target) not in ALLOWED[layer] and not (layer == layer_of(target) == "stub"):
            found.append(f"{module}:{line} ({layer}) imports {target} ({layer_of(target)})")
    return found


def test_the_layers_import_one_way():
    found = [v for module, source, pkg in _sources() for v in violations(module, source, pkg)]
    assert not found, "\n".join(found)


def import_circle(graph):
    """The first import circle of ``graph`` ({module: imported modules}) as a list ending where
    it starts, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_no_module_level_import_circle():
    graph = {}
    for module, source, pkg in _sources():
        graph[module] = {t for _, t, top in imports(module, source, pkg) if top and t != module}
    circle = import_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_search_finds_a_planted_circle():
    assert import_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert import_circle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module, source, bad", [
    ("demul_fast.reference", "from .model import DeMulReference\n", True),
    ("demul_fast.reference", "def f():\n    from . import towers\n", True),
    ("demul_fast.reference", "from .common import EPS\n", False),
    ("demul_fast.ops.functional", "from ..nn import DeMulHead\n", True),
    ("demul_fast.ops.functional", "from .. import reference\n", False),
    ("demul_fast.kernels.text_head", "import demul_fast.app.train\n", True),
    ("demul_fast.nn", "from .app import runtime\n", True),
    ("demul_fast.nn", "from .data.classnames import display_name\n", True),
    ("demul_fast.phi", "from . import train\n", True),
    ("demul_fast.data.folders", "from ..app.config import TrainConfig\n", True),
    ("demul_fast.app.train", "from ..data import coop_layouts\nfrom .. import nn\n", False),
    ("demul_fast.app.train", "from .. import datasets\n", True),
])
def test_the_layer_check_can_fail(module, source, bad):
    assert bool(violations(module, source)) == bad, violations(module, source)
