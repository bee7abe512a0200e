"""Timing, peak memory and the correctness gate of one benchmark row.

Timing. GPU: a CUDA event pair around each call, the median and the 20/80 % quantiles of
the per-call times (as ``triton.testing.do_bench`` reports them), after a warm-up of at
least ``warmup_s`` (and 2 calls). CPU: ``time.perf_counter`` around each call, the same
statistics. Calls cycle through several input sets ("rotation") when the inputs are small
enough for a cache to hold them, so repeated calls do not all hit a warm cache. Untimed
per-call preparation (dropping last call's gradients) runs outside the timed region.

Peak memory. GPU: ``torch.cuda.max_memory_allocated`` during one call minus the memory
allocated before it (so inputs and, for ``bwd`` rows, the saved forward graph are not
counted). CPU: the process's peak resident set during one call (``VmHWM`` of
/proc/self/status, reset through /proc/self/clear_refs just before the call) minus the
resident set before it, after glibc's ``malloc_trim(0)`` has handed freed heap pages back
to the system (so memory that the call reuses from earlier calls is counted when touched).
tracemalloc is not used: it does not see torch's tensor allocations. Pages that stay
resident (the first pages of the malloc arenas, Python objects) are not counted, so tiny
rows read near zero; it is None where /proc is not available.

Gate. ``errors(outputs, gold)``: for each named output the norm-wise relative error
``||out - gold|| / ||gold||`` against a float64 (or float32, for runs too large for
float64) reference on the same inputs; a provider passes when its largest error is at
most ``max(GATE_FACTOR * eager_error, GATE_FLOOR[dtype])`` where ``eager_error`` is the
error of the eager reference in the run's dtype. The floor admits tf32 matrix products in
float32 and the usual low-precision rounding; a wrong answer is orders of magnitude above.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

GATE_FACTOR = 10.0
GATE_FLOOR = {torch.float64: 1e-10, torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclass
class Timing:
    median_s: float
    q20_s: float
    q80_s: float
    reps: int
    first_call_s: float  # the first (warm-up) call: includes compilation for compiled providers


def _quantile(sorted_values, q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_calls(call: Callable[[int], object], prepare: Callable[[int], None], device: torch.device, *,
               warmup_s: float, budget_s: float, min_reps: int = 3, max_reps: int = 200) -> Timing:
    """Time ``call(i)`` for i = 0, 1, ... (``prepare(i)`` untimed before each).

    Warm-up: the first call (timed on its own, reported as ``first_call_s``), then calls
    until ``warmup_s`` has passed (at least one more). Then timed calls until ``budget_s``
    has passed (at least ``min_reps``, at most ``max_reps``).
    """
    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    i = 0
    prepare(i)
    sync()
    t0 = time.perf_counter()
    call(i)
    sync()
    first = time.perf_counter() - t0
    i += 1
    t_start = time.perf_counter()
    while True:
        prepare(i)
        call(i)
        i += 1
        sync()
        if time.perf_counter() - t_start >= warmup_s:
            break
    times = []
    events = []
    t_start = time.perf_counter()
    while len(times) + len(events) < max_reps:
        prepare(i)
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call(i)
            end.record()
            events.append((start, end))
        else:
            t0 = time.perf_counter()
            call(i)
            times.append(time.perf_counter() - t0)
        i += 1
        n = len(times) + len(events)
        if n >= min_reps and time.perf_counter() - t_start >= budget_s:
            if gpu:
                sync()  # the host may have run ahead of the device: check the real elapsed time
                if time.perf_counter() - t_start >= budget_s:
                    break
            else:
                break
    sync()
    times += [s.elapsed_time(e) / 1e3 for s, e in events]
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times), first)


def _rss_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(field + r":\s+(\d+)", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(call: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated during one ``call()`` beyond what was allocated before it
    (see the module docstring for how, per device). The call's result is kept alive until
    the measurement ends, as a training step would keep its forward graph."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return max(peak, 0)
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return None
    base = _rss_kib("VmRSS")
    result = call()
    peak = _rss_kib("VmHWM")
    del result
    if base is None or peak is None:
        return None
    return max(peak - base, 0) * 1024


def rel_error(out: torch.Tensor, gold: torch.Tensor) -> float:
    """||out - gold|| / ||gold|| in float64 (inf for a shape mismatch, NaN never passes)."""
    if out is None or gold is None or tuple(out.shape) != tuple(gold.shape):
        return float("inf")
    o = out.detach().to("cpu", torch.float64)
    g = gold.detach().to("cpu", torch.float64)
    if not torch.isfinite(o).all():
        return float("inf")
    denom = torch.linalg.vector_norm(g).item()
    diff = torch.linalg.vector_norm(o - g).item()
    return diff / denom if denom > 0 else diff


def errors(outputs: Dict[str, torch.Tensor], gold: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Relative error of each gold-named output (missing outputs count as inf)."""
    return {name: rel_error(outputs.get(name), ref) for name, ref in gold.items()}


def gate_tolerance(dtype: torch.dtype, eager_error: float) -> float:
    return max(GATE_FACTOR * eager_error, GATE_FLOOR.get(dtype, 1e-2))
