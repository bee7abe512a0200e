"""The suite's own rules, checked on its source:

* every test (a top-level ``test_*`` or a ``test_*`` method of a ``Test*`` class) asserts
  something, by AST: an ``assert``, ``pytest.raises``/``warns``/``fail``, a
  ``torch.testing``/``numpy.testing`` assertion, gradcheck/opcheck, or a call that resolves
  (same module, or imported from a tests module) to a function that does, transitively;
* nothing is skipped for a missing package (no ``importorskip``): the test extra is
  required, and conftest stops the run, naming the package, when one does not import; its
  list is pyproject.toml's ``test`` extra;
* every skip names its reason, module-level ones included (a bare ``pytest.mark.skip`` or
  an empty message is no reason).
"""

import ast
import os
import re

import pytest

import conftest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# What counts as asserting, by structure (AST): an ``assert`` statement, or a call of one of
# these (its full dotted name as written, module aliases resolved), or a call that resolves to a
# function of the tests folder that asserts, transitively: a name defined in the same module
# or imported from a tests module (``from numerics import assert_error_rule``,
# ``kernel_checks.run``). A generic name (``check``, ``fast``) counts only through that
# resolution, never because some other module defines an asserting function of that name.
ASSERTING_CALLS = {"pytest.raises", "pytest.warns", "pytest.deprecated_call", "pytest.fail",
                   "torch.autograd.gradcheck", "torch.autograd.gradgradcheck", "torch.library.opcheck"}
ASSERTING_PREFIXES = ("torch.testing.", "numpy.testing.")
ALIASES = {"np": "numpy"}


def _modules():
    out = {}
    for name in sorted(os.listdir(TESTS)):
        if name.endswith(".py"):
            with open(os.path.join(TESTS, name), encoding="utf-8") as f:
                out[name] = ast.parse(f.read(), name)
    return out


