"""Runs the CUDA kernels of csrc/ in the adversarial emulation and reports what goes wrong.

``python tests/cuda_emu/race_probe.py [FILE:LINE ...]`` runs the emulation with the
``__syncthreads();`` on each given line of csrc/FILE turned off (none: the sources as they
are; one build serves every variant: DEMUL_EMU_SKIP_BARRIERS, include/emu_adversary.h), runs every op of the extension (aggregate, cross-entropy, distillation, the head;
forward and backward; float32, bfloat16, float16, on shapes that split the class ranges)
under every schedule of include/emu_adversary.h, and prints one JSON line: whether the run
aborted (a divergent barrier, ...), produced non-finite values (a NaN-poisoned read), gave
different bits under different schedules (a race), or differed from the unedited build.
A subprocess per variant: an abort of the emulation ends only that process.

``--race`` (``probe(..., race=True)``) runs the instrumented build instead
(include/emu_instrument.h): its shadow-memory check aborts at the first shared-memory access
that races with another thread's since the last barrier, naming the kernel and both csrc
file:lines (one schedule suffices: the check does not depend on the order).

``--sweep [FILE | FILE:LINE ...] [--both]`` removes each barrier of the named csrc/ files
(default: all of csrc/), ``__syncthreads();`` and ``__syncwarp();``, found in the sources as
they are now (no line numbers kept anywhere), one at a time: the race check first (it names
both lines), then the schedules where it missed (``--both``: always), and prints one JSON
line per barrier as it goes and a markdown table at the end (caught by what, and the first
and second access's file:line that the race check names). One or two builds per barrier (a
few minutes of CPU each on a small machine): ``nice`` it, and run one sweep at a time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
SCHEDULES = ["forward", "reverse", "lanes", "shuffle:1", "shuffle:2"]
SHAPES = [dict(C=37, M=3, D=40, B=5, K=70), dict(C=70, M=2, D=24, B=3, K=20)]  # r < D and r = D; C > 64
# The race check sees only the paths a run takes: add one where every dimension crosses a
# 64-wide tile (B > 64: loops over B chunks run twice, so a barrier between chunks matters).
RACE_SHAPES = SHAPES + [dict(C=23, M=5, D=131, B=67, K=193)]
# The distillation forward's streaming kernel (distill_forward_partial_kernel: the tile of T
# past the 160 KB budget, csrc/distill.cu DistillSmem) is taken by no shape above: float32 T
# with D = 560 (D rounded to 576: 64 x 580 x 4 B + the stages > 160 KB), in float32 only
# (16-bit T would need D > 896), run after the shapes above in every mode.
STREAMING = [(dict(C=2, M=3, D=560, B=3, K=40), ("float32",))]


DTYPES = ("float32", "bfloat16", "float16")


def _run_ops(module, dtypes=DTYPES, shapes=None):
    """Every op's outputs and gradients, for each dtype and shape: a flat list of tensors."""
    import torch

    from demul_fast.ops import cuda_ops
    from demul_fast.ops.distill_basis import build_distill_basis

    saved, cuda_ops._C = cuda_ops._C, module
    results = []
    cases = [(shape, dtypes) for shape in (SHAPES if shapes is None else shapes)]
    cases += [(shape, [d for d in only if d in dtypes]) for shape, only in STREAMING]
    try:
        for shape, shape_dtypes in cases:
            gen = torch.Generator().manual_seed(7)
            C, M, D, B, K = (shape[k] for k in "CMDBK")

            def r(*s):
                return torch.randn(*s, generator=gen, dtype=torch.float64)
            T64, A64, X64, E, W, b = r(C, M, D), r(C, M), r(B, D), r(C, K), r(K, D) / D ** 0.5, r(K)
            y = torch.randint(0, C, (B,), generator=gen)
            basis = build_distill_basis(W, b, E, dtype=torch.float32)
            GL = r(B, C)
            for dtype in (getattr(torch, d) for d in shape_dtypes):
                T, A, X = T64.to(dtype).requires_grad_(), A64.float().requires_grad_(), X64.to(dtype).requires_grad_()
                out = cuda_ops.demul_head(T, A, X, y, 30.0, basis, 0.7, 0.1, True)
                total = out.loss + 0.5 * out.ce_loss - 0.25 * out.distill_loss + (out.logits.float() * GL.float()).sum()
                results += [out.loss, out.ce_loss, out.distill_loss, out.logits]
                results += list(torch.autograd.grad(total, [T, A, X]))
                T2, A2 = T64.to(dtype).requires_grad_(), A64.float().requires_grad_()
                u = cuda_ops.aggregate_prompts(T2, A2)
                results += [u, *torch.autograd.grad((u.double() * r(C, D)).sum(), [T2, A2])]
                X2 = X64.to(dtype).requires_grad_()
                U = torch.nn.functional.normalize(r(C, D), dim=-1).to(dtype).requires_grad_()
                ce = cuda_ops.cosine_cross_entropy(X2, U, y, 20.0, 0.1)
                results += [ce, *torch.autograd.grad(ce, [X2, U])]
                T3 = T64.to(dtype).requires_grad_()
                dl = cuda_ops.prompt_distill_loss(T3, basis)
                results += [dl, *torch.autograd.grad(dl, [T3])]
    finally:
        cuda_ops._C = saved
    return [t.detach().float().clone() for t in results]


