"""Throughput and memory of demul_fast against the reference and the public peers.

    python benchmarks/run.py                          # CPU default: the small preset, all suites
    python benchmarks/run.py --preset imagenet --device cuda --dtype bfloat16
    python benchmarks/run.py --suite head --C 21841 --M 4 --B 1024 --plot

Suites: ``head`` (the four head functions, docs/SPEC.md section 4; fwd, bwd, fwd+bwd; with the
one-time cost of the frozen-phi basis of SPEC 4.3 printed apart and kept in the JSON meta),
``encoder`` (text_encoder.FullTextEncoder vs PrefixSharedTextEncoder, docs/SPEC.md section 3),
``step`` (a DeMul training step from given image features: DeMulReference vs DeMul, eager
and compiled as ``demul-<backend>-compile``; every row has ``launches_per_step``, counted by
benchmarks/launches.py; ``--count-only`` counts without running the reference or timing,
``--preset step --step-C all`` gives the workloads of docs/step.md).
Every provider is checked against the reference on the benchmark's own inputs before it
is timed; unavailable providers are listed as skipped with the reason. On CUDA the
functional API's value checks (a host synchronisation per call) are off
(``DEMUL_FAST_CHECK_VALUES=0``) unless the environment sets them. Rows are printed
as a table and appended as JSON lines to ``benchmarks/results/<preset>-<device>.jsonl``
(``--out`` to change the folder). How time, memory and floors are measured:
benchmarks/measure.py and benchmarks/floors.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: import this folder as the package benchmarks
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here] + [os.path.dirname(_here)]

import torch  # noqa: E402

from benchmarks import floors, harness  # noqa: E402

SUITES = ("head", "encoder", "step")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}

# Sizes: C classes, M prompts, D joint dim, B images, K LLM dim, n_ctx context tokens;
# the text tower ("clip"): an open_clip model name or "tiny" (a small random tower that
# keeps the CPU preset short). enc_C / enc_M: classes and prompts of the encoder and step
# suites (None: the same as the head's).
PRESETS = {
    "small": dict(C=100, M=4, D=512, B=64, K=768, n_ctx=8, clip="tiny", enc_C=32, enc_M=4),
    "imagenet": dict(C=1000, M=8, D=512, B=256, K=3072, n_ctx=16, clip="ViT-B-16", enc_C=None, enc_M=None),
    "imagenet21k": dict(C=21841, M=4, D=512, B=1024, K=3072, n_ctx=16, clip="ViT-B-16", enc_C=1000, enc_M=4),
    "tiny": dict(C=7, M=3, D=32, B=5, K=12, n_ctx=4, clip="micro", enc_C=3, enc_M=2),  # tests
    # the training step of issue 25 / docs/step.md: ViT-B/16 text shape, CoOp's batch
    "step": dict(C=100, M=4, D=512, B=32, K=3072, n_ctx=16, clip="ViT-B-16", enc_C=None, enc_M=None),
}
STEP_C = (37, 100, 397, 1000)  # the step workloads of docs/step.md (--step-C all)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--suite", action="append", choices=SUITES + ("all", "family"),
                   help="repeat to pick several (default: all); family (CoCoOp, MaPLe: benchmarks/family.py) runs alone")
    p.add_argument("--op", action="append",
                   help="head ops to run: aggregate_prompts, cosine_cross_entropy, prompt_distill_loss, demul_head "
                        "(default: all four)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    for k in ("C", "M", "D", "B", "K", "n_ctx", "enc_C", "enc_M"):
        p.add_argument(f"--{k}", type=int, default=None, help=f"override the preset's {k}")
    p.add_argument("--clip", default=None, help="text tower: an open_clip model name (random init) or 'tiny'")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--image-tower", action="store_true",
                   help="step suite: also a step from images through the frozen image tower (op step+images)")
    p.add_argument("--modes", default="fwd,bwd,fwd+bwd", help="head suite modes, comma separated")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include torch.compile providers (default: on for CUDA, off for CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default="default",
                   help="step suite: torch.compile modes of the demul-<backend>-compile providers, comma separated "
                        "(default, reduce-overhead, max-autotune; a mode other than default adds -<mode> to the name)")
    p.add_argument("--step-C", default=None,
                   help="step suite at several C, e.g. 100,1000, or 'all' (37,100,397,1000)")
    p.add_argument("--count-only", action="store_true",
                   help="count kernel launches per step (benchmarks/launches.py) without the reference, the gate "
                        "or timing: for shapes too large to run here")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers to run (eager always runs), e.g. "
                        "eager,compile,torch,triton,cuda,liger,cce")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed calls per row (default 1 CPU, 0.2 GPU)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per row (default 0.1 CPU, 0.025 GPU)")
    p.add_argument("--ceiling-mib", type=int, default=None,
                   help="MiB copied to measure bandwidth (default 1024 GPU, 64 CPU)")
    p.add_argument("--ceiling-n", type=int, default=None,
                   help="n of the n^3 matrix product that measures the FLOP rate (default 8192 GPU, 1024 CPU)")
    p.add_argument("--sweep-C", default=None, help="head suite at several C, e.g. 100,1000,5000 (for --plot)")
    p.add_argument("--out", default=None, help="folder for the JSON lines and plots (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="do not write JSON lines")
    p.add_argument("--plot", action="store_true", help="write PNG charts next to the JSON lines")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--interpret", action="store_true",
                   help="CPU only: run the triton provider under the Triton interpreter (checks the wiring and "
                        "the gate; its times mean nothing)")
    return p.parse_args(argv)


def resolve(args):
    """(device, dtype, sizes, suites, settings) from the arguments and the preset."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sizes = dict(PRESETS[args.preset])
    for k in ("C", "M", "D", "B", "K", "n_ctx", "enc_C", "enc_M", "clip"):
        if getattr(args, k) is not None:
            sizes[k] = getattr(args, k)
    sizes["label_smoothing"] = args.label_smoothing
    suites = SUITES if not args.suite or "all" in args.suite else tuple(dict.fromkeys(args.suite))
    gpu = device.type == "cuda"
    # rotate input sets until together they are twice the GPU's L2 (64 MiB on a CPU)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) if gpu else 0
    settings = harness.Settings(warmup_s=args.warmup if args.warmup is not None else (0.025 if gpu else 0.1),
                                budget_s=args.budget if args.budget is not None else (0.2 if gpu else 1.0),
                                rotate_bytes=max(2 * l2, 64 << 20), count_only=args.count_only)
    return device, dtype, sizes, suites, settings