def _dotted(node):
    """'a.b.c' for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


class _Module:
    """One tests module: its functions by name (any nesting, methods included) and what its
    imports bind (``from m import f`` -> (m, f); ``import m`` -> (m, None))."""

    def __init__(self, file, tree, local_modules):
        self.file, self.functions, self.imports = file, {}, {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions.setdefault(node.name, []).append(node)
            elif isinstance(node, ast.ImportFrom) and node.module in local_modules and node.level == 0:
                for a in node.names:
                    self.imports[a.asname or a.name] = (node.module, a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in local_modules:
                        self.imports[a.asname or a.name] = (a.name, None)
                    else:
                        self.imports.setdefault(a.asname or a.name.split(".")[0],
                                                ("", a.name if a.asname else a.name.split(".")[0]))


def _calls(node):
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            yield sub.func


class _Index:
    def __init__(self, modules):
        local = {f[:-3] for f in modules}
        self.modules = {f[:-3]: _Module(f, t, local) for f, t in modules.items()}
        self.memo = {}

    def _full_name(self, mod, dotted):
        head, _, rest = dotted.partition(".")
        bound = mod.imports.get(head)
        if bound is not None and bound[0] == "":  # an outside module, maybe aliased (import numpy as np)
            head = bound[1]
        head = ALIASES.get(head, head)
        return f"{head}.{rest}" if rest else head

    def _targets(self, mod, func):
        """The tests-folder functions (module name, node) a call may reach."""
        dotted = _dotted(func)
        if dotted is None:
            return []
        head, _, rest = dotted.partition(".")
        if head in ("self", "cls") and rest and "." not in rest:
            return [(mod, n) for n in mod.functions.get(rest, [])]
        if not rest:
            if head in mod.imports and mod.imports[head][0]:
                m, name = mod.imports[head]
                target = self.modules[m]
                return [(target, n) for n in target.functions.get(name or "", [])]
            return [(mod, n) for n in mod.functions.get(head, [])]
        bound = mod.imports.get(head)
        if bound and bound[0] and bound[1] is None and "." not in rest:  # kernel_checks.run
            target = self.modules[bound[0]]
            return [(target, n) for n in target.functions.get(rest, [])]
        return []

    def asserts_directly(self, mod, node):
        if any(isinstance(sub, ast.Assert) for sub in ast.walk(node)):
            return True
        for func in _calls(node):
            dotted = _dotted(func)
            if dotted is None:
                continue
            full = self._full_name(mod, dotted)
            if full in ASSERTING_CALLS or full.startswith(ASSERTING_PREFIXES):
                return True
        return False

    def asserts(self, mod, node, seen=None):
        key = (mod.file, id(node))
        if key in self.memo:
            return self.memo[key]
        seen = set() if seen is None else seen
        if key in seen:
            return False
        seen.add(key)
        result = self.asserts_directly(mod, node) or any(
            self.asserts(m, n, seen) for func in _calls(node) for m, n in self._targets(mod, func))
        self.memo[key] = result
        return result


def _tests(modules):
    """Test functions: top-level ``test_*`` and ``test_*`` methods of ``Test*`` classes."""
    for file, tree in modules.items():
        if file.startswith("test_"):
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                    yield file, node
                elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                    for sub in node.body:
                        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.name.startswith("test_"):
                            yield file, sub


def _silent_tests(modules):
    index = _Index(modules)
    return [f"{file}::{node.name}" for file, node in _tests(modules)
            if not index.asserts(index.modules[file[:-3]], node)]


def test_every_test_asserts():
    silent = _silent_tests(_modules())
    assert not silent, f"tests that assert nothing: {silent}"


@pytest.mark.parametrize("source,silent", [
    # a helper that asserts nothing
    ("def helper(x):\n    return x\n\ndef test_a():\n    helper(1)\n", True),
    # a generic name that asserts in ANOTHER module does not count here
    ("def test_a():\n    check(1)\n", True),
    # a method of a test class is a test too
    ("class TestA:\n    def test_a(self):\n        print(1)\n", True),
    # a call that looks like an assertion but is not one of the assertion APIs
    ("def test_a(m):\n    m.assert_called()\n", True),
    ("def helper(x):\n    assert x\n\ndef test_a():\n    helper(1)\n", False),
    ("import numpy as np\n\ndef test_a():\n    np.testing.assert_allclose(1, 1)\n", False),
    ("import pytest\n\ndef test_a():\n    with pytest.raises(ValueError):\n        int('x')\n", False),
    ("from other import check\n\ndef test_a():\n    check(1)\n", False),
])
def test_the_assertion_check_can_fail(source, silent):
    modules = {"test_t.py": ast.parse(source), "other.py": ast.parse("def check(x):\n    assert x\n")}
    assert (_silent_tests(modules) == ["test_t.py::test_a"]) == silent


def _skip_calls(modules):
    """(file, line, call) for every pytest.skip / importorskip / mark.skip / skipif call."""
    for file, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("skip", "skipif", "importorskip"):
                yield file, node.lineno, node


def test_no_skip_for_a_missing_package():
    found = [f"{file}:{line}" for file, line, call in _skip_calls(_modules()) if call.func.attr == "importorskip"]
    assert not found, f"importorskip turns a missing test extra into skips: {found}"


def _nameless_skips(modules):
    nameless = []
    for file, line, call in _skip_calls(modules):
        if call.func.attr == "importorskip":
            continue
        reasons = [k.value for k in call.keywords if k.arg == "reason"]
        if call.func.attr == "skip" and isinstance(call.func.value, ast.Name):  # pytest.skip(msg)
            reasons += call.args[:1]
        if not reasons or all(isinstance(r, ast.Constant) and not str(r.value).strip() for r in reasons):
            nameless.append(f"{file}:{line}")
    # a bare mark (``pytestmark = pytest.mark.skip``, ``@pytest.mark.skipif``) has no reason either
    for file, tree in modules.items():
        called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("skip", "skipif") and id(node) not in called \
                    and _dotted(node) in ("pytest.mark.skip", "pytest.mark.skipif", "mark.skip", "mark.skipif"):
                nameless.append(f"{file}:{node.lineno}")
    return nameless


def test_every_skip_names_its_reason():
    """Module-level skips included (pytestmark, pytest.skip(..., allow_module_level=True))."""
    nameless = _nameless_skips(_modules())
    assert not nameless, f"skips without a reason: {nameless}"


@pytest.mark.parametrize("source,nameless", [
    ("import pytest\npytestmark = pytest.mark.skip\n", True),
    ("import pytest\npytestmark = pytest.mark.skipif(True)\n", True),
    ("import pytest\npytest.skip('', allow_module_level=True)\n", True),
    ("import pytest\npytestmark = pytest.mark.skipif(True, reason='no GPU')\n", False),
    ("import pytest\npytest.skip('no GPU here', allow_module_level=True)\n", False),
])
def test_the_skip_check_can_fail(source, nameless):
    assert bool(_nameless_skips({"test_t.py": ast.parse(source)})) == nameless


def test_the_extras_check_names_a_missing_package(monkeypatch):
    monkeypatch.setitem(conftest.TEST_EXTRA, "a_package_that_is_not_installed", "not-installed")
    missing = conftest.missing_test_extra()
    assert [package for package, _ in missing] == ["not-installed"]


def test_the_extras_check_covers_the_test_extra():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["test"]
    listed = {re.split(r"[<>=!~\[]", p.strip())[0] for p in extra}
    assert listed - {"pytest"} == set(conftest.TEST_EXTRA.values())


@pytest.mark.parametrize("name", ["ci", "slow"])
def test_hypothesis_profiles(name):
    from hypothesis import settings  # noqa: PLC0415

    profile = settings.get_profile(name)
    assert profile.deadline is None and profile.max_examples >= (20 if name == "ci" else 200)