def child(edits_spec, dtypes=DTYPES, schedules=SCHEDULES, race=False):
    import torch

    sys.path.insert(0, TESTS)
    from cuda_emu import build as emu_build

    torch.set_num_threads(1)
    for spec in edits_spec:  # each names a barrier (checked here: a wrong line is an error, not a pass)
        name, line = spec.split(":")
        with open(os.path.join(emu_build.CSRC, name)) as f:
            emu_build.without_barrier(name, int(line))[name](f.read())
    # One build for every variant: the listed barriers are turned off at run time
    # (DEMUL_EMU_SKIP_BARRIERS, include/emu_adversary.h), the unedited run uses the same module.
    module = emu_build.build(instrument=race)
    report = dict(variant=edits_spec, race_check=race, aborted=False, nonfinite=[], schedules_differ=[], differs_from_base=[])
    os.environ.pop("DEMUL_EMU_SKIP_BARRIERS", None)
    os.environ["DEMUL_EMU_SCHEDULE"] = "forward"
    reference = None if race or not edits_spec else _run_ops(module, dtypes)  # the race check needs no comparison
    variant = module
    if edits_spec:
        os.environ["DEMUL_EMU_SKIP_BARRIERS"] = ",".join(edits_spec)
    for schedule in schedules:
        os.environ["DEMUL_EMU_SCHEDULE"] = schedule
        got = _run_ops(variant, dtypes, RACE_SHAPES if race else None)
        if any(not torch.isfinite(t).all() for t in got):
            report["nonfinite"].append(schedule)
        first = report.setdefault("_first", got)
        if any(not torch.equal(a, c) for a, c in zip(first, got)):
            report["schedules_differ"].append(schedule)
        if reference is not None and any(not torch.equal(a, c) for a, c in zip(reference, got)):
            report["differs_from_base"].append(schedule)
    del report["_first"]
    print("PROBE " + json.dumps(report), flush=True)


def probe(edits_spec=(), timeout=1800, dtypes=DTYPES, schedules=None, race=False) -> dict:
    """Run the probe in a subprocess; an abort is reported with the emulation's message.
    ``schedules``: default all five, or only "forward" with ``race``."""
    schedules = schedules or (("forward",) if race else SCHEDULES)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS), TESTS]),
               DEMUL_PROBE_DTYPES=",".join(dtypes), DEMUL_PROBE_SCHEDULES=",".join(schedules))
    env.setdefault("TRITON_INTERPRET", "1")
    env.pop("DEMUL_EMU_RACE", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *(["--race"] if race else []),
                           *edits_spec], capture_output=True, text=True, env=env, timeout=timeout)
    # how often each removed barrier was met (include/emu_adversary.h prints it at exit; an
    # abort prints none): 0 means the runs never reached it, so its removal proves nothing
    hits = {m.group(1): int(m.group(2)) for m in re.finditer(r"^emu: skipped barrier (\S+) (\d+) times$", proc.stderr, re.M)}
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return dict(json.loads(line[6:]), skipped=hits)
    messages = [ln for ln in proc.stderr.splitlines() if ln.startswith("emu:") and not ln.startswith("emu: skipped barrier")]
    return dict(variant=list(edits_spec), race_check=race, aborted=True, returncode=proc.returncode,
                message=messages[-1] if messages else proc.stderr[-2000:], skipped=hits)


