"""Lower bounds ("floors") for the benchmark rows, and the device ceilings they divide by.

A row's floor is ``max(bytes / bandwidth, flops / matmul_rate)``: the fewest bytes the
operation must move through memory (each input read once, each output written once) over
the measured copy bandwidth, and its arithmetic over the measured matrix-product rate, on
the device and in the dtype of the run. Both ceilings are measured at the start of a run
(``measure_ceilings``): a large device copy (bytes read + bytes written) and a large square
matrix product. Each count below is a lower bound, chosen independently (the FLOPs assume
nothing is recomputed, the bytes assume nothing intermediate is stored), so the floor is a
bound no implementation beats, not a prediction.

``fwd+bwd`` floors are the sum of the ``fwd`` and ``bwd`` floors: the backward is a separate
call that reads its inputs again. Losses are float32 (4 bytes); other tensors are in the
input dtype (``e`` bytes per element); labels are int64.

Head (SPEC.md section 4; C classes, M prompts, D dim, B images, K LLM dim):

=================  ==========================================  ===============================
op / mode          bytes                                       FLOPs
=================  ==========================================  ===============================
aggregate fwd      e(CMD + CM + CD)                            5CMD + 4CD
aggregate bwd      e(CMD + CM + CD) read, e(CMD + CM) written  10CMD + 6CD
cross_entropy fwd  e(BD + CD) + 8B                             2BCD + 6BC + 3BD
cross_entropy bwd  e(BD + CD) + 8B read, eCD written           2BCD + 4BC
distill fwd        e(CMD + KD + K + CK)                        2CMDK + 6CMK + 3CMD
distill bwd        e(CMD + KD + K + CK) read, eCMD written      2CMDK + 8CMK + 6CMD
head fwd           sum of the three fwd reads (T read once)    sum of the three
head bwd           sum of the reads, e(CMD + CM) written       sum of the three
=================  ==========================================  ===============================

The text encoder's floor (``encoder_cost``) counts the work of the exact prefix-shared
computation of SPEC.md section 3.1, whatever the provider: the prefix ([SOT] + context) once
per prompt, each class's suffix once per prompt, attention over exactly the keys each query
sees; the backward computes activation gradients only (the CLIP weights are frozen), the
same matrix FLOPs as the forward. Bytes: the frozen weights read once, ``ctx`` read and ``T``
written (and their gradients in the backward).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class Cost:
    """What one call must at least move and compute."""

    bytes: float
    flops: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.bytes + other.bytes, self.flops + other.flops)


@dataclass(frozen=True)
class Ceilings:
    """Measured device ceilings: copy bandwidth (bytes/s) and matrix-product rate (FLOP/s)."""

    bandwidth: float
    matmul_rate: float
    copy_bytes: int
    matmul_n: int
    dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Floor:
    """A row's floor: the memory term, the arithmetic term, the larger of the two."""

    memory_s: float
    compute_s: float

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def floor(cost: Cost, ceilings: Ceilings) -> Floor:
    return Floor(cost.bytes / ceilings.bandwidth, cost.flops / ceilings.matmul_rate)


def fraction_of_floor(measured_s: float, fl: Floor) -> float:
    """floor / measured: 1.0 means the row runs at the floor, 0.1 ten times slower."""
    return fl.seconds / measured_s if measured_s > 0 else float("nan")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def head_cost(op: str, mode: str, C: int, M: int, D: int, B: int, K: int, e: int,
              with_distill: bool = True) -> Cost:
    """Lower-bound bytes and FLOPs of a head op (table in the module docstring).

    op: aggregate | cross_entropy | distill | head; mode: fwd | bwd | fwd+bwd; e: bytes per
    element of the input dtype.
    """
    if mode == "fwd+bwd":
        return (head_cost(op, "fwd", C, M, D, B, K, e, with_distill)
                + head_cost(op, "bwd", C, M, D, B, K, e, with_distill))
    if mode not in ("fwd", "bwd"):
        raise ValueError(f"mode must be fwd, bwd or fwd+bwd, got {mode!r}")
    fwd = mode == "fwd"
    if op == "aggregate":
        read = e * (C * M * D + C * M + (0 if fwd else C * D))
        written = e * C * D if fwd else e * (C * M * D + C * M)
        return Cost(read + written, 5 * C * M * D + 4 * C * D if fwd else 10 * C * M * D + 6 * C * D)
    if op == "cross_entropy":
        read = e * (B * D + C * D) + 8 * B
        written = 4 if fwd else e * C * D
        flops = 2 * B * C * D + 6 * B * C + 3 * B * D if fwd else 2 * B * C * D + 4 * B * C
        return Cost(read + written, flops)
    if op == "distill":
        read = e * (C * M * D + K * D + K + C * K)
        written = 4 if fwd else e * C * M * D
        flops = (2 * C * M * D * K + 6 * C * M * K + 3 * C * M * D if fwd
                 else 2 * C * M * D * K + 8 * C * M * K + 6 * C * M * D)
        return Cost(read + written, flops)
    if op == "head":
        # T is read once for aggregation and distillation together.
        read = e * (C * M * D + C * M + B * D) + 8 * B
        flops = (5 * C * M * D + 4 * C * D) if fwd else (10 * C * M * D + 6 * C * D)
        flops += 2 * B * C * D + (6 * B * C + 3 * B * D if fwd else 4 * B * C)
        if with_distill:
            read += e * (K * D + K + C * K)
            flops += (6 * C * M * K + 3 * C * M * D + 2 * C * M * D * K if fwd
                      else 8 * C * M * K + 6 * C * M * D + 2 * C * M * D * K)
        written = 3 * 4 if fwd else e * (C * M * D + C * M)
        return Cost(read + written, flops)
    raise ValueError(f"unknown head op {op!r}")


