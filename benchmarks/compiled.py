"""The compiled-code report: every kernel of one DeMul head step, read from what the
compiler emits for Hopper (sm_90a), with a modelled time. Needs no GPU.

    python benchmarks/compiled.py --preset imagenet --out DIR

Per backend a collector (benchmarks/compiled_triton.py, benchmarks/compiled_cuda.py) compiles
its kernels at the block sizes its launchers choose for the preset (bfloat16), saves each
kernel's PTX in DIR and reads ``ptxas -v``; a backend whose collector is missing or cannot
run here is skipped, and the report says so. DIR/report.json:

    {"kernels": [{"name", "backend", "ptx" (Triton; CUDA rows: "sass"), "grid", "mma", "regs",
                  "spill_bytes", "smem_bytes", "flops", "bytes", "modelled_us", ...}],
     "head_fwd_bwd_us", "eager_fwd_bwd_us", "floor_us", "skipped", "assumptions"}

modelled time = max(bytes / 4.3 TB/s, FLOPs / the peak of the MMA kind the kernel uses).
Every figure here is MODELLED from compiled code and datasheet rates, never measured:
wave quantisation, latency, L2 re-reads and launch gaps are not in it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.run import PRESETS  # noqa: E402

BANDWIDTH = 4.3e12                 # H200 HBM3e, bytes/s (datasheet)
PEAK = {"wgmma": 989e12,           # bf16 dense tensor-core rate of an H100/H200 SXM (datasheet)
        "mma.sync": 660e12,        # assumption: warp-level MMA reaches about two thirds of it
        "none": 67e12}             # fp32 FMA rate (datasheet)
SMS = 132
SMEM_LIMIT = 232448                # 227 KiB of shared memory per block (sm_90)
BACKENDS = ("triton", "cuda")
ASSUMPTIONS = (f"bandwidth {BANDWIDTH / 1e12} TB/s; MMA peaks (FLOP/s) {PEAK}; bytes are each tensor a kernel "
               "touches counted once (no L2 re-reads); eager = the reference's direct form (SPEC 4.1) in bf16 on "
               "cuBLAS (wgmma) and elementwise kernels, one kernel per line of the reference")


def modelled_us(flops: float, nbytes: float, mma: str) -> float:
    return 1e6 * max(nbytes / BANDWIDTH, flops / PEAK[mma])


def eager_kernels(C, M, D, B, K, e=2) -> List[Dict]:
    """The eager PyTorch step (reference, direct form with K) as (flops, bytes) per kernel."""
    CM = C * M
    T, Z, X, L = CM * D * e, CM * K * e, B * D * e, B * C * e
    rows = [  # forward
        (0, 2 * T), (0, 2 * T + T), (0, T + C * D * e), (0, 3 * C * D * e),       # |t|, t^, u, u^
        (2 * CM * K * D, T + K * D * e + Z), (0, 2 * Z + K * e),                 # z = t^ W^T + b
        (0, Z), (0, Z + C * K * e), (0, 2 * CM * 4),                             # |z|, <z, e^>, cos
        (0, 3 * X), (2 * B * C * D, X + C * D * e + L), (0, 2 * L),              # x^, logits, lse
        # backward
        (0, 3 * L), (2 * B * C * D, L + X + C * D * e), (2 * B * C * D, L + C * D * e + X),  # G, dU^, dX^
        (0, 3 * C * D * e), (0, T + 2 * C * D * e), (0, 3 * T),                  # du, dw, w du
        (0, 3 * Z), (2 * CM * K * D, Z + K * D * e + T),                         # dz, W^T dz
        (0, 4 * T), (0, 3 * X),                                                  # dT, dX
    ]
    return [dict(flops=f, bytes=b) for f, b in rows]


def floor_us(C, M, D, B, K, e=2) -> float:
    """The fewest bytes and FLOPs of the K-free step (SPEC 4.3), forward and backward each
    bounded separately: every input read once and every output written once per pass."""
    CM, r = C * M, min(K, D)
    fwd = modelled_us(2 * CM * r * D + 2 * B * C * D, e * (CM * D + B * D + r * D) + 4 * C * r, "wgmma")
    bwd = modelled_us(2 * CM * r * D + 4 * B * C * D, e * (2 * CM * D + 2 * B * D + r * D) + 4 * C * r, "wgmma")
    return fwd + bwd


def collect(preset_name: str, out_dir: str) -> dict:
    preset = PRESETS[preset_name]
    os.makedirs(out_dir, exist_ok=True)
    kernels, skipped = [], {}
    for backend in BACKENDS:
        try:
            collector = importlib.import_module(f"benchmarks.compiled_{backend}")
        except ImportError as exc:
            skipped[backend] = f"no collector: {exc}"
            continue
        why = collector.unavailable_reason()
        rows = [] if why else collector.collect(preset_name, out_dir)
        if not rows:
            skipped[backend] = why or "the collector found no kernels"
        kernels += rows
    for k in kernels:  # one rule for every backend (the same peaks as benchmarks/compiled_cuda.py)
        k["modelled_us"] = modelled_us(k["flops"], k["bytes"], k["mma"])
    C, M, D, B, K = (preset[k] for k in ("C", "M", "D", "B", "K"))
    head = {b: sum(k["modelled_us"] for k in kernels if k["backend"] == b) for b in BACKENDS
            if any(k["backend"] == b for k in kernels)}
    report = dict(preset=preset_name, sizes=dict(C=C, M=M, D=D, B=B, K=K), dtype="bfloat16", kernels=kernels,
                  head_fwd_bwd_us=head.get("triton", next(iter(head.values()), None)),
                  head_fwd_bwd_us_by_backend=head,
                  eager_fwd_bwd_us=sum(modelled_us(k["flops"], k["bytes"], "wgmma")
                                       for k in eager_kernels(C, M, D, B, K)),
                  floor_us=floor_us(C, M, D, B, K), sms=SMS, smem_limit=SMEM_LIMIT, skipped=skipped,
                  assumptions=ASSUMPTIONS)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def table(report: dict) -> str:
    head = f"{'kernel':<18} {'backend':<7} {'pass':<4} {'grid':>6} {'mma':<8} {'regs':>4} {'spill':>5} " \
           f"{'smem':>7} {'GFLOP':>7} {'MB':>7} {'modelled us':>11}"
    lines = [f"compiled-code report, preset {report['preset']} {report['sizes']}, bf16, sm_90a "
             "(MODELLED, not measured)",
             head]
    for k in report["kernels"]:
        lines.append(f"{k['name']:<18} {k['backend']:<7} {k.get('pass', ''):<4} {k['grid']:>6} {k['mma']:<8} "
                     f"{k['regs'] or 0:>4} {k['spill_bytes']:>5} {k['smem_bytes']:>7} {k['flops'] / 1e9:>7.3f} "
                     f"{k['bytes'] / 1e6:>7.2f} {k['modelled_us']:>11.2f}")
    for b, us in report["head_fwd_bwd_us_by_backend"].items():
        lines.append(f"modelled demul_head fwd+bwd ({b}): {us:.1f} us")
    lines.append(f"modelled eager fwd+bwd: {report['eager_fwd_bwd_us']:.1f} us; "
                 f"modelled floor: {report['floor_us']:.1f} us")
    for b, why in report["skipped"].items():
        lines.append(f"skipped {b}: {why}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["imagenet", "imagenet21k", "small", "tiny"], default="imagenet")
    p.add_argument("--out", required=True, help="directory for report.json and the PTX files")
    args = p.parse_args(argv)
    print(table(collect(args.preset, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
