"""Minimal timing of the reference DeMul head on CPU (replaced by the full harness)."""

import statistics
import time

import torch

import demul_fast as df


def main():
    C, M, D, B, K = 100, 4, 512, 64, 384
    g = torch.Generator().manual_seed(0)
    T = torch.randn(C, M, D, generator=g, requires_grad=True)
    A = torch.zeros(C, M, requires_grad=True)
    X = torch.randn(B, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    E, W = torch.randn(C, K, generator=g), torch.randn(K, D, generator=g)
    times = []
    for i in range(12):
        t0 = time.perf_counter()
        out = df.demul_head(T, A, X, y, 100.0, E, W, None, backend="torch")
        out.loss.backward()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    print(f"torch head fwd+bwd C={C} M={M} D={D} B={B} K={K}: {statistics.median(times) * 1e3:.2f} ms median")


if __name__ == "__main__":
    main()
