"""Shared test setup.

* Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set
  before triton is first imported, so it is set here, at the top of conftest.
* Tests marked ``gpu`` are skipped at collection, with the reason, when there is no CUDA
  device; they never pass silently.
"""

import os
import sys

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests' own helper modules


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A torch.Generator seeded per test (fixed seed, fresh inputs per case)."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: intra-op threads only add synchronisation (and on a busy shared CPU,
    OpenMP spin-waits make them tens of times slower). Restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
