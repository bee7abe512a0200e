"""Run workloads: gate each provider, time it per mode, measure its memory, compare with the
floor; print the table and the per-suite summaries, write JSON lines.

A row is (suite, op, mode, provider) at one size, dtype and device. Its status is one of
``ok`` (gated and timed), ``skipped`` (provider unavailable: the reason is in ``note``),
``wrong`` (disagrees with the reference on the benchmark's inputs: not timed), ``error``
(raised; the exception is in ``note``), ``oom`` (out of memory).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from . import floors, measure
from .workload import Provider, Workload, run_once


@dataclass
class Settings:
    warmup_s: float = 0.1
    budget_s: float = 1.0
    min_reps: int = 3
    max_reps: int = 200
    rotate_bytes: int = 64 << 20  # rotate input sets while one set is smaller than this
    count_only: bool = False  # count launches only: no reference, no gate, no timing (status "counted")


@dataclass
class Row:
    suite: str
    op: str
    mode: str
    provider: str
    status: str
    sizes: Dict[str, object]
    dtype: str
    time_ms: Optional[float] = None
    q20_ms: Optional[float] = None
    q80_ms: Optional[float] = None
    reps: Optional[int] = None
    first_call_s: Optional[float] = None
    speedup_vs_eager: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    mem_vs_eager: Optional[float] = None
    floor_ms: Optional[float] = None
    floor_bound: Optional[str] = None
    frac_of_floor: Optional[float] = None
    gb_per_s: Optional[float] = None
    tflop_per_s: Optional[float] = None
    bytes: Optional[float] = None
    flops: Optional[float] = None
    max_rel_error: Optional[float] = None
    tolerance: Optional[float] = None
    errors: Dict[str, float] = field(default_factory=dict)
    rotation: Optional[int] = None
    launches_per_step: Optional[int] = None  # counted kernel launches of one call (benchmarks/launches.py)
    launches: Dict[str, object] = field(default_factory=dict)  # the count's parts
    note: str = ""


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def _free(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def n_rotations(input_bytes: int, settings: Settings) -> int:
    """Input sets to cycle through: enough that together they exceed ``rotate_bytes``, 1 to 8."""
    if input_bytes >= settings.rotate_bytes:
        return 1
    return max(1, min(8, math.ceil(settings.rotate_bytes / max(input_bytes, 1))))


def _time_mode(wl: Workload, prov: Provider, inputs: list, mode: str, settings: Settings):
    """(Timing, peak memory bytes) of ``prov`` in ``mode`` over the rotated ``inputs``."""
    n = len(inputs)
    params = [wl.params(prov, inp) for inp in inputs]

    def clear(i):
        for p in params[i % n].values():
            p.grad = None

    if mode == "fwd":
        def call(i):
            return prov.fn(inputs[i % n])
    elif mode == "fwd+bwd":
        def call(i):
            res = prov.fn(inputs[i % n])
            r, g = wl.root(res, inputs[i % n])
            r.backward(g)
            return res
    else:
        roots = [wl.root(prov.fn(inp), inp) for inp in inputs]

        def call(i):
            r, g = roots[i % n]
            r.backward(g, retain_graph=True)

    timing = measure.time_calls(call, clear, wl.device, warmup_s=settings.warmup_s, budget_s=settings.budget_s,
                                min_reps=settings.min_reps, max_reps=settings.max_reps)
    clear(0)
    mem = measure.peak_memory(lambda: call(0), wl.device)
    clear(0)
    return timing, mem


def run_workload(wl: Workload, ceilings: floors.Ceilings, settings: Settings, progress=None) -> List[Row]:
    """Gate, time and measure every provider of ``wl`` in each of its modes."""
    base = dict(suite=wl.suite, op=wl.op, sizes=dict(wl.sizes), dtype=str(wl.dtype).replace("torch.", ""))
    rows: List[Row] = []
    if all(p.reason is not None for p in wl.providers):  # nothing to run: no inputs, no reference
        for prov in wl.providers:
            for mode in wl.modes:
                rows.append(Row(mode=mode, provider=prov.name, status="skipped", **base, note=prov.reason))
                if progress:
                    progress.update(1)
        return rows
    n_rot = n_rotations(wl.input_bytes, settings)
    if settings.count_only:
        return _count_workload(wl, base, progress)
    try:
        inputs = [wl.make_inputs(i) for i in range(n_rot)]
        gold = wl.gold(inputs[0])
    except Exception as exc:  # noqa: BLE001 - the whole workload is reported, the run goes on
        status = "oom" if _is_oom(exc) else "error"
        _free(wl.device)
        for prov in wl.providers:
            for mode in wl.modes:
                rows.append(Row(mode=mode, provider=prov.name, status=status, **base,
                                note=f"reference/inputs failed: {_short(exc)}"))
                if progress:
                    progress.update(1)
        return rows

    eager_err = None
    for prov in wl.providers:
        gate_rows = []
        if prov.reason is not None:
            gate_rows = [Row(mode=m, provider=prov.name, status="skipped", **base, note=prov.reason) for m in wl.modes]
        else:
            counted = _count(prov, inputs[0])
            try:
                t0 = time.perf_counter()
                out = run_once(wl, prov, inputs[0])
                if wl.device.type == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter() - t0
                errs = measure.errors(out, gold)
                worst = max(errs.values()) if errs else 0.0
                if prov.name == "eager":
                    eager_err = worst
                tol = measure.gate_tolerance(wl.dtype, eager_err if eager_err is not None else 0.0)
                ok = worst <= tol
                del out
            except Exception as exc:  # noqa: BLE001
                status = "oom" if _is_oom(exc) else "error"
                _free(wl.device)
                gate_rows = [Row(mode=m, provider=prov.name, status=status, **base, note=_short(exc))
                             for m in wl.modes]
            else:
                if not ok:
                    bad = ", ".join(f"{k} {v:.2e}" for k, v in errs.items() if v > tol)
                    gate_rows = [Row(mode=m, provider=prov.name, status="wrong", **base, errors=errs,
                                     max_rel_error=worst, tolerance=tol, first_call_s=first,
                                     note=f"disagrees with the reference: {bad} > {tol:.1e}")
                                 for m in wl.modes]
        if gate_rows:
            rows += gate_rows
            if progress:
                progress.update(len(gate_rows))
            continue
        for mode in wl.modes:
            row = Row(mode=mode, provider=prov.name, status="ok", **base, errors=errs, max_rel_error=worst,
                      tolerance=tol, first_call_s=first, rotation=n_rot, note=prov.note,
                      launches_per_step=counted.get("launches"), launches=counted)
            try:
                timing, mem = _time_mode(wl, prov, inputs, mode, settings)
            except Exception as exc:  # noqa: BLE001
                row.status = "oom" if _is_oom(exc) else "error"
                row.note = _short(exc)
                _free(wl.device)
            else:
                cost = wl.cost(mode)
                fl = floors.floor(cost, ceilings)
                row.time_ms, row.q20_ms, row.q80_ms = timing.median_s * 1e3, timing.q20_s * 1e3, timing.q80_s * 1e3
                row.reps, row.peak_mem_bytes = timing.reps, mem
                row.bytes, row.flops = cost.bytes, cost.flops
                row.floor_ms, row.floor_bound = fl.seconds * 1e3, fl.bound
                row.frac_of_floor = floors.fraction_of_floor(timing.median_s, fl)
                row.gb_per_s = cost.bytes / timing.median_s / 1e9
                row.tflop_per_s = cost.flops / timing.median_s / 1e12
            rows.append(row)
            if progress:
                progress.update(1)
    _ratios(rows)
    del inputs, gold
    _free(wl.device)
    return rows


def _count(prov: Provider, inputs) -> Dict[str, object]:
    """The provider's counted launches ({} without a counter; {"error": ...} if it failed)."""
    if prov.launches is None:
        return {}
    try:
        return dict(prov.launches(inputs))
    except Exception as exc:  # noqa: BLE001 - the count is reported as missing, the row goes on
        return {"error": _short(exc)}


