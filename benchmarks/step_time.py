"""Eager DeMul training-step time of two source trees, side by side (measured, CPU).

    python benchmarks/step_time.py OLD_TREE NEW_TREE [--C 100 --M 4 --n-ctx 16 --B 32 --reps 5 --rounds 3]

Each tree gets one worker process (``PYTHONPATH=<tree>``, ``torch.set_num_threads(1)``)
that builds the same step: a ViT-B/16 text tower with random weights (seed 0), ``DeMul``
with the torch head, C classes, M prompts, n_ctx context tokens, B random image features,
forward + backward + SGD (lr 1e-3, momentum 0.9). After a warm-up of 2 steps, the driver
asks the workers in turn (old, new, old, new, ...) for ``reps`` steps each, ``rounds``
times, and reports per tree the minimum step time over all its steps, the median of its
per-round minima, and the load average before and after (the machine may be shared).
Only the tree's ``demul_fast`` and ``benchmarks.models`` are imported from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    import demul_fast as df
    from benchmarks import models

    model, tok = models.clip_model("ViT-B-16", "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    k, d = 64, model.text_projection.shape[1]
    E, W, b = torch.randn(args.C, k, generator=gen), torch.randn(k, d, generator=gen), torch.randn(k, generator=gen)
    m = df.DeMul(model, tok, models.classnames(args.C), llm_embeddings=E, phi=(W, b), n_prompts=args.M,
                 n_ctx=args.n_ctx, backend="torch").train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = torch.randn(args.B, d, generator=gen)
    y = torch.randint(0, args.C, (args.B,), generator=gen)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        m(image_features=x, labels=y).loss.backward()
        opt.step()
        return time.perf_counter() - t0

    for _ in range(2):
        step()
    print("ready", flush=True)
    for line in sys.stdin:
        n = int(line)
        print(json.dumps([step() for _ in range(n)]), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs="*", help="two source trees (old, new)")
    p.add_argument("--C", type=int, default=100)
    p.add_argument("--M", type=int, default=4)
    p.add_argument("--n-ctx", dest="n_ctx", type=int, default=16)
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if len(args.trees) != 2:
        p.error("give two source trees: OLD NEW")
    load0 = os.getloadavg()
    procs = []
    for tree in args.trees:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS="1")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--C", str(args.C), "--M", str(args.M),
               "--n-ctx", str(args.n_ctx), "--B", str(args.B)]
        proc = subprocess.Popen(cmd, env=env, cwd=os.path.abspath(tree), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
    for proc in procs:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("a worker failed to start")
    times = [[] for _ in procs]
    for _ in range(args.rounds):
        for i, proc in enumerate(procs):
            proc.stdin.write(f"{args.reps}\n")
            proc.stdin.flush()
            times[i].append(json.loads(proc.stdout.readline()))
    for proc in procs:
        proc.stdin.close()
        proc.wait()
    load1 = os.getloadavg()
    out = {"shape": dict(C=args.C, M=args.M, n_ctx=args.n_ctx, B=args.B, tower="ViT-B-16 text, random"),
           "threads": 1, "reps": args.reps, "rounds": args.rounds,
           "load_before": [round(v, 2) for v in load0], "load_after": [round(v, 2) for v in load1]}
    for name, tree, t in zip(("old", "new"), args.trees, times):
        out[name] = {"tree": os.path.basename(os.path.abspath(tree)), "min_s": round(min(min(r) for r in t), 4),
                     "median_of_round_minima_s": round(statistics.median(min(r) for r in t), 4),
                     "steps_s": [[round(v, 4) for v in r] for r in t]}
    out["new_over_old_min"] = round(out["new"]["min_s"] / out["old"]["min_s"], 4)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
