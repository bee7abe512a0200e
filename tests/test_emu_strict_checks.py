"""The adversarial CUDA emulation's strict checks fire (tests/cuda_emu/include/emu_adversary.h).

The planted violations live in tests/cuda_emu/include/emu_plants.cpp, a kernel of one block
of 256 threads compiled into every emulation build (the one the kernels' tests use: no build
of its own), each switched on at run time by ``DEMUL_PLANT=<name>``:

* ``exit_then_barrier``: threads 16..255 return, threads 0..15 (half of warp 0) reach a
  ``__syncthreads``;
* ``exit_then_warp_barrier``: lanes 16..31 of every warp return, lanes 0..15 reach a ``__syncwarp``;
* ``wmma_partial_exit``: lanes 16..31 return, lanes 0..15 call ``wmma::load_matrix_sync``;
* ``wmma_divergent``: lanes 0..15 call ``wmma::load_matrix_sync``, lanes 16..31 wait at a
  ``__syncthreads`` (the whole warp does not reach the WMMA call);
* ``wmma_misaligned``: every lane loads a WMMA fragment from a pointer 2 bytes off a
  32-byte boundary;
* ``wmma_bad_ldm``: every lane loads with ldm = 20 halves (40 bytes, not a multiple of 16);
* ``static_smem``: a static ``__shared__`` array of 50,000 bytes (over 48 KB).

Each runs the plant kernel once in a subprocess (an abort of the emulation ends only it) and
must abort with the check's message; the kernel without ``DEMUL_PLANT`` must run clean and
write every output (so the abort comes from the plant), and the strict-only checks must stay
silent under ``DEMUL_EMU_STRICT=0`` (so it is the strict check that fires).
"""

import os
import subprocess
import sys

import pytest

from cuda_emu import build as emu_build

REASON = emu_build.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CUDA emulation unavailable: {REASON}")

TESTS = os.path.dirname(os.path.abspath(__file__))

# plant -> (the emulation's message, whether the check is one of DEMUL_EMU_STRICT's)
EXPECTED = {
    "exit_then_barrier": ("__syncthreads after some threads of the block exited", True),
    "exit_then_warp_barrier": ("a warp barrier / shuffle / WMMA call after some lanes of the warp exited", True),
    "wmma_partial_exit": ("a warp barrier / shuffle / WMMA call after some lanes of the warp exited", True),
    # a WMMA call is a warp barrier: a warp split between it and __syncthreads cannot release
    # either; that deadlock is reported whatever DEMUL_EMU_STRICT says
    "wmma_divergent": ("a warp waits at __syncwarp/shuffle while some of its lanes wait at __syncthreads", False),
    "wmma_misaligned": ("a WMMA pointer is not 32-byte aligned", True),
    "wmma_bad_ldm": ("a WMMA ldm is not a multiple of 16 bytes", True),
    "static_smem": ("static shared memory of one kernel exceeds 48 KB", True),
}


# The strict-only checks switched off by DEMUL_EMU_STRICT=0 (the message must go): run for one
# plant per kind of check (a barrier, an alignment) rather than all six, for CI time (a
# subprocess that loads the emulation each, ~5 s).
RELAXED_CONTROLS = {"exit_then_barrier", "wmma_misaligned"}


def child() -> None:
    """Loads the emulation build (built once per source hash) and runs the plant kernel once."""
    import ctypes

    import torch

    torch.set_num_threads(1)
    lib = ctypes.CDLL(emu_build.build().__file__)  # the loaded module's library: the same state
    lib.emu_plant_run.argtypes = [ctypes.c_void_p]
    out = torch.zeros(256)
    lib.emu_plant_run(out.data_ptr())
    print("WRITTEN" if bool((out == 1).all()) else "UNWRITTEN", flush=True)


def _run(plant=None, strict=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS), TESTS]),
               DEMUL_EMU_STRICT="1" if strict else "0")
    env.pop("DEMUL_PLANT", None)
    if plant is not None:
        env["DEMUL_PLANT"] = plant
    return subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], capture_output=True, text=True,
                          env=env, timeout=1800)


@pytest.fixture(scope="module")
def planted_variant():
    """Builds (or loads) the emulation and checks that, with no plant switched on, the plant
    kernel runs clean and every thread writes its output."""
    proc = _run()
    assert proc.returncode == 0 and "WRITTEN" in proc.stdout.split(), (
        f"the plant kernel without DEMUL_PLANT does not run clean: rc {proc.returncode}\n{proc.stdout}{proc.stderr[-3000:]}")
    return True


@pytest.mark.parametrize("plant", list(EXPECTED))
def test_the_strict_check_fires(planted_variant, plant):
    message, strict_only = EXPECTED[plant]
    proc = _run(plant)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("emu:")]
    assert proc.returncode != 0, f"{plant}: the emulation did not abort (stdout {proc.stdout!r})"
    assert lines and message in lines[-1], f"{plant}: expected {message!r}, got {lines or proc.stderr[-2000:]}"
    if strict_only and plant in RELAXED_CONTROLS:
        relaxed = _run(plant, strict=False)
        assert message not in relaxed.stderr, f"{plant}: the message appears with DEMUL_EMU_STRICT=0"


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    child()
