"""One-minute GPU smoke test of the Triton head (the first stage of benchmarks/gpu_check.sh).

    python benchmarks/gpu_smoke.py --out DIR

1. every Triton op once at small odd shapes in float32, bfloat16 and float16, forward and
   gradients against the float64 reference (relative error, the error of the plain
   reference in that dtype beside it);
2. the head at the imagenet preset in bfloat16: fwd+bwd timed with CUDA events (median of
   warm repeats), and one profiled step listing every kernel's measured device time, to set
   beside the modelled times of benchmarks/compiled.py.
Each line is appended to DIR/smoke.txt as soon as it is known (partial results survive a
time-out). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demul_fast import reference as ref  # noqa: E402
from demul_fast.ops import triton_ops  # noqa: E402
from demul_fast.ops.distill_basis import build_distill_basis  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Log:
    def __init__(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "smoke.txt")

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def inputs(C, M, D, B, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).cuda()  # noqa: E731
    T, A, X, E = r(C, M, D), r(C, M), r(B, D), r(C, K)
    W, b = r(K, D, scale=1 / math.sqrt(D)), r(K, scale=0.5)
    y = torch.randint(0, C, (B,), generator=g).cuda()
    return T, A, X, y, E, W, b


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def head_grads(fn, T, A, X, dtype):
    t, a, x = (v.detach().to(dtype).requires_grad_(True) for v in (T, A, X))
    out = fn(t, a, x)
    out.loss.backward()
    return [out.loss, out.ce_loss, out.distill_loss, t.grad, a.grad, x.grad]


def correctness(log) -> bool:
    T, A, X, y, E, W, b = inputs(C=37, M=3, D=100, B=5, K=70)
    basis = build_distill_basis(W, b, E)
    names = ["loss", "ce", "dist", "dT", "dA", "dX"]
    gold = head_grads(lambda t, a, x: ref.demul_head(t, a, x, y, 17.0, E, W, b, 0.7, 0.1), T, A, X, torch.float64)
    ok = True
    for dtype in DTYPES:
        fast = head_grads(lambda t, a, x: triton_ops.demul_head(t, a, x, y, 17.0, basis, 0.7, 0.1), T, A, X, dtype)
        frozen = [v.to(dtype) for v in (E, W, b)]
        plain = head_grads(lambda t, a, x, fz=frozen: ref.demul_head(t, a, x, y, 17.0, *fz, 0.7, 0.1), T, A, X, dtype)
        for name, f, p, g in zip(names, fast, plain, gold):
            ef, ep = rel(f, g), rel(p, g)
            bad = not math.isfinite(ef) or ef > 3 * ep + 4 * torch.finfo(dtype).eps
            ok &= not bad
            log(f"correct {str(dtype):15} {name:5} triton {ef:.2e} plain {ep:.2e} {'FAIL' if bad else 'ok'}")
    return ok


def timings(log) -> None:
    C, M, D, B, K = 1000, 8, 512, 256, 3072
    T, A, X, y, E, W, b = inputs(C, M, D, B, K)
    basis = build_distill_basis(W, b, E)
    bf = torch.bfloat16
    t, a, x = (v.to(bf).requires_grad_(True) for v in (T, A, X))

    def step():
        out = triton_ops.demul_head(t, a, x, y, 100.0, basis, 1.0, 0.0)
        out.loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(50):
        t.grad = a.grad = x.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    log(f"measured imagenet bf16 demul_head fwd+bwd: median {times[len(times) // 2]:.1f} us "
        f"(p20 {times[10]:.1f}, p80 {times[40]:.1f}; 50 repeats, one input set: L2-warm)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            log(f"measured kernel {ev.key[:60]:60} x{ev.count} {ev.device_time_total:.1f} us")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    log = Log(args.out)
    log(f"device {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    ok = correctness(log)
    timings(log)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
