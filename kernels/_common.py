"""Helpers shared by the Triton launchers: block-size heuristics, output allocation.

Block sizes come from a heuristic of the shapes (no ``triton.autotune``: it would need a
timing stand-in under the interpreter, and this project has not measured configs yet).
Every tile keeps the whole feature dimension D in one block, so a kernel that owns a row
holds all of it; D is limited to ``MAX_D`` so that the ``tl.dot`` operands fit in shared
memory (fp32: a 16 x 1024 tile is 64 KiB).
"""

from __future__ import annotations

import os

import torch
import triton

from demul_fast.common import interpreting

MAX_D = 1024
# Tests set this to True: every output buffer is then filled with NaN before the kernel
# runs, so an element a kernel forgot to write fails the comparison with the reference.
POISON_OUTPUTS = os.environ.get("DEMUL_FAST_POISON_OUTPUTS", "0") == "1"


def new_output(shape, dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled buffer when POISON_OUTPUTS is set."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


FP32_TINY = 1.1754943508222875e-38  # smallest normal float32


def fp32_scalar(x: float) -> float:
    """A Python float kernel argument that Triton types as fp32.

    Triton types a Python float it cannot hold in fp32 (below the smallest normal, e.g.
    label_smoothing=1e-42 or 1e-300) as fp64, and fp64 mixed with fp32 fails to compile.
    Such a value is flushed to 0: in a float32 computation its contribution is far below
    rounding anyway.
    """
    x = float(x)
    return 0.0 if abs(x) < FP32_TINY else x


def emulate_dot(dtype: torch.dtype) -> bool:
    """Under the interpreter, whose half-precision tl.dot is wrong, the kernels round each
    dot operand to the input dtype and multiply in fp32: the products the GPU's tensor cores
    would form, so the bf16/fp16 numerics are tested in CI too."""
    return interpreting()


def block_d(d: int) -> int:
    if d > MAX_D:
        raise ValueError(f"the triton backend supports feature dimension D <= {MAX_D}, got D={d}; "
                         "use backend='torch' or 'cuda'")
    return max(16, triton.next_power_of_2(d))


def tile_rows(bd: int) -> int:
    """Rows of a [rows, BLOCK_D] dot operand: about 8K elements, at least 16 (tl.dot)."""
    return max(16, min(64, 8192 // bd))


def num_warps(elements: int) -> int:
    return 4 if elements <= 4096 else 8


# Shared memory of the compiled kernels (triton 3.8, sm_90, measured with triton.compile
# without a GPU). Text kernels, per tile of BLOCK_R rows x BLOCK_D: fp32 16 x 512: 101,376 B,
# 64 x 512: 208,896 B, 16 x 1024: 199,680 B, 32 x 1024: 268,288 B; bf16 32 x 1024: 106,496 B,
# 64 x 512: 131,072 B; roughly BLOCK_D x (128 + 4.4 BLOCK_R) B in fp32 and
# BLOCK_D x (64 + 4 BLOCK_R) B in half. CE kernels (the dU kernel is the largest), per
# [rows, BLOCK_D] tile: fp32 16 x 512: 134,528 B, 64 x 128: 181,760 B, 16 x 1024: 265,600 B,
# about 16.2 rows BLOCK_D + 12 rows^2 B; half about 10 rows BLOCK_D + 4 rows^2 B.
# Hopper allows 232,448 B per block. Configurations estimated to exceed the
# device's limit are refused up front with a clear error instead of failing at launch.
_SMEM_LIMIT = {}


def _smem_limit(device) -> int:
    index = torch.device(device).index or 0
    if index not in _SMEM_LIMIT:
        props = torch.cuda.get_device_properties(index)
        _SMEM_LIMIT[index] = getattr(props, "shared_memory_per_block_optin", 232448)
    return _SMEM_LIMIT[index]


def check_fits(kind: str, dtype: torch.dtype, block_rows: int, bd: int, device) -> None:
    if interpreting() or torch.device(device).type != "cuda":
        return
    limit = _smem_limit(device)
    if kind == "text":
        need = bd * (128 + 4.5 * block_rows) if dtype == torch.float32 else bd * (64 + 4 * block_rows)
        if need > limit:
            raise ValueError(
                f"the triton backend's text kernels hold a class's M prompts x D in one tile: {block_rows} "
                f"rows x D={bd} (padded) in {dtype} needs about {int(need)} B of shared memory, more than "
                f"this GPU's {limit} B; use fewer prompts, half precision, backend='cuda' or backend='torch'")
    else:
        need = (16.2 * block_rows * bd + 12 * block_rows ** 2 if dtype == torch.float32
                else 10 * block_rows * bd + 4 * block_rows ** 2)
        if need > limit:
            raise ValueError(
                f"the triton backend's cross-entropy kernels at D={bd} (padded) in {dtype} need about "
                f"{int(need)} B of shared memory, more than this GPU's {limit} B; use bfloat16/float16 "
                "features, backend='cuda' or backend='torch'")
