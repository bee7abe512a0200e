"""Markdown tables of the compiled-code reports for docs/kernel-model.md: the headline per
card beside the old figure and an empty measured-on-GPU column, and per kernel before
(a report of the earlier kernels) and after.

    python -m benchmarks.compiled_tables NEW_REPORT.json [--before OLD_REPORT.json]

Every time printed is MODELLED (benchmarks/compiled_model.py); bytes and FLOPs are counted.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional


def headline(rep: dict) -> str:
    c = rep["cards"]
    old = rep.get("old_model", {})
    lines = [f"Preset {rep['preset']} {rep['sizes']}, bfloat16, one head step forward + backward, X frozen "
             "(X trained in brackets). Modelled us; measured on GPU: empty until a GPU runs "
             "benchmarks/gpu_check.sh.", "",
             "| | old model (one card, 4.3 TB/s) | H100 SXM | H200 | measured on GPU |",
             "|---|---:|---:|---:|---:|"]

    def both(card, key_by, backend=None):
        v = c[card][key_by] if backend is None else c[card][key_by].get(backend)
        if not v:
            return "-"
        return f"{v['frozen']:.1f} ({v['trained']:.1f})"

    old_head = old.get("head_fwd_bwd_us", {})
    for backend in ("triton", "cuda"):
        if backend in c["h100"]["head_fwd_bwd_us_by_backend"]:
            lines.append(f"| demul_head, {backend} | {old_head.get(backend, '-')} | "
                         f"{both('h100', 'head_fwd_bwd_us_by_backend', backend)} | "
                         f"{both('h200', 'head_fwd_bwd_us_by_backend', backend)} | |")
    lines.append(f"| eager reference | {old.get('eager_fwd_bwd_us', '-')} | {both('h100', 'eager_by_mode')} | "
                 f"{both('h200', 'eager_by_mode')} | |")
    lines.append(f"| torch.compile reference | - | {both('h100', 'compile_by_mode')} | {both('h200', 'compile_by_mode')} | |")
    lines.append(f"| floor (SPEC 4.3 work at the ceilings) | {old.get('floor_us', '-')} | {both('h100', 'floor_by_mode')} | "
                 f"{both('h200', 'floor_by_mode')} | |")
    return "\n".join(lines)


def kernels(rep: dict, before: Optional[dict] = None, mode: str = "frozen",
            label: str = "the kernels before issue 26") -> str:
    def rows(r):
        return {(k["backend"], k["name"]): k for k in r["kernels"] if k["mode"] == mode}

    new = rows(rep)
    old = rows(before) if before else {}
    lines = [f"Per launch, X {mode}: counted bytes (L2 = between L2 and the SMs, HBM = device memory), "
             f"dependent load rounds, modelled us (H100 / H200); before = {label} under the same model.", "",
             "| backend | kernel | grid | L2 MB before -> after | HBM MB | rounds before -> after | "
             "H100 us before -> after | H200 us after |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key in list(old) + [k for k in new if k not in old]:
        n, o = new.get(key), old.get(key)
        ref = n or o
        l2 = f"{o['l2_bytes'] / 1e6:.1f} -> " if o else ""
        l2 += f"{n['l2_bytes'] / 1e6:.1f}" if n else "gone"
        rounds = (f"{o['rounds']} -> " if o else "") + (f"{n['rounds']}" if n else "-")
        grid = f"{o['grid']} -> {n['grid']}" if o and n and o["grid"] != n["grid"] else ref["grid"]
        us = (f"{o['modelled_us']['h100']:.2f} -> " if o else "") + (f"{n['modelled_us']['h100']:.2f}" if n else "-")
        lines.append(f"| {key[0]} | {key[1]} | {grid} | {l2} | {ref['hbm_bytes'] / 1e6:.1f} | {rounds} | {us} | "
                     + (f"{n['modelled_us']['h200']:.2f} |" if n else "- |"))
    for r, label in ((before, "before"), (rep, "after")):
        if r:
            host = [h for h in r["host_ops"] if h["mode"] == mode and h["backend"] == "triton"]
            lines.append(f"| triton | host ops {label} ({len(host)}: {', '.join(sorted({h['op'] for h in host}))}) | | "
                         f"{sum(h['read_bytes'] + h['write_bytes'] for h in host) / 1e6:.1f} | | | "
                         f"{sum(h['modelled_us']['h100'] for h in host):.2f} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report")
    p.add_argument("--before", default=None)
    p.add_argument("--label", default="the kernels before issue 26", help="what the --before report is")
    args = p.parse_args(argv)
    with open(args.report) as f:
        rep = json.load(f)
    before = None
    if args.before:
        with open(args.before) as f:
            before = json.load(f)
    print(headline(rep))
    print()
    for mode in ("frozen", "trained"):
        print(kernels(rep, before, mode, args.label))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
