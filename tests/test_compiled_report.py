"""The compiled-code report (benchmarks/compiled.py) at the imagenet preset, checked in CI
without a GPU: the Triton kernels are compiled for sm_90a and read back with ptxas -v.

Checks (issue 15): every kernel that multiplies matrices lowers to wgmma, no kernel spills,
every grid covers a wave of 132 SMs (the small merge passes excepted: distillation finish,
CE merge, losses, each under 0.1 us modelled), shared memory fits 227 KiB, and the goal:
the modelled head within 2x of its modelled floor and at least 10x faster than the
modelled eager step.
"""

import json
import re
import os
import subprocess
import sys

import pytest

from benchmarks import compiled, compiled_triton  # noqa: E402  (part of the repository)
if compiled_triton.unavailable_reason():
    pytest.skip(compiled_triton.unavailable_reason(), allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report as the command line writes it, in a process without TRITON_INTERPRET
    (the interpreter's kernels cannot be compiled)."""
    out = tmp_path_factory.mktemp("compiled")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compiled.py"), "--preset", "imagenet",
                          "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(run.stdout[-3000:], run.stderr[-3000:])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MODELLED" in run.stdout
    with open(os.path.join(out, "report.json")) as f:
        rep = json.load(f)
    rep["dir"] = str(out)
    return rep


def _kernels(report):
    return {k["name"]: k for k in report["kernels"] if k["backend"] == "triton"}


MATMUL = ["text_fwd", "text_bwd", "ce_fwd", "ce_grad", "ce_du", "ce_dx"]
ALL = MATMUL + ["distill_finish", "ce_merge", "losses", "ce_dx_finish"]


def test_report_schema(report):
    saved = report
    for key in ("kernels", "head_fwd_bwd_us", "eager_fwd_bwd_us", "floor_us"):
        assert key in saved
    assert set(_kernels(report)) == set(ALL)
    for k in saved["kernels"]:
        assert {"name", "backend", "grid", "mma", "regs", "spill_bytes", "smem_bytes", "flops", "bytes",
                "modelled_us"} <= set(k)
        assert k["modelled_us"] > 0
    for k in _kernels(report).values():
        assert os.path.getsize(os.path.join(report["dir"], k["ptx"])) > 0


@pytest.mark.parametrize("name", MATMUL)
def test_matmul_kernels_use_wgmma(report, name):
    assert _kernels(report)[name]["mma"] == "wgmma"


@pytest.mark.parametrize("name", ALL)
def test_no_spills(report, name):
    assert _kernels(report)[name]["spill_bytes"] == 0


@pytest.mark.parametrize("name", ALL)
def test_grid_covers_a_wave(report, name):
    k = _kernels(report)[name]
    if k.get("merge"):
        assert k["modelled_us"] < 0.1, f"{name} is not small enough to be exempt"
        return
    assert k["grid"] >= compiled.SMS


def test_shared_memory_fits(report):
    for k in _kernels(report).values():
        assert k["smem_bytes"] <= compiled.SMEM_LIMIT, k["name"]


def test_modelled_goal(report):
    """The goal of issue 15, modelled: the head within 2x of its floor, >= 10x the eager step."""
    assert report["head_fwd_bwd_us"] <= 2 * report["floor_us"]
    assert report["eager_fwd_bwd_us"] >= 10 * report["head_fwd_bwd_us"]


def test_modelled_goal_of_the_cuda_backend(report):
    """The goal of issue 16, modelled: the CUDA head (csrc/, read back from the built
    extension's SASS by benchmarks/compiled_cuda.py) within 2x of the same floor, and every
    launch of it with a time. Runs wherever the extension is built (CI builds it)."""
    if "cuda" in report["skipped"]:
        pytest.skip(f"cuda kernels not in the report: {report['skipped']['cuda']}")
    cuda = [k for k in report["kernels"] if k["backend"] == "cuda"]
    assert cuda and all(k["modelled_us"] > 0 for k in cuda)
    assert report["head_fwd_bwd_us_by_backend"]["cuda"] == pytest.approx(sum(k["modelled_us"] for k in cuda))
    assert report["head_fwd_bwd_us_by_backend"]["cuda"] <= 2 * report["floor_us"]


@pytest.mark.parametrize("name", MATMUL)
def test_tensor_core_products_accumulate_in_float32(report, name):
    """Float32 accumulation, read from the compiled code: every warpgroup MMA of a Triton
    kernel has a .f32 accumulator (wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16).
    The half-precision interpreter tests allow the operands' rounding (tests/numerics.py,
    ``operands``) but cannot show this; a kernel accumulating in f16 fails here."""
    k = _kernels(report)[name]
    with open(os.path.join(report["dir"], k["ptx"])) as f:
        mma = [line.strip() for line in f if "wgmma.mma_async" in line]
    assert mma, f"{name}: no wgmma in its PTX"
    bad = [line for line in mma if not re.search(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.f32\.", line)]
    assert not bad, f"{name}: wgmma without an f32 accumulator: {bad[:3]}"
