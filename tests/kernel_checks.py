"""Helpers shared by the tests of the CUDA kernels on a GPU (test_cuda_gpu.py) and in the
CPU emulation (test_cuda_emulated.py): one call with its gradients, and the error rule of
tests/numerics.py over all outputs and gradients."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from numerics import assert_error_rule, default_compute_dtype


def run(fn, args, diff, dtype, cotangents, before: Optional[Callable] = None, after: Optional[Callable] = None):
    """fn on copies of args (floating ones cast to dtype, those in diff made leaves) ->
    (outputs, gradients of sum(<output, cotangent>) w.r.t. the diff leaves). ``before`` runs
    before the call (e.g. poisoning the allocator), ``after`` after the gradients."""
    leaves, call = [], []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(dtype).clone()
            if i in diff:
                a.requires_grad_()
                leaves.append(a)
        call.append(a)
    if before is not None:
        before()
    outs = fn(*call)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o.double() * c).sum() for o, c in zip(outs, cotangents) if o is not None)
    grads = torch.autograd.grad(total, leaves)
    if after is not None:
        after()
    return [o.detach() for o in outs if o is not None], [g.detach() for g in grads]


def assert_outputs_and_gradients(name, dtype, fast, exact, plain, grad_names, magnitudes=None):
    """The error rule (k=2 outputs, k=3 gradients) for (outputs, gradients) pairs of the fast
    path, the float64 reference and the yardstick, all on the same rounded inputs. The CUDA
    kernels' tensor-core path rounds its product operands (u^, the basis, the gradient tiles)
    to a half input dtype by design: the explicit operand allowance of tests/numerics.py, as
    for the Triton kernels (without it bfloat16 fails by ~5000x). ``magnitudes``: the terms'
    size behind each output, then each gradient (tests/numerics.py; None: max |reference|)."""
    operands = dtype if dtype in (torch.bfloat16, torch.float16) else None
    (fo, fg), (ro, rg), (po, pg) = fast, exact, plain
    mags = list(magnitudes) if magnitudes is not None else [None] * (len(fo) + len(fg))
    for i, (f, r, p) in enumerate(zip(fo, ro, po)):
        assert_error_rule(f"{name} out{i}", f, r, p, k=2.0, dtype=dtype, operands=operands, magnitude=mags[i])
    for j, (label, f, r, p) in enumerate(zip(grad_names, fg, rg, pg)):
        assert_error_rule(f"{name} {label}", f, r, p, k=3.0, dtype=dtype, operands=operands,
                          magnitude=mags[len(fo) + j])


def check_against_reference(name, fast_fn, ref_fn, args, diff, dtype, cotangents, grad_names, before=None,
                            after=None, magnitudes=None):
    """fast_fn against ref_fn under the error rule: the float64 reference and the yardstick
    (the reference in the compute dtype) on the same rounded inputs. Returns
    (fast, exact, plain, cotangents as autograd handed them), each (outputs, gradients)."""
    fast = run(fast_fn, args, diff, dtype, cotangents, before, after)
    # autograd hands a half-precision output its cotangent rounded to that precision
    cotangents = [c.to(f.dtype).double() for c, f in zip(cotangents, fast[0])]
    rounded = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    exact = run(ref_fn, rounded, diff, torch.float64, cotangents, before, after)
    plain = run(ref_fn, rounded, diff, default_compute_dtype(dtype), cotangents, before, after)
    assert_outputs_and_gradients(name, dtype, fast, exact, plain, grad_names, magnitudes)
    return fast, exact, plain, cotangents