def build_workloads(suites, sizes, dtype, device, args):
    from benchmarks import head, models
    allow_compile = args.compile if args.compile is not None else device.type == "cuda"
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    out = []
    if "head" in suites:
        c_values = [int(c) for c in args.sweep_C.split(",")] if args.sweep_C else [sizes["C"]]
        for c in c_values:
            hs = {k: sizes[k] for k in ("C", "M", "D", "B", "K", "label_smoothing")}
            hs["C"] = c
            for wl in head.workloads(hs, dtype, device, ops=tuple(args.op or head.OPS), allow_compile=allow_compile):
                wl.modes = modes
                out.append(wl)
    if "encoder" in suites or "step" in suites:
        step_C = None
        if args.step_C:
            step_C = list(STEP_C) if args.step_C == "all" else [int(c) for c in args.step_C.split(",")]
        modes = tuple(m.strip() for m in args.compile_mode.split(",") if m.strip())
        out += models.workloads(suites, sizes, dtype, device, allow_compile=allow_compile,
                                image_tower=args.image_tower, compile_modes=modes, step_C=step_C)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite and "family" in args.suite:
        from benchmarks import family
        return family.main(args)
    device, dtype, sizes, suites, settings = resolve(args)
    if args.interpret:
        if device.type != "cpu":
            raise SystemExit("--interpret is for CPU runs")
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
        os.environ["DEMUL_FAST_BENCH_INTERPRET"] = "1"
    if device.type == "cuda":
        # The value checks of demul_fast's public functions (label range, finite scale) cost
        # a host synchronisation per call on the GPU; the reference has none. Off unless asked.
        os.environ.setdefault("DEMUL_FAST_CHECK_VALUES", "0")
    t0 = time.perf_counter()
    ceilings = floors.measure_ceilings(device, dtype, copy_bytes=(args.ceiling_mib or 0) << 20 or None,
                                       matmul_n=args.ceiling_n)
    print(f"device {harness.device_name(device)}, dtype {str(dtype).replace('torch.', '')}, preset {args.preset}, "
          f"sizes {sizes}")
    print(floors.describe(ceilings))
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores:
            print(f"note: the machine is busy (load {load:.1f} on {cores} cores): CPU timings will be noisy; "
                  "--threads 1 steadies them")
    workloads = build_workloads(suites, sizes, dtype, device, args)
    basis = None
    from benchmarks import head
    if "head" in suites and set(args.op or head.OPS) & set(head.DISTILL_OPS):
        basis = head.basis_cost(sizes, device)
        peak = f", peak {basis['peak_mb']:.1f} MB" if basis["peak_mb"] is not None else ""
        print(f"one-time distill basis (SPEC 4.3, not in the rows): {basis['ms']:.1f} ms, keeps "
              f"{basis['basis_mb']:.1f} MB{peak} ({basis['gflop']:.1f} GFLOP float64) at C={sizes['C']}, "
              f"K={sizes['K']}, D={sizes['D']}")
    if args.providers:
        keep = {p.strip() for p in args.providers.split(",")} | {"eager"}  # eager: the gate's and ratios' baseline
        for wl in workloads:
            wl.providers = [p for p in wl.providers if p.name in keep]
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    meta = harness.run_metadata(device, args.preset, ceilings, sys.argv[1:] if argv is None else list(argv))
    meta["check_values"] = os.environ.get("DEMUL_FAST_CHECK_VALUES", "1")
    if basis is not None:
        meta["distill_basis"] = basis
    path = os.path.join(out_dir, f"{args.preset}-{device.type}.jsonl")
    save = None if args.no_save else (lambda new_rows: harness.write_jsonl(path, meta, new_rows))
    rows = harness.run(workloads, ceilings, settings, quiet=args.quiet, on_rows=save)
    print(harness.format_table(rows))
    for suite in suites:
        print(harness.summary(suite, rows))
    if not args.no_save:
        print(f"rows appended to {os.path.relpath(path)} (run_id {meta['run_id']})")
    if args.plot:
        from benchmarks import plot
        for path in plot.plot_rows(rows, out_dir, tag=f"{args.preset}-{device.type}-{meta['run_id']}"):
            print(f"plot written: {os.path.relpath(path)}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    bad = [r for r in rows if r.status in ("wrong", "error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
