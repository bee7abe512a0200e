"""What every Triton launcher shares: output allocation (NaN-poisoned in tests), the dot mode
under the interpreter, fp32 scalar arguments, and the feature-dimension limit ``MAX_D``.

Block sizes come from the shapes (demul_fast/kernels/text_head.text_config, demul_fast/kernels/cosine_ce.ce_config;
no ``triton.autotune``: it would need a timing stand-in under the interpreter, and nothing
has been measured on a GPU yet). Every kernel streams D in chunks, so shared memory does not
grow with D; D is limited to ``MAX_D``, the largest size tested.
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
    """torch.empty, or a NaN-filled buffer when POISON_OUTPUTS is set (integers: a large
    negative value, e.g. a ticket counter its kernel must zero first)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -(2 ** 30), dtype=dtype,
                          device=device)
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
    """The block a kernel holds over D (a power of two, at least 16); the one place the D
    limit is checked (ValueError beyond MAX_D)."""
    if d > MAX_D:
        raise ValueError(f"the triton backend supports feature dimension D <= {MAX_D}, got D={d}; "
                         "use backend='torch' or 'cuda'")
    return max(16, triton.next_power_of_2(d))
