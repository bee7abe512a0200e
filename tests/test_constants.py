"""The CUDA extension is compiled with the constants of demul_fast.common (setup.py passes
them as macros) and exports what it was built with: a stale build, or a constant written
again by hand in csrc/, fails here. Runs without a GPU; CI builds the extension."""

import pytest

from demul_fast import common

try:
    from demul_fast import _C
except ImportError as exc:  # tests/test_cuda.py fails loudly when nvcc is there but _C is not
    pytest.skip(f"demul_fast._C is not built here ({exc})", allow_module_level=True)


def test_extension_norm_floor_is_common_eps():
    assert isinstance(_C.EPS, float)
    assert _C.EPS == common.EPS


def test_extension_prompt_limit_is_common_max_prompts():
    assert isinstance(_C.MAX_PROMPTS, int)
    assert _C.MAX_PROMPTS == common.MAX_PROMPTS


def test_kernels_write_no_norm_floor_by_hand():
    """The norm floor appears in csrc/ only as the build's macro DEMUL_EPS."""
    import pathlib
    import re

    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    for path in sorted(csrc.glob("*.*")):
        text = path.read_text()
        assert not re.search(r"\b1e-0?6f?\b", text), f"{path.name} writes the norm floor by hand"
