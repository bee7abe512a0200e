"""The compiled-code report: every kernel of one DeMul head step, what the compiler emits
for Hopper (sm_90a) and what a trace says it moves, with a MODELLED time per card. Needs no GPU.

    python benchmarks/compiled.py --preset imagenet --out DIR [--traces DIR]

* Counts: the Triton step (X frozen and X trained) runs in Triton's interpreter under a
  tracer (benchmarks/compiled_trace.py, a subprocess with TRITON_INTERPRET=1): per launch
  its grid, FLOPs of its dots, ``l2_bytes`` (every load and store, in 32-byte sectors, per
  program), ``hbm_bytes`` (the distinct sectors of the launch), dependent load ``rounds``;
  and the torch ops of the step around the kernels (casts, fills, reductions). The CUDA
  launches and their counts come from benchmarks/compiled_cuda.py (launch plan and
  formulas, not a trace: see its docstring). The eager and torch.compile baselines trace
  the reference on the meta device (benchmarks/compiled_model.py).
* Compiled code: per Triton kernel its PTX and ``ptxas -v`` (MMA kind, registers, spills,
  shared memory, performance warnings such as C7515); per CUDA kernel its SASS.
* Time: benchmarks/compiled_model.py, per card (``h100``, ``h200``) at the stated
  sustained ceilings, copied into the report.

DIR/report.json: ``kernels`` (one row per launch and mode: ``l2_bytes``, ``hbm_bytes``,
``rounds``, ``latency_us``/``launch_us``/``modelled_us`` by card, compiled facts),
``host_ops``, ``cards`` (per card: ``ceilings``, ``head_fwd_bwd_us``, ``eager_fwd_bwd_us``,
``compile_fwd_bwd_us``, ``floor_us``, and the same by backend and mode), ``old_model``.
Every time in it is MODELLED, never measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import compiled_model as model  # noqa: E402
from benchmarks.run import PRESETS  # noqa: E402

MODES = ("frozen", "trained")  # X (the image features) frozen, as the benchmarked head; or trained
PRIMARY = ("h100", "frozen")   # the card and mode of the headline figures
SMEM_LIMIT = 232448            # 227 KiB of shared memory per block (sm_90)
SMS = model.CARDS["h100"]["sms"]


def _name(kernel_fn: str) -> str:
    """_text_fwd_kernel -> text_fwd"""
    return kernel_fn.strip("_").removesuffix("_kernel")


def run_trace(preset: str, mode: str, out: str) -> dict:
    """The Triton step's trace (benchmarks/compiled_trace.py) in a subprocess with the interpreter on."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-m", "benchmarks.compiled_trace", "--preset", preset, "--mode", mode,
                    "--out", out], env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    with open(out) as f:
        return json.load(f)


def _timed(row: dict) -> dict:
    for card_name, card in model.CARDS.items():
        t = model.kernel_time(card, flops=row["flops"], mma=row["mma"], l2_bytes=row["l2_bytes"],
                              hbm_bytes=row["hbm_bytes"], rounds=row["rounds"], grid=row["grid"],
                              regs=row.get("regs"), smem=row.get("smem_bytes"), num_warps=row.get("num_warps") or 4)
        for key in ("launch_us", "latency_us", "modelled_us"):
            row.setdefault(key, {})[card_name] = round(t[key], 4)
        row.setdefault("bound", {})[card_name] = t["bound"]
    return row


def triton_rows(trace: dict, compiled: Dict[str, dict], mode: str) -> List[dict]:
    rows = []
    for launch in trace["launches"]:
        info = dict(compiled.get(launch["name"], {}))
        row = dict(info, name=_name(launch["name"]), backend="triton", mode=mode, grid=launch["programs"],
                   grid_dims=launch["grid"], flops=launch["flops"], l2_bytes=launch["l2_bytes"],
                   hbm_bytes=launch["hbm_read_bytes"] + launch["hbm_write_bytes"],
                   hbm_read_bytes=launch["hbm_read_bytes"], hbm_write_bytes=launch["hbm_write_bytes"],
                   rounds=launch["rounds"], traced=True, sampled_programs=launch["sampled_programs"])
        row.setdefault("mma", "wgmma" if launch["flops"] else "none")
        rows.append(_timed(row))
    return rows


def host_rows(trace: dict, mode: str, backend: str) -> List[dict]:
    rows = []
    for op in trace["host_ops"]:
        row = dict(op, backend=backend, mode=mode,
                   modelled_us={c: round(model.host_op_time(card, op), 4) for c, card in model.CARDS.items()})
        rows.append(row)
    return rows


def cuda_rows(preset: str, out_dir: str) -> (List[dict], str):
    try:
        collector = importlib.import_module("benchmarks.compiled_cuda")
    except ImportError as exc:
        return [], f"no collector: {exc}"
    why = collector.unavailable_reason()
    if why:
        return [], why
    rows = []
    for mode in MODES:
        for r in collector.collect(preset, out_dir, mode=mode):
            rows.append(_timed(dict(r, mode=mode)))
    return rows, None