def encoder_cost(mode: str, *, n_prompts: int, n_ctx: int, suffix_lengths: Sequence[int],
                 width: int, layers: int, embed_dim: int, weight_bytes: int, e: int,
                 mlp_ratio: float = 4.0) -> Cost:
    """Lower-bound cost of computing T [C, M, D] (and d ctx) by exact prefix sharing.

    suffix_lengths: per class, the tokens after the context up to and including EOT.
    weight_bytes: bytes of the text tower's weights (read once per pass).
    """
    if mode == "fwd+bwd":
        kw = dict(n_prompts=n_prompts, n_ctx=n_ctx, suffix_lengths=suffix_lengths, width=width,
                  layers=layers, embed_dim=embed_dim, weight_bytes=weight_bytes, e=e,
                  mlp_ratio=mlp_ratio)
        return encoder_cost("fwd", **kw) + encoder_cost("bwd", **kw)
    if mode not in ("fwd", "bwd"):
        raise ValueError(f"mode must be fwd, bwd or fwd+bwd, got {mode!r}")
    M, P, w = n_prompts, n_ctx + 1, width
    C = len(suffix_lengths)
    tokens = M * P + M * sum(suffix_lengths)
    # keys seen by each query: prefix positions 1..P, suffix position j sees P + j keys
    keys = M * P * (P + 1) // 2 + M * sum(P * s + s * (s + 1) // 2 for s in suffix_lengths)
    per_token_linear = 2 * (4 * w * w + 2 * mlp_ratio * w * w)  # qkv + out proj + MLP
    flops = layers * (tokens * per_token_linear + 4 * w * keys) + 2 * C * M * w * embed_dim
    io = e * (M * n_ctx * w + C * M * embed_dim)  # ctx in, T out (or dT in, d ctx out)
    return Cost(weight_bytes + io, flops)


def _time_call(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def measure_ceilings(device: torch.device, dtype: torch.dtype, copy_bytes: Optional[int] = None,
                     matmul_n: Optional[int] = None, reps: int = 5) -> Ceilings:
    """Measure copy bandwidth and matrix-product rate on ``device`` in ``dtype``.

    GPU defaults: a 1 GiB copy and an 8192^3 product; CPU: 64 MiB and 1024^3 (CPU matrix
    products in bfloat16/float16 are slow, so that size keeps the start of a run short).
    Random data, never zeros (zeros can run faster than real data).
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    copy_bytes = copy_bytes or (1 << 30 if gpu else 64 << 20)
    matmul_n = matmul_n or (8192 if gpu else 1024)
    src = torch.rand(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t_copy = _time_call(lambda: dst.copy_(src), device, reps)
    del src, dst
    a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    bm = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    t_mm = _time_call(lambda: a @ bm, device, reps)
    del a, bm
    return Ceilings(bandwidth=2 * copy_bytes / t_copy, matmul_rate=2 * matmul_n ** 3 / t_mm,
                    copy_bytes=copy_bytes, matmul_n=matmul_n, dtype=str(dtype).replace("torch.", ""))


def describe(c: Ceilings) -> str:
    return (f"ceilings: copy {c.bandwidth / 1e9:.1f} GB/s ({c.copy_bytes >> 20} MiB, read+write), "
            f"matmul {c.matmul_rate / 1e12:.3f} TFLOP/s ({c.matmul_n}^3 {c.dtype})")


__all__ = ["Cost", "Ceilings", "Floor", "floor", "fraction_of_floor", "head_cost",
                              "encoder_cost", "measure_ceilings", "element_size", "describe"]