def _count_workload(wl: Workload, base: dict, progress=None) -> List[Row]:
    """``Settings.count_only``: one input set, each provider's launches counted, nothing
    timed or checked (status "counted"; shapes too large to run the gold reference here)."""
    rows = []
    inputs = None
    for prov in wl.providers:
        if prov.reason is not None:
            rows += [Row(mode=m, provider=prov.name, status="skipped", **base, note=prov.reason) for m in wl.modes]
        elif prov.launches is None:
            rows += [Row(mode=m, provider=prov.name, status="skipped", **base, note="no launch counter")
                     for m in wl.modes]
        else:
            if inputs is None:
                inputs = wl.make_inputs(0)
            counted = _count(prov, inputs)
            status = "error" if "error" in counted else "counted"
            rows += [Row(mode=m, provider=prov.name, status=status, **base, launches_per_step=counted.get("launches"),
                         launches=counted, note=counted.get("error", prov.note)) for m in wl.modes]
        if progress:
            progress.update(len(wl.modes))
    _free(wl.device)
    return rows


def _ratios(rows: List[Row]) -> None:
    """Fill speedup and memory ratio against the eager row of the same mode."""
    eager = {r.mode: r for r in rows if r.provider == "eager" and r.status == "ok"}
    for r in rows:
        e = eager.get(r.mode)
        if r.status != "ok" or e is None:
            continue
        r.speedup_vs_eager = e.time_ms / r.time_ms if r.time_ms else None
        if e.peak_mem_bytes and r.peak_mem_bytes is not None:
            r.mem_vs_eager = r.peak_mem_bytes / e.peak_mem_bytes


