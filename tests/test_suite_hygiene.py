"""The suite's own rules, checked on its source:

* every test asserts something: an ``assert``, ``pytest.raises``/``warns``, or a call of a
  helper (in its module or in the tests' helper modules) that does, transitively;
* nothing is skipped for a missing package (no ``importorskip``): the test extra is
  required, and conftest stops the run, naming the package, when one does not import; its
  list is pyproject.toml's ``test`` extra;
* every skip names its reason.
"""

import ast
import os
import re

import pytest

import conftest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
ASSERTING_CALLS = {"raises", "warns", "deprecated_call", "fail", "assert_close", "assert_allclose",
                   "assert_equal", "opcheck", "gradcheck", "gradgradcheck"}


def _modules():
    out = {}
    for name in sorted(os.listdir(TESTS)):
        if name.endswith(".py"):
            with open(os.path.join(TESTS, name), encoding="utf-8") as f:
                out[name] = ast.parse(f.read(), name)
    return out


def _called_names(node):
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            f = sub.func
            if isinstance(f, ast.Name):
                yield f.id
            elif isinstance(f, ast.Attribute):
                yield f.attr


def _asserts_directly(node) -> bool:
    if any(isinstance(sub, ast.Assert) for sub in ast.walk(node)):
        return True
    return any(n in ASSERTING_CALLS or n.startswith("assert") for n in _called_names(node))


def _asserting_helpers(modules):
    """Names of the functions (any module of tests/, any nesting) that assert, transitively."""
    functions = {}
    for tree in modules.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.setdefault(node.name, []).append(node)
    asserting = {name for name, nodes in functions.items() if any(_asserts_directly(n) for n in nodes)}
    changed = True
    while changed:
        changed = False
        for name, nodes in functions.items():
            if name not in asserting and any(set(_called_names(n)) & asserting for n in nodes):
                asserting.add(name)
                changed = True
    return asserting


def _tests(modules):
    for file, tree in modules.items():
        if file.startswith("test_"):
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                    yield file, node


def test_every_test_asserts():
    modules = _modules()
    helpers = _asserting_helpers(modules)
    silent = [f"{file}::{node.name}" for file, node in _tests(modules)
              if not (_asserts_directly(node) or set(_called_names(node)) & helpers)]
    assert not silent, f"tests that assert nothing: {silent}"


def test_the_assertion_check_can_fail():
    tree = ast.parse("def helper(x):\n    return x\n\ndef test_silent():\n    helper(1)\n")
    node = tree.body[1]
    assert not _asserts_directly(node) and not set(_called_names(node)) & _asserting_helpers({"t.py": tree})


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


def test_every_skip_names_its_reason():
    nameless = []
    for file, line, call in _skip_calls(_modules()):
        if call.func.attr == "importorskip":
            continue
        has_reason = any(k.arg == "reason" for k in call.keywords)
        if call.func.attr == "skip" and isinstance(call.func.value, ast.Name):  # pytest.skip(msg)
            has_reason = has_reason or bool(call.args)
        if not has_reason:
            nameless.append(f"{file}:{line}")
    assert not nameless, f"skips without a reason: {nameless}"


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
