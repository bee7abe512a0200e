"""What one head step really moves: a trace of every Triton launch and of the torch ops
around them, the counts the compiled-code model (benchmarks/compiled_model.py) turns into
time. Needs no GPU: the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
the command line below before triton is imported), on CPU tensors at the preset's sizes.

For each launch (kernel name, grid) the tracer wraps the interpreter's memory operations
and its dot:

* ``l2_bytes``: per program, every ``tl.load``/``tl.store`` counted in the 32-byte sectors
  it touches (a sector read twice is moved twice: tile re-reads, sweeps, every program
  reading the same basis), summed over the programs; what travels between L2 and the SMs;
* ``hbm_bytes``: the distinct sectors the whole launch reads, plus those it writes: what a
  launch whose working set stays in L2 moves to or from device memory;
* ``rounds``: per program, the dependent load rounds a loop without a dot runs (a round
  ends when a load site repeats; a round whose loads feed a ``tl.dot`` is pipelined and
  not counted; the first round of a pipelined loop is counted once, the pipeline's fill);
  the largest over the programs;
* ``dots``: how many ``tl.dot`` a program issues (the largest).

Around the launches a TorchDispatchMode records the torch ops a step runs on the host
side of the kernels (casts, copies, fills, reductions, autograd's zero-filled gradients),
with the bytes of their tensor inputs and outputs.

    TRITON_INTERPRET=1 python -m benchmarks.compiled_trace --preset imagenet --mode frozen --out trace.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np

SECTOR = 32  # bytes: the unit in which L2 and device memory move data

_KERNEL_DIR = os.sep + os.path.join("demul_fast", "kernels") + os.sep


class _Program:
    __slots__ = ("l2", "rounds", "pipelined", "current", "dots", "flops")

    def __init__(self):
        self.l2 = 0
        self.flops = 0
        self.rounds = 0      # closed rounds not followed by a dot
        self.pipelined = 0   # rounds closed by a dot
        self.current = set()  # load sites of the open round
        self.dots = 0

    def load_site(self, site):
        if site in self.current:
            self.rounds += 1
            self.current = set()
        self.current.add(site)

    def dot(self, flops: int):
        self.flops += flops
        if self.current:
            self.pipelined += 1
        self.current = set()
        self.dots += 1

    def finish(self) -> int:
        """The program's unpipelined rounds (+1 for a pipelined loop's fill)."""
        return self.rounds + (1 if self.current else 0) + (1 if self.pipelined else 0)


class _Launch:
    def __init__(self, name: str, grid, weights: Dict[tuple, float], tensors: List[tuple]):
        self.name, self.grid = name, tuple(grid)
        self.weights = weights          # sampled program -> how many programs it stands for
        self.tensors = []  # (first byte, end byte) of the tensor arguments, overlaps merged (a tensor passed twice)
        for lo, hi in sorted(tensors):
            if self.tensors and lo < self.tensors[-1][1]:
                self.tensors[-1] = (self.tensors[-1][0], max(hi, self.tensors[-1][1]))
            else:
                self.tensors.append((lo, hi))
        self.programs: Dict[tuple, _Program] = {}
        self.read: List[np.ndarray] = []
        self.written: List[np.ndarray] = []

    def program(self, idx) -> _Program:
        p = self.programs.get(idx)
        if p is None:
            p = self.programs[idx] = _Program()
        return p

    def distinct(self, parts) -> int:
        """Distinct bytes (sectors) of ``parts``, extrapolated per tensor from the sampled programs to the
        grid: each tensor's sampled sectors times programs / sampled programs, at most the tensor."""
        if not parts:
            return 0
        sectors = np.unique(np.concatenate(parts))
        scale = float(np.prod(self.grid)) / max(1, len(self.weights))
        total, seen = 0.0, 0
        for lo, hi in self.tensors:
            n = int(np.count_nonzero((sectors >= lo // SECTOR) & (sectors <= (hi - 1) // SECTOR)))
            seen += n
            total += min(n * scale, -(-(hi - lo) // SECTOR))
        total += (sectors.size - seen) * scale  # addresses outside the arguments (none expected)
        return int(round(total)) * SECTOR

    def summary(self) -> dict:
        progs = self.programs
        return dict(name=self.name, grid=list(self.grid), programs=int(np.prod(self.grid)),
                    sampled_programs=len(self.weights),
                    l2_bytes=int(round(sum(self.weights[k] * p.l2 for k, p in progs.items()))),
                    flops=int(round(sum(self.weights[k] * p.flops for k, p in progs.items()))),
                    hbm_read_bytes=self.distinct(self.read), hbm_write_bytes=self.distinct(self.written),
                    rounds=max((p.finish() for p in progs.values()), default=0),
                    dots=max((p.dots for p in progs.values()), default=0))


def sample_grid(grid, per_axis: int) -> Dict[tuple, float]:
    """The programs to run and how many programs each stands for: per axis the first two,
    the last two and evenly spaced ones between (all of an axis of at most ``per_axis``)."""
    axes = []
    for n in grid:
        if per_axis <= 0 or n <= per_axis:
            axes.append({i: 1.0 for i in range(n)})
            continue
        inner = per_axis - 4
        picks = {0: 1.0, 1: 1.0, n - 2: 1.0, n - 1: 1.0}
        mids = sorted({2 + (k * (n - 4)) // max(1, inner) for k in range(inner)} - set(picks))
        for m in mids:
            picks[m] = (n - 4) / len(mids)
        axes.append(picks)
    return {(x, y, z): wx * wy * wz for x, wx in axes[0].items() for y, wy in axes[1].items()
            for z, wz in axes[2].items()}


def _sectors(ptrs: np.ndarray, mask: np.ndarray, itemsize: int) -> np.ndarray:
    addr = np.asarray(ptrs, dtype=np.uint64)[np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(ptrs))]
    if addr.size == 0:
        return addr
    first = addr // SECTOR
    last = (addr + np.uint64(itemsize - 1)) // SECTOR
    return np.unique(np.concatenate([first, last]))


def _site() -> tuple:
    """The kernel-source lines of the call stack (the load's site, helpers included)."""
    f, lines = sys._getframe(2), []
    while f is not None:
        if _KERNEL_DIR in f.f_code.co_filename:
            lines.append(f.f_lineno)
        f = f.f_back
    return tuple(lines)


class Tracer:
    """Context manager: records every Triton launch (interpreter) and the torch ops around them."""

    def __init__(self, host_ops: bool = True, sample: int = 5):
        self.launches: List[_Launch] = []
        self.host: List[dict] = []
        self._active: Optional[_Launch] = None
        self._host_ops = host_ops
        self.sample = sample  # programs run per grid axis (0: all)

    # ------------------------------------------------------------------ interpreter hooks
    def __enter__(self):
        from triton.runtime import interpreter as it

        self._it = it
        tracer = self
        real = it._interpreter
        self._real_interp = real

        class _Proxy:
            def __getattr__(self, name):
                return getattr(real, name)

            @staticmethod
            def load(ptrs, mask, other, dtype):
                tracer._memory(ptrs, mask, np.dtype(dtype).itemsize, write=False)
                return real.load(ptrs, mask, other, dtype)

            @staticmethod
            def store(ptrs, value, mask):
                tracer._memory(ptrs, mask, np.asarray(value).dtype.itemsize, write=True)
                return real.store(ptrs, value, mask)

        it._interpreter = _Proxy()
        self._dot = it.InterpreterBuilder.create_dot

        def create_dot(builder, *args, **kwargs):
            if tracer._active is not None:
                a, b = args[0].data, args[1].data
                flops = 2 * int(np.prod(a.shape)) * int(b.shape[-1])
                tracer._active.program(tuple(builder.grid_idx)).dot(flops)
            return tracer._dot(builder, *args, **kwargs)

        it.InterpreterBuilder.create_dot = create_dot
        self._call = it.GridExecutor.__call__

        def call(executor, *args_dev, **kwargs):
            return tracer._run_sampled(executor, args_dev, kwargs)

        it.GridExecutor.__call__ = call
        if self._host_ops:
            self._mode = _HostOps(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self._host_ops:
            self._mode.__exit__(*exc)
        self._it._interpreter = self._real_interp
        self._it.InterpreterBuilder.create_dot = self._dot
        self._it.GridExecutor.__call__ = self._call
        return False

    def _memory(self, ptrs, mask, itemsize: int, write: bool):
        launch = self._active
        if launch is None:
            return
        sectors = _sectors(ptrs, mask, itemsize)
        prog = launch.program(tuple(self._it.interpreter_builder.grid_idx))
        prog.l2 += int(sectors.size) * SECTOR
        if write:
            launch.written.append(sectors)
        else:
            launch.read.append(sectors)
            prog.load_site(_site())

    def _run_sampled(self, executor, args_dev, kwargs):
        """GridExecutor.__call__ of the interpreter, running only ``sample_grid``'s programs."""
        import inspect

        import torch

        it = self._it
        argspec = inspect.getfullargspec(executor.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in argspec.args}
        args_hst, kwargs_hst = executor._init_args_hst(args_dev, kwargs)
        for hook in executor.pre_run_hooks:
            hook(*args_hst, **kwargs_hst)
        tensors = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for t in list(args_hst) + list(kwargs_hst.values()) if isinstance(t, torch.Tensor) and t.numel()]
        patch_scope = it._patch_lang(executor.fn)
        try:
            args = inspect.getcallargs(executor.fn, *args_hst, **kwargs_hst)
            args = {n: a if n in executor.constexprs else it._implicit_cvt(a) for n, a in args.items()}
            grid = executor.grid(args) if callable(executor.grid) else executor.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            weights = sample_grid(grid, self.sample)
            launch = _Launch(executor.fn.__name__, [g for g in grid if g > 1] or [1], weights, tensors)
            self._active = launch
            it.interpreter_builder.set_grid_dim(*grid)
            ticket = args.get("TICKET")  # a ticket counting the programs done (cosine_ce._fwd_finish_kernel):
            if isinstance(ticket, torch.Tensor) and ticket.dtype == torch.int32:  # the programs not run count as done
                ticket += grid[0] * grid[1] * grid[2] - len(weights)
            for idx in sorted(weights):  # in grid order: the last program takes the last ticket, as on a GPU at the end
                it.interpreter_builder.set_grid_idx(*idx)
                executor.fn(**args)
        finally:
            patch_scope.restore()
        self.launches.append(launch)
        try:
            executor._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)
        finally:
            self._active = None

    def summary(self) -> dict:
        return dict(launches=[x.summary() for x in self.launches], host_ops=self.host)


def _nbytes(x) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return 0


# torch ops that move no data (views, metadata) or only allocate
FREE_OPS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
            "select", "slice", "as_strided", "alias", "detach", "empty", "empty_like", "empty_strided",
            "new_empty", "new_empty_strided", "_to_copy_noop", "lift_fresh", "split", "unbind", "numel", "size",
            "stride", "sym_size", "sym_stride", "is_same_size", "_local_scalar_dense", "diagonal", "narrow",
            "split_with_sizes", "_reshape_alias", "view_as", "expand_as", "squeeze_", "unsqueeze_", "set_",
            "resize_", "result_type", "broadcast_tensors", "contiguous"}


def _op_name(func) -> str:
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


def _host_record(func, args, kwargs, out) -> Optional[dict]:
    """(op, bytes read, bytes written, FLOPs) of one dispatched torch op, None if it moves nothing."""
    import torch
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import flop_registry

    name = _op_name(func)
    if name in FREE_OPS or name.startswith("_foreach") or "demul_fast" in str(func):
        return None
    if name in ("copy_", "_to_copy", "clone", "to") and isinstance(out, torch.Tensor) and len(args) and \
            isinstance(args[0], torch.Tensor) and name != "copy_" and args[0].dtype == out.dtype \
            and args[0].data_ptr() == out.data_ptr():
        return None
    ins = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    outs = [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]
    read = sum(_nbytes(x) for x in ins if x.numel() > 1 or x.dim() > 0)
    if name in ("zeros", "zeros_like", "full", "full_like", "fill_", "zero_", "new_zeros", "new_full", "ones",
                "ones_like", "scalar_tensor", "new_ones"):
        read = 0
    written = sum(_nbytes(x) for x in outs)
    if name in ("copy_",):
        read, written = _nbytes(args[1]), _nbytes(args[0])
    flops = 0
    packet = getattr(func, "overloadpacket", None)
    if packet in flop_registry:
        try:
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
        except Exception:  # noqa: BLE001 - a counting formula that does not take these arguments
            flops = 0
    return dict(op=name, read_bytes=int(read), write_bytes=int(written), flops=flops,
                shapes=[list(x.shape) for x in ins][:3], dtypes=sorted({str(x.dtype) for x in ins + outs}))


def _make_host_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostOps(TorchDispatchMode):
        def __init__(self, tracer):
            super().__init__()
            self.tracer = tracer

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "demul_fast" in str(func) and self.tracer._active is None:
                import torch
                with self:  # see the torch ops inside the custom op's implementation too
                    return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
            out = func(*args, **kwargs)
            if self.tracer._active is None:
                rec = _host_record(func, args, kwargs, out)
                if rec is not None:
                    self.tracer.host.append(rec)
            return out

    return HostOps


def _HostOps(tracer):
    return _make_host_mode()(tracer)


# ---------------------------------------------------------------------- the head step

def head_inputs(sizes: Dict[str, int], dtype, train_x: bool, seed: int = 0):
    """The benchmark's inputs at ``sizes`` (CPU): T, A, X, y, scale and the frozen basis."""
    import torch

    from demul_fast.ops.distill_basis import build_distill_basis

    g = torch.Generator().manual_seed(seed)
    C, M, D, B, K = (sizes[k] for k in ("C", "M", "D", "B", "K"))
    T = torch.randn(C, M, D, generator=g).to(dtype).requires_grad_(True)
    A = (torch.randn(C, M, generator=g) * 0.5).to(dtype).requires_grad_(True)
    X = torch.randn(B, D, generator=g).to(dtype).requires_grad_(train_x)
    y = torch.randint(0, C, (B,), generator=g)
    W = (torch.randn(K, D, generator=g) / D ** 0.5)
    b = torch.randn(K, generator=g) * 0.01
    E = torch.randn(C, K, generator=g)
    basis = build_distill_basis(W, b, E)
    return T, A, X, y, torch.tensor(14.0), basis


def trace_head(preset: str, mode: str, dtype_name: str = "bfloat16") -> dict:
    """Trace one triton demul_head forward + backward at ``preset`` (benchmarks/run.py) with
    X frozen (mode "frozen") or trained ("trained")."""
    import torch

    from benchmarks.run import PRESETS
    from demul_fast.ops import triton_ops

    dtype = getattr(torch, dtype_name)
    sizes = PRESETS[preset]
    T, A, X, y, scale, basis = head_inputs(sizes, dtype, mode == "trained")
    # steady state: the basis's triangular turn and its cast to the compute dtype are made once
    # per basis, not per step, and the zero read for a loss gradient autograd leaves out once per device
    if hasattr(triton_ops, "_kernel_basis"):
        triton_ops._kernel_basis(T, basis.R, basis.c, basis.F)
    elif hasattr(triton_ops, "_basis_r"):
        triton_ops._basis_r(basis.R, dtype)
    if hasattr(triton_ops, "_zero"):
        triton_ops._zero(T.device)
    start = time.time()
    np.seterr(all="ignore")  # the programs not run leave their outputs unset: values here mean nothing
    with Tracer() as tr:
        out = triton_ops.demul_head(T, A, X, y, scale, basis)
        out.loss.backward()
    rep = tr.summary()
    rep.update(preset=preset, mode=mode, dtype=dtype_name, backend="triton",
               sizes={k: sizes[k] for k in ("C", "M", "D", "B", "K")}, traced_s=round(time.time() - start, 1))
    return rep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="imagenet")
    p.add_argument("--mode", choices=("frozen", "trained"), default="frozen")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the kernels are traced in Triton's interpreter)")
    rep = trace_head(args.preset, args.mode, args.dtype)
    with open(args.out, "w") as f:
        json.dump(rep, f, indent=1)
    for x in rep["launches"]:
        print(f"{x['name']:<26} grid {str(x['grid']):<14} ({x['sampled_programs']} run) L2 {x['l2_bytes'] / 1e6:8.2f} MB  HBM "
              f"{(x['hbm_read_bytes'] + x['hbm_write_bytes']) / 1e6:7.2f} MB  rounds {x['rounds']:4d}")
    for h in rep["host_ops"]:
        print(f"host {h['op']:<20} {h['read_bytes'] / 1e6:7.2f} MB in {h['write_bytes'] / 1e6:7.2f} MB out")
    print(f"traced in {rep['traced_s']} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
