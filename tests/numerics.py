"""The package's error rule, shared by the tests of every fast path.

A fast path's error against a float64 reference may be at most ``k`` times the error of
the plain PyTorch path (demul_fast.reference) run in the same dtype, plus a floor of a
few units of rounding of that dtype at the reference's magnitude (so that a lucky,
exactly-rounded plain result does not make the bound zero). k = 2 for outputs, 3 for
gradients, as in flash-attention's tests.
"""

from __future__ import annotations

import torch


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().double() - ref.detach().double()).abs().max())


def assert_error_rule(name: str, fast: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor,
                      k: float = 2.0, dtype: torch.dtype = None) -> None:
    """|fast - ref64|_max <= k * |plain - ref64|_max + floor, with stats printed first."""
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values in the fast result"
    dtype = dtype or plain.dtype
    eps = torch.finfo(dtype).eps
    scale = float(ref64.detach().abs().max()) + 1e-30
    fast_err = max_err(fast, ref64)
    plain_err = max_err(plain, ref64)
    floor = 4 * eps * scale
    bound = k * plain_err + floor
    print(f"{name}: fast err {fast_err:.3e}, plain {dtype} err {plain_err:.3e}, bound {bound:.3e}, "
          f"max |ref| {scale:.3e}")
    assert fast_err <= bound, (f"{name}: error {fast_err:.3e} exceeds {k} x plain error {plain_err:.3e} "
                               f"+ floor {floor:.3e}")