# -- run metadata, output ------------------------------------------------------------------

def git_revision() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def run_metadata(device: torch.device, preset: str, ceilings: floors.Ceilings, argv: List[str]) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    return {
        "run_id": uuid.uuid4().hex[:12],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": str(device), "device_name": device_name(device),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "git": git_revision(), "preset": preset,
        "ceilings": ceilings.as_dict(), "argv": argv,
        "backends": {k: v["reason"] or "available"
                     for k, v in __import__("demul_fast").backends.report(device).items()},
    }


def write_jsonl(path: str, meta: dict, rows: List[Row]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps({**meta, **asdict(r)}, default=str) + "\n")


def _fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return ""
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _fmt_bytes(b: Optional[int]) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def _fmt_launches(r: Row) -> str:
    return "" if r.launches_per_step is None else str(r.launches_per_step)


def _collapse(rows: List[Row]) -> List[Row]:
    """Non-ok rows that differ only in mode become one row with mode "all"."""
    out: List[Row] = []
    for r in rows:
        prev = out[-1] if out else None
        if (r.status != "ok" and prev is not None and prev.status == r.status and prev.op == r.op
                and prev.provider == r.provider and prev.suite == r.suite and prev.note == r.note
                and prev.sizes == r.sizes):
            if prev.mode != "all":
                out[-1] = Row(**{**asdict(prev), "mode": "all"})
            continue
        out.append(r)
    return out


def format_table(rows: List[Row]) -> str:
    head = ["suite", "op", "C", "mode", "provider", "status", "ms (p20-p80)", "x eager", "MiB", "x mem",
            "floor ms", "% floor", "GB/s", "TFLOP/s", "max err", "launches", "note"]
    body = []
    for r in _collapse(rows):
        if r.status == "ok":
            t = f"{_fmt_ms(r.time_ms)} ({_fmt_ms(r.q20_ms)}-{_fmt_ms(r.q80_ms)})"
            body.append([r.suite, r.op, r.sizes.get("C", ""), r.mode, r.provider, r.status, t,
                         f"{r.speedup_vs_eager:.2f}" if r.speedup_vs_eager else "",
                         _fmt_bytes(r.peak_mem_bytes), f"{r.mem_vs_eager:.2f}" if r.mem_vs_eager else "",
                         f"{_fmt_ms(r.floor_ms)} {r.floor_bound[:3]}", f"{100 * r.frac_of_floor:.1f}",
                         f"{r.gb_per_s:.1f}", f"{r.tflop_per_s:.3f}", f"{r.max_rel_error:.1e}",
                         _fmt_launches(r),
                         f"first call {r.first_call_s:.1f} s (compiles)" if "compile" in r.provider else ""])
        else:
            err = f"{r.max_rel_error:.1e}" if r.max_rel_error is not None else ""
            note = r.note if len(r.note) <= 90 else r.note[:87] + "..."
            body.append([r.suite, r.op, r.sizes.get("C", ""), r.mode, r.provider, r.status,
                         "", "", "", "", "", "", "", "", err, _fmt_launches(r), note])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in body]
    return "\n".join(lines)


def summary(suite: str, rows: List[Row]) -> str:
    """One line: counts by status and, per op, the fastest fwd+bwd provider."""
    mine = [r for r in rows if r.suite == suite]
    counts: Dict[str, int] = {}
    for r in mine:
        counts[r.status] = counts.get(r.status, 0) + 1
    parts = []
    for op in dict.fromkeys(r.op for r in mine):
        ok = [r for r in mine if r.op == op and r.mode == "fwd+bwd" and r.status == "ok"]
        if ok:
            best = min(ok, key=lambda r: r.time_ms)
            sp = f" x{best.speedup_vs_eager:.2f} vs eager" if best.speedup_vs_eager else ""
            parts.append(f"{op}: {best.provider} {_fmt_ms(best.time_ms)} ms{sp}, {100 * best.frac_of_floor:.1f}% of floor")
    status = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    return f"[{suite}] rows: {status}. fastest fwd+bwd: " + ("; ".join(parts) if parts else "none timed")


def run(workloads: List[Workload], ceilings: floors.Ceilings, settings: Settings, quiet: bool = False,
        on_rows=None) -> List[Row]:
    """Run every workload with a tqdm bar over the (provider, mode) cases; ``on_rows(rows)``
    is called after each workload (to save rows as they come, should the run be cut short)."""
    total = sum(len(w.providers) * len(w.modes) for w in workloads)
    bar = None
    if not quiet:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="benchmark cases", file=sys.stderr, leave=False)
    rows: List[Row] = []
    try:
        for wl in workloads:
            if bar:
                bar.set_postfix_str(f"{wl.suite}/{wl.op}")
            new = run_workload(wl, ceilings, settings, progress=bar)
            rows += new
            if on_rows:
                on_rows(new)
    finally:
        if bar:
            bar.close()
    return rows