def caught(report: dict) -> bool:
    return bool(report["aborted"] or report.get("nonfinite") or report.get("schedules_differ")
                or report.get("differs_from_base"))


_RACE = re.compile(r"emu: race in (\S+) .*?: (\w+) by (.+?) at (\S+), then (\w+) by (.+?) at (\S+) with no barrier")


def race_lines(message: str):
    """(kernel, first access's file:line, second access's file:line) of a race-check abort, or None."""
    found = _RACE.search(message or "")
    return None if found is None else (found.group(1), found.group(4), found.group(7))


def sweep(files=(), out=sys.stdout, dtypes=DTYPES, both=False) -> list:
    """Each barrier of csrc/``files`` (all of csrc/ when empty; an entry FILE:LINE selects one
    barrier) removed in turn: the race check (it names both lines), then the schedules'
    probe where the race check missed (``both``: always). Returns one row per barrier (also
    printed as a JSON line)."""
    sys.path.insert(0, TESTS)
    from cuda_emu import build as emu_build

    rows = []
    for name, line in emu_build.barriers(emu_build.BARRIER_CALLS):
        where = f"{name}:{line}"
        if files and name not in files and where not in files:
            continue
        with open(os.path.join(emu_build.CSRC, name)) as f:
            text = f.read().split("\n")[line - 1].strip()
        race = probe([where], dtypes=dtypes, race=True)
        sched = probe([where], dtypes=dtypes) if both or not caught(race) else None
        row = dict(barrier=where, code=text, schedules=None if sched is None else _what(sched),
                   race_check=caught(race), race_lines=race_lines(race.get("message")),
                   race_message=race.get("message"), schedules_report=sched)
        row["caught"] = bool(row["schedules"] or row["race_check"])
        rows.append(row)
        print("SWEEP " + json.dumps(row), file=out, flush=True)
    print(table(rows), file=out, flush=True)
    return rows


def _what(report: dict) -> str:
    """What noticed a removed barrier under the schedules ('' if nothing)."""
    if report["aborted"]:
        return "abort: " + (report.get("message") or "")[:160]
    parts = [f"{k} ({', '.join(report[k])})" for k in ("nonfinite", "schedules_differ", "differs_from_base")
             if report.get(k)]
    return "; ".join(parts)


def table(rows: list) -> str:
    """The sweep's rows as a markdown table."""
    lines = ["| barrier | code | schedules | race check (kernel: first access, second access) |",
             "|---|---|---|---|"]
    for r in rows:
        race = "not caught"
        if r["race_check"]:
            race = "caught" if r["race_lines"] is None else "{}: {}, {}".format(*r["race_lines"])
        sched = "not run (the race check caught it)" if r["schedules"] is None else r["schedules"] or "not caught"
        lines.append(f"| {r['barrier']} | `{r['code']}` | {sched} | {race} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sweep"]:
        both = "--both" in sys.argv[2:]
        sweep([a for a in sys.argv[2:] if a != "--both"], both=both)
        sys.exit(0)
    args = sys.argv[1:]
    is_child = bool(args) and args[0] == "--child"
    args = args[1:] if is_child else args
    race = bool(args) and args[0] == "--race"
    args = args[1:] if race else args
    if is_child:
        child(args, os.environ.get("DEMUL_PROBE_DTYPES", ",".join(DTYPES)).split(","),
              os.environ.get("DEMUL_PROBE_SCHEDULES", ",".join(SCHEDULES)).split(","), race)
    else:
        print(json.dumps(probe(args, race=race)))
