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

Head (docs/SPEC.md section 4; C classes, M prompts, D dim, B images, K LLM dim). phi and E are
frozen, so the distillation's floor is the K-free form of SPEC 4.3 (r = min(K, D)): it
reads T and the float32 basis R [r, D], c [r], F [C, r], delta [C], beta (``4 basis`` =
4(rD + r + Cr + C + 1) bytes) and multiplies [C*M, D] by [D, r], never by W [K, D]:

=======================  ===========================================  ============================
op / mode                bytes                                        FLOPs
=======================  ===========================================  ============================
aggregate_prompts fwd    e(CMD + CM + CD)                             5CMD + 4CD
aggregate_prompts bwd    e(CMD + CM + CD) read, e(CMD + CM) written   10CMD + 6CD
cosine_cross_entropy f.  e(BD + CD) + 8B                              2BCD + 6BC + 3BD
cosine_cross_entropy b.  e(BD + CD) + 8B read, eCD written            2BCD + 4BC
prompt_distill_loss fwd  eCMD + 4 basis                               2CMDr + 6CMr + 3CMD
prompt_distill_loss bwd  eCMD + 4 basis read, eCMD written            2CMDr + 8CMr + 6CMD
demul_head fwd           sum of the three fwd reads (T read once)     sum of the three
demul_head bwd           sum of the reads, e(CMD + CM) written        sum of the three
=======================  ===========================================  ============================

(The direct form of SPEC 4.1 does 2CMDK where these count 2CMDr: 6x more at K=3072,
D=512.) The basis itself is a one-time cost, reported apart (``basis_flops``): a
Householder QR of W [K, D] and forming Q, about 4KDr - 4r^3/3 FLOPs, and F = E^ Q, 2CKr,
in float64.

The text encoder's floor (``encoder_cost``) counts the work of the exact prefix-shared
computation of docs/SPEC.md section 3.1, whatever the provider: the prefix ([SOT] + context) once
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

    op: aggregate_prompts | cosine_cross_entropy | prompt_distill_loss | demul_head;
    mode: fwd | bwd | fwd+bwd; e: bytes per element of the input dtype.
    """
    if mode == "fwd+bwd":
        return (head_cost(op, "fwd", C, M, D, B, K, e, with_distill)
                + head_cost(op, "bwd", C, M, D, B, K, e, with_distill))
    if mode not in ("fwd", "bwd"):
        raise ValueError(f"mode must be fwd, bwd or fwd+bwd, got {mode!r}")
    fwd = mode == "fwd"
    r = min(K, D)
    basis_bytes = 4 * (r * D + r + C * r + C + 1)
    distill_flops = (2 * C * M * D * r + 6 * C * M * r + 3 * C * M * D if fwd
                     else 2 * C * M * D * r + 8 * C * M * r + 6 * C * M * D)
    if op == "aggregate_prompts":
        read = e * (C * M * D + C * M + (0 if fwd else C * D))
        written = e * C * D if fwd else e * (C * M * D + C * M)
        return Cost(read + written, 5 * C * M * D + 4 * C * D if fwd else 10 * C * M * D + 6 * C * D)
    if op == "cosine_cross_entropy":
        read = e * (B * D + C * D) + 8 * B
        written = 4 if fwd else e * C * D
        flops = 2 * B * C * D + 6 * B * C + 3 * B * D if fwd else 2 * B * C * D + 4 * B * C
        return Cost(read + written, flops)
    if op == "prompt_distill_loss":
        written = 4 if fwd else e * C * M * D
        return Cost(e * C * M * D + basis_bytes + written, distill_flops)
    if op == "demul_head":
        # T is read once for aggregation and distillation together.
        read = e * (C * M * D + C * M + B * D) + 8 * B
        flops = (5 * C * M * D + 4 * C * D) if fwd else (10 * C * M * D + 6 * C * D)
        flops += 2 * B * C * D + (6 * B * C + 3 * B * D if fwd else 4 * B * C)
        if with_distill:
            read += basis_bytes
            flops += distill_flops
        written = 3 * 4 if fwd else e * (C * M * D + C * M)
        return Cost(read + written, flops)
    raise ValueError(f"unknown head op {op!r}")


def basis_flops(C: int, D: int, K: int) -> float:
    """float64 FLOPs of building the frozen-phi basis once (SPEC 4.3): the QR of W [K, D]
    with Q formed (about 4KDr - 4r^3/3) and F = E^ Q (2CKr), r = min(K, D)."""
    r = min(K, D)
    return 4 * K * D * r - 4 * r ** 3 / 3 + 2 * C * K * r


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
