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

MAX_D = 1024
# Tests set this to True: every output buffer is then filled with NaN before the kernel
# runs, so an element a kernel forgot to write fails the comparison with the reference.
POISON_OUTPUTS = os.environ.get("DEMUL_FAST_POISON_OUTPUTS", "0") == "1"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def new_output(shape, dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled buffer when POISON_OUTPUTS is set."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def lowp_dot(dtype: torch.dtype) -> bool:
    """Feed tl.dot in the input's half precision (fp32 accumulate) on a GPU.

    fp32 inputs use IEEE fp32 dots (no TF32: its error would break the error rule); under
    the interpreter every dot runs in fp32 because its bf16 dot is wrong.
    """
    return dtype in (torch.bfloat16, torch.float16) and not interpreting()


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
