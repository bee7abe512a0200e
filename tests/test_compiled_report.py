"""The compiled-code report (benchmarks/compiled.py) at the imagenet preset, checked in CI
without a GPU: the Triton kernels are compiled for sm_90a and read back with ptxas -v.

Checks (issue 15): every kernel that multiplies matrices lowers to wgmma, no kernel spills,
every grid covers a wave of 132 SMs (small merge passes excepted), shared memory fits 227 KiB.
The cross-entropy kernels are not yet re-tiled (16-row tiles: mma.sync, 16-63 programs):
those checks are expected failures, strict, so that the day they pass the marks must go.
"""

import json
import os

import pytest

compiled = pytest.importorskip("benchmarks.compiled")
compiled_triton = pytest.importorskip("benchmarks.compiled_triton")
if compiled_triton.available():
    pytest.skip(compiled_triton.available(), allow_module_level=True)

CE_NOT_RETILED = {"ce_fwd", "ce_bwd_du", "ce_bwd_dx"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    rep = compiled.collect("imagenet", str(out))
    rep["dir"] = str(out)
    return rep


def _kernels(report):
    return {k["name"]: k for k in report["kernels"] if k["backend"] == "triton"}


def _param(name):
    marks = [pytest.mark.xfail(strict=True, reason="cross-entropy kernels keep 16-row tiles (issue 15 item 2 open)")]
    return pytest.param(name, marks=marks if name in CE_NOT_RETILED else [])


MATMUL = ["text_fwd", "text_bwd", "ce_fwd", "ce_grad", "ce_du", "ce_dx"]
ALL = MATMUL + ["distill_finish", "ce_merge", "losses", "ce_dx_finish"]


def test_report_schema(report):
    with open(os.path.join(report["dir"], "report.json")) as f:
        saved = json.load(f)
    for key in ("kernels", "head_fwd_bwd_us", "eager_fwd_bwd_us", "floor_us"):
        assert key in saved
    assert set(_kernels(report)) == set(ALL)
    for k in saved["kernels"]:
        assert {"name", "backend", "ptx", "grid", "mma", "regs", "spill_bytes", "smem_bytes", "flops", "bytes",
                "modelled_us"} <= set(k)
        assert os.path.getsize(os.path.join(report["dir"], k["ptx"])) > 0
        assert k["modelled_us"] > 0


@pytest.mark.parametrize("name", [_param(n) for n in MATMUL])
def test_matmul_kernels_use_wgmma(report, name):
    assert _kernels(report)[name]["mma"] == "wgmma"


@pytest.mark.parametrize("name", [pytest.param("ce_bwd_dx", marks=pytest.mark.xfail(
    strict=True, reason="16-row CE dX kernel: 8 bytes of spills")) if n == "ce_bwd_dx" else n for n in ALL])
def test_no_spills(report, name):
    assert _kernels(report)[name]["spill_bytes"] == 0


@pytest.mark.parametrize("name", [_param(n) for n in ALL])
def test_grid_covers_a_wave(report, name):
    k = _kernels(report)[name]
    if k.get("merge"):
        pytest.skip(f"{name} is a small merge pass ({k['modelled_us']:.2f} us modelled)")
    assert k["grid"] >= compiled.SMS


def test_shared_memory_fits(report):
    for k in report["kernels"]:
        assert k["smem_bytes"] <= compiled.SMEM_LIMIT, k["name"]


def test_modelled_goal(report):
    """The goal of issue 15, modelled: the head within 2x of its floor, >= 10x the eager step."""
    assert report["head_fwd_bwd_us"] <= 2 * report["floor_us"]
    assert report["eager_fwd_bwd_us"] >= 10 * report["head_fwd_bwd_us"]