def collect(preset_name: str, out_dir: str, traces: str = None) -> dict:
    """Compile, trace, model; write DIR/report.json. ``traces``: a directory whose
    trace_PRESET_MODE.json files are reused instead of tracing again."""
    os.makedirs(out_dir, exist_ok=True)
    import benchmarks.compiled_triton as ctri

    skipped, compiled, step = {}, {}, {}
    why = ctri.unavailable_reason()
    if why:
        skipped["triton"] = why
    else:
        compiled = ctri.collect(preset_name, out_dir)
        for mode in MODES:
            path = os.path.join(traces or out_dir, f"trace_{preset_name}_{mode}.json")
            if traces and os.path.exists(path):
                with open(path) as f:
                    step[mode] = json.load(f)
            else:
                step[mode] = run_trace(preset_name, mode, os.path.join(out_dir, f"trace_{preset_name}_{mode}.json"))
    rows, why = cuda_rows(preset_name, out_dir)
    if why:
        skipped["cuda"] = why
    report = assemble(preset_name, step, compiled, rows, skipped)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def assemble(preset_name: str, step: Dict[str, dict], compiled: Dict[str, dict], cuda: List[dict],
             skipped: Dict[str, str]) -> dict:
    """The report from the Triton traces by mode, the compiled kernels by function name and the CUDA rows."""
    preset = PRESETS[preset_name]
    sizes = {k: preset[k] for k in ("C", "M", "D", "B", "K")}
    kernels, hosts = [], []
    for mode, trace in step.items():
        kernels += triton_rows(trace, compiled, mode)
        hosts += host_rows(trace, mode, "triton")
    kernels += cuda
    baselines = {}
    for mode in MODES:
        ops = model.trace_reference(sizes, mode == "trained")
        baselines[mode] = dict(eager=model.eager_kernels(ops), compile=model.compile_kernels(ops))
    cards = {}
    for card_name, card in model.CARDS.items():
        by = {}
        for backend in ("triton", "cuda"):
            for mode in MODES:
                ks = [k for k in kernels if k["backend"] == backend and k["mode"] == mode]
                if not ks:
                    continue
                host = sum(h["modelled_us"][card_name] for h in hosts if h["backend"] == backend and h["mode"] == mode)
                by.setdefault(backend, {})[mode] = round(sum(k["modelled_us"][card_name] for k in ks) + host, 3)
        eager = {m: round(model.baseline_time(card, b["eager"]), 3) for m, b in baselines.items()}
        comp = {m: round(model.baseline_time(card, b["compile"]), 3) for m, b in baselines.items()}
        floor = {m: round(model.floor_us(card, **sizes, train_x=m == "trained"), 3) for m in MODES}
        head = by.get("triton", by.get("cuda", {})).get("frozen")
        cards[card_name] = dict(ceilings=card, head_fwd_bwd_us=head, eager_fwd_bwd_us=eager["frozen"],
                                compile_fwd_bwd_us=comp["frozen"], floor_us=floor["frozen"],
                                head_fwd_bwd_us_by_backend=by, eager_by_mode=eager, compile_by_mode=comp,
                                floor_by_mode=floor)
    return dict(
        preset=preset_name, sizes=sizes, dtype="bfloat16", modes=list(MODES), kernels=kernels, host_ops=hosts,
        cards=cards, baselines={m: {k: dict(kernels=len(v), launches=sum(x["launches"] for x in v),
                                            bytes=sum(x["bytes"] for x in v), flops=sum(x["flops"] for x in v))
                                    for k, v in b.items()} for m, b in baselines.items()},
        old_model=dict(rule=model.OLD_MODEL["rule"], **model.OLD_MODEL.get(preset_name, {})),
        sms=SMS, smem_limit=SMEM_LIMIT, skipped=skipped, time_kind="modelled")


def table(report: dict) -> str:
    c = PRIMARY[0]
    lines = [f"compiled-code report, preset {report['preset']} {report['sizes']}, bf16, sm_90a (MODELLED, not "
             f"measured; times on {model.CARDS[c]['name']})",
             f"{'kernel':<18} {'backend':<7} {'mode':<7} {'grid':>6} {'mma':<8} {'regs':>4} {'spill':>5} "
             f"{'GFLOP':>7} {'L2 MB':>7} {'HBM MB':>7} {'rnds':>4} {'lat us':>6} {'us':>7}"]
    for k in report["kernels"]:
        lines.append(f"{k['name'][:18]:<18} {k['backend']:<7} {k['mode']:<7} {k['grid']:>6} {k['mma']:<8} "
                     f"{k.get('regs') or 0:>4} {k.get('spill_bytes') or 0:>5} {k['flops'] / 1e9:>7.3f} "
                     f"{k['l2_bytes'] / 1e6:>7.2f} {k['hbm_bytes'] / 1e6:>7.2f} {k['rounds']:>4} "
                     f"{k['latency_us'][c]:>6.2f} {k['modelled_us'][c]:>7.2f}")
    for h in report["host_ops"]:
        lines.append(f"host op {h['op']:<12} {h['backend']:<7} {h['mode']:<7} "
                     f"{(h['read_bytes'] + h['write_bytes']) / 1e6:>7.2f} MB {h['modelled_us'][c]:>7.2f} us")
    for card, v in report["cards"].items():
        lines.append(f"[{card}] head fwd+bwd by backend/mode: {v['head_fwd_bwd_us_by_backend']} us; eager "
                     f"{v['eager_by_mode']}; compile {v['compile_by_mode']}; floor {v['floor_by_mode']}")
    old = report["old_model"]
    if "head_fwd_bwd_us" in old:
        lines.append(f"old model (issue 15/16 rule, optimistic): head {old['head_fwd_bwd_us']} us, eager "
                     f"{old['eager_fwd_bwd_us']} us, floor {old['floor_us']} us")
    for b, why in report["skipped"].items():
        lines.append(f"skipped {b}: {why}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["imagenet", "imagenet21k", "small", "tiny"], default="imagenet")
    p.add_argument("--out", required=True, help="directory for report.json, the traces and the PTX/SASS files")
    p.add_argument("--traces", default=None, help="reuse trace_PRESET_MODE.json files found in this directory")
    args = p.parse_args(argv)
    print(table(collect(args.preset, args.out, args.traces)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
