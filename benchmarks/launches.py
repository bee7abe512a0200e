"""Kernel launches per training step, counted (not timed), eager and compiled (docs/step.md).

Eager (``count_eager``): a ``TorchDispatchMode`` sees every aten op the step dispatches
below autograd. A launch is a dispatched op that is not a view (``OpOverload.is_view``:
no kernel, a new tensor header) and not a bare allocation (``empty``, ``empty_strided``,
``empty_like``: memory, no kernel); a custom op (namespace other than aten/prims, e.g.
``demul_fast::triton_demul_head``) counts as one launch per call (its own kernels run
inside it). Ops that read the device on the host (``_local_scalar_dense``: ``.item()``,
``bool(t)``; ``nonzero``) are counted apart as ``syncs``.

Compiled (``count_compiled``): inductor's generated wrapper code for every graph a call
compiles (forward, its AOTAutograd backward, the optimizer update), read from its
``call`` function: one launch per generated kernel call (``cpp_fused_*`` on a CPU,
``triton_*.run`` on a GPU), per ``extern_kernels.*`` call (matrix products and the like)
and per op the wrapper calls through ``torch.ops`` (fallbacks and custom ops).
Allocations, ``reinterpret_tensor`` views, size asserts and ``del`` are not launches.
A CUDA-graph replay runs the same kernels from one host call (``reduce-overhead``).
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
SYNCS = {"_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero"}


class LaunchCounter(TorchDispatchMode):
    """Counts the ops dispatched while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.launches = self.views = self.allocations = self.custom = self.syncs = self.dispatched = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.dispatched += 1
        name = func.overloadpacket.__name__
        ns = func.namespace
        if ns not in ("aten", "prims", "prim"):
            self.custom += 1
            self.launches += 1
            self.ops[f"{ns}::{name}"] += 1
        elif func.is_view:
            self.views += 1
        elif name in ALLOCATIONS:
            self.allocations += 1
        else:
            if name in SYNCS:
                self.syncs += 1
            self.launches += 1
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> Dict[str, object]:
        return dict(launches=self.launches, dispatched=self.dispatched, views=self.views,
                    allocations=self.allocations, custom_ops=self.custom, syncs=self.syncs)


def count_eager(fn: Callable[[], object]) -> Dict[str, object]:
    """Run ``fn`` once under ``LaunchCounter``: {launches, dispatched, views, allocations,
    custom_ops, syncs} (see the module docstring)."""
    counter = LaunchCounter()
    with counter:
        fn()
    return counter.summary()


_KERNEL = re.compile(r"^\s*(?:\w+\s*=\s*)?(cpp_fused_\w+|triton_\w+|kernel_cpp_\w+)(?:\.run)?\(")
_EXTERN = re.compile(r"\bextern_kernels\.(\w+)\(")
_TORCH_OPS = re.compile(r"\btorch\.ops\.(\w+)\.(\w+)(?:\.\w+)?\(")
_NOT_LAUNCHES = {"empty_strided_cpu", "empty_strided_cuda", "reinterpret_tensor", "assert_size_stride",
                 "assert_alignment"}


def _call_body(code: str) -> List[str]:
    """The lines of the wrapper's ``call`` function (what runs per call)."""
    lines = code.splitlines()
    body, inside, indent = [], False, 0
    for line in lines:
        stripped = line.lstrip()
        if not inside:
            if re.match(r"def call\(", stripped):
                inside, indent = True, len(line) - len(stripped)
            continue
        if stripped and (len(line) - len(stripped)) <= indent and not stripped.startswith(("#", ")")):
            break
        body.append(line)
    return body


def count_code(code: str) -> Dict[str, int]:
    """Launches in one generated module's ``call``: {kernels, extern, ops, launches}."""
    kernels = extern = ops = 0
    custom = 0
    for line in _call_body(code):
        if _KERNEL.match(line):
            kernels += 1
            continue
        m = _EXTERN.search(line)
        if m:
            extern += 1
            continue
        m = _TORCH_OPS.search(line)
        if m and m.group(2) not in _NOT_LAUNCHES:
            ops += 1
            custom += m.group(1) not in ("aten", "prims")
    return dict(kernels=kernels, extern=extern, ops=ops, custom_ops=custom, launches=kernels + extern + ops)


class _CodeOnly(Exception):
    """Raised by a stubbed kernel: the generated code is all that was wanted."""


def count_compiled(fn: Callable[[], object], run: bool = True,
                   codes: Optional[List[str]] = None) -> Tuple[object, Dict[str, object]]:
    """Count the launches of the code inductor generates for every graph ``fn`` compiles
    (dynamo is reset first, so each graph is compiled inside this call; the caches that
    would skip code generation are off): (result, {launches, kernels, extern, ops,
    custom_ops, graphs}).

    run=False generates the code without building or running it: the backward is lowered
    together with the forward (``force_non_lazy_backward_lowering``), the C++ kernels are
    not compiled (stubs), and the first kernel call ends ``fn`` (result None). On a CPU this
    takes the count from minutes of C++ compilation to the seconds of tracing and lowering.
    codes: a list that receives the generated modules' code (optional).
    """
    from unittest import mock

    from torch._inductor import config
    from torch._inductor.async_compile import AsyncCompile
    from torch._inductor.graph import GraphLowering

    def stub(*_args, **_kwargs):
        def kernel(*_a, **_k):
            raise _CodeOnly()
        return kernel

    patches = [config.patch(fx_graph_cache=False, autotune_local_cache=False),
               torch._functorch.config.patch(enable_autograd_cache=False)]
    if not run:
        patches += [torch._functorch.config.patch(force_non_lazy_backward_lowering=True),
                    mock.patch.object(AsyncCompile, "cpp_pybinding", stub), mock.patch.object(AsyncCompile, "cpp", stub)]
    codes = [] if codes is None else codes
    patches.append(mock.patch.object(GraphLowering, "save_output_code", lambda code: codes.append(code)))
    result = None
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        torch._dynamo.reset()
        try:
            result = fn()
        except _CodeOnly:
            pass
        finally:
            if not run:  # the graphs hold stub kernels: never let a later call reach them
                torch._dynamo.reset()
    total = Counter()
    for code in codes:
        total.update(count_code(code))
    out = {k: int(total.get(k, 0)) for k in ("launches", "kernels", "extern", "ops", "custom_ops")}
    out["graphs"] = len(codes)
    return result, out


__all__ = ["LaunchCounter", "count_code", "count_compiled", "count_eager"]
