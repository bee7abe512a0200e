"""The time model of the compiled-code report: counts in, MODELLED microseconds out.

Counts come from traces (benchmarks/compiled_trace.py for the Triton kernels and the torch
ops around them; the reference traced on the meta device here for the eager and
torch.compile baselines); this file holds the stated ceilings and the one rule that turns
a kernel's counts into time:

    modelled_us = launch_us + max(l2_bytes / L2, hbm_bytes / HBM, FLOPs / MMA peak) + latency_us
    latency_us  = waves x rounds x round_us

``rounds`` are the dependent load rounds of a program that no dot hides (loops without a
dot, serial reductions, a pipelined loop's fill), ``waves`` = ceil(grid / (SMs x resident
programs per SM)). Nothing here is measured: the ceilings are sustained rates assumed from
datasheets and public microbenchmarks, stated per card in ``CARDS`` and copied into every
report.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

CARDS = {
    "h100": dict(
        name="H100 SXM5 80GB",
        hbm_tb_s=2.9,        # sustained copy rate; datasheet 3.35 TB/s
        l2_tb_s=5.5,         # L2 -> SM sustained (public microbenchmarks: about 5.5-7 TB/s)
        peak_tflops={"wgmma": 660.0,     # bf16 dense sustained by large cuBLAS GEMMs; datasheet 989
                     "mma.sync": 440.0,  # warp-level MMA: about two thirds of the warpgroup rate
                     "none": 50.0},      # fp32 FMA sustained; datasheet 67
        sms=132, smem_per_sm=233472, regs_per_sm=65536,
        launch_us=1.0,       # back-to-back dependent kernels in one stream, host queueing ahead
        round_us=0.15,       # one dependent global-load round: about 260 cycles (an L2 hit) at 1.75 GHz
        host_op_us=1.0),     # a torch op of the step (cast, fill, sum): one launch of its own
    "h200": dict(
        name="H200 SXM 141GB",
        hbm_tb_s=4.2,        # sustained; datasheet 4.8 TB/s
        l2_tb_s=5.5,         # same GH100 die and clocks as the H100
        peak_tflops={"wgmma": 660.0, "mma.sync": 440.0, "none": 50.0},
        sms=132, smem_per_sm=233472, regs_per_sm=65536,
        launch_us=1.0, round_us=0.15, host_op_us=1.0),
}

# The figure the report gave before issue 26 (commit d2603fc, imagenet, bf16), kept once so
# that the change of model is visible: max(bytes / 4.3 TB/s, FLOPs / 989 TFLOP/s) per kernel,
# every tensor counted once, no latency, no launches, no host ops.
OLD_MODEL = {
    "rule": "per kernel max(bytes / 4.3 TB/s, FLOPs / 989 TFLOP/s); each tensor a kernel touches counted once; "
            "no L2 re-reads, latency, launch cost or host ops; eager one kernel per line of the reference",
    "imagenet": dict(head_fwd_bwd_us={"triton": 15.93, "cuda": 15.88}, eager_fwd_bwd_us=163.38, floor_us=9.28),
}


def resident(regs: Optional[int], smem: Optional[int], num_warps: int, card: dict) -> int:
    """Programs (blocks) of a kernel resident on one SM at once."""
    threads = 32 * num_warps
    limits = [32, 2048 // threads]
    if regs:
        limits.append(card["regs_per_sm"] // (max(regs, 1) * threads))
    if smem:
        limits.append(card["smem_per_sm"] // smem)
    return max(1, min(limits))


def kernel_time(card: dict, *, flops: float, mma: str, l2_bytes: float, hbm_bytes: float, rounds: int, grid: int,
                regs=None, smem=None, num_warps: int = 4) -> dict:
    """{"launch_us", "latency_us", "throughput_us", "modelled_us", "bound"} of one launch on ``card``."""
    terms = {"l2": l2_bytes / (card["l2_tb_s"] * 1e6), "hbm": hbm_bytes / (card["hbm_tb_s"] * 1e6),
             "flops": flops / (card["peak_tflops"][mma] * 1e6)}
    bound = max(terms, key=terms.get)
    waves = math.ceil(max(grid, 1) / (card["sms"] * resident(regs, smem, num_warps, card)))
    latency = waves * rounds * card["round_us"]
    return dict(launch_us=card["launch_us"], latency_us=latency, throughput_us=terms[bound], bound=bound,
                modelled_us=card["launch_us"] + terms[bound] + latency)


def host_op_time(card: dict, op: dict) -> float:
    """A torch op of the step: one launch plus its bytes at the HBM rate (and FLOPs at the FMA rate)."""
    return card["host_op_us"] + max((op["read_bytes"] + op["write_bytes"]) / (card["hbm_tb_s"] * 1e6),
                                    op.get("flops", 0) / (card["peak_tflops"]["none"] * 1e6))


def floor_us(card: dict, C, M, D, B, K, train_x: bool, e=2) -> float:
    """The fewest bytes and FLOPs of the K-free step (SPEC 4.3), forward and backward each
    bounded separately at the card's ceilings: every input read once, every output written
    once per pass, one launch per pass."""
    CM, r = C * M, min(K, D)
    fwd_flops, fwd_bytes = 2 * CM * r * D + 2 * B * C * D, e * (CM * D + B * D + r * D) + 4 * C * r
    bwd_flops = 2 * CM * r * D + 2 * B * C * D * (2 if train_x else 1)
    bwd_bytes = e * (2 * CM * D + B * D * (2 if train_x else 1) + r * D) + 4 * C * r
    total = 0.0
    for flops, nbytes in ((fwd_flops, fwd_bytes), (bwd_flops, bwd_bytes)):
        total += card["launch_us"] + max(nbytes / (card["hbm_tb_s"] * 1e6),
                                         flops / (card["peak_tflops"]["wgmma"] * 1e6))
    return total


# ------------------------------------------------------------------ the reference, traced

MATMULS = {"mm", "addmm", "bmm", "matmul", "baddbmm", "linear"}
REDUCTIONS = {"sum", "mean", "amax", "max", "logsumexp", "norm", "linalg_vector_norm", "_log_softmax",
              "_softmax", "_log_softmax_backward_data", "_softmax_backward_data", "nll_loss_forward",
              "nll_loss_backward", "min", "amin", "var", "std", "prod", "cumsum"}


def trace_reference(sizes: Dict[str, int], train_x: bool, dtype_name: str = "bfloat16") -> List[dict]:
    """The torch ops of one eager reference step (demul_fast.reference.demul_head, direct form
    with phi [K, D]) forward + backward, traced on the meta device: per op its name, the ids
    of its tensor inputs and outputs, their bytes, FLOPs."""
    import torch
    from torch.utils._pytree import tree_leaves
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks.compiled_trace import FREE_OPS, _host_record, _op_name
    from demul_fast import reference as ref

    dtype = getattr(torch, dtype_name)
    C, M, D, B, K = (sizes[k] for k in ("C", "M", "D", "B", "K"))
    meta = dict(device="meta", dtype=dtype)
    T = torch.empty(C, M, D, **meta, requires_grad=True)
    A = torch.empty(C, M, **meta, requires_grad=True)
    X = torch.empty(B, D, **meta, requires_grad=train_x)
    y = torch.empty(B, device="meta", dtype=torch.int64)
    W, b, E = torch.empty(K, D, **meta), torch.empty(K, **meta), torch.empty(C, K, **meta)
    ops: List[dict] = []
    keep = []  # the tensors stay alive, so that ids are not reused
    roots: Dict[int, int] = {}

    def root(t) -> int:
        return roots.get(id(t), id(t))

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            ins = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            outs = [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]
            keep.extend(ins + outs)
            name = _op_name(func)
            if name in FREE_OPS:  # a view: same data as its input
                for o in outs:
                    if ins:
                        roots[id(o)] = root(ins[0])
                return out
            rec = _host_record(func, args, kwargs, out)
            if rec is None:
                return out
            rec.update(ins=[(root(x), x.numel() * x.element_size()) for x in ins if x.dim() > 0],
                       outs=[(id(x), x.numel() * x.element_size()) for x in outs], matmul=name in MATMULS,
                       reduction=name in REDUCTIONS)
            ops.append(rec)
            return out

    with Mode():
        out = ref.demul_head(T, A, X, y, 14.0, E, W, b)
        out.loss.backward()
    return ops


def eager_kernels(ops: List[dict]) -> List[dict]:
    """One kernel per traced op: its tensors read and written once each."""
    return [dict(name=o["op"], flops=o["flops"], bytes=o["read_bytes"] + o["write_bytes"],
                 mma="wgmma" if o["matmul"] else "none", launches=1) for o in ops]


def compile_kernels(ops: List[dict]) -> List[dict]:
    """torch.compile of the same step, modelled: every matmul stays a cuBLAS kernel; the ops
    between two matmuls fuse into one kernel per reduction (at least one) that reads each
    tensor entering the group once and writes only what a later kernel reads."""
    consumers: Dict[int, List[int]] = {}
    for i, o in enumerate(ops):
        for t, _ in o["ins"]:
            consumers.setdefault(t, []).append(i)
    kernels, group = [], []

    def close():
        if not group:
            return
        members = set(group)
        produced = {t for i in group for t, _ in ops[i]["outs"]}
        read = {t: n for i in group for t, n in ops[i]["ins"] if t not in produced}
        written = {t: n for i in group for t, n in ops[i]["outs"]
                   if any(j not in members for j in consumers.get(t, []))}
        kernels.append(dict(name="fused:" + "+".join(ops[i]["op"] for i in group[:4]) + ("..." if len(group) > 4 else ""),
                            flops=sum(ops[i]["flops"] for i in group), bytes=sum(read.values()) + sum(written.values()),
                            mma="none", launches=max(1, sum(ops[i]["reduction"] for i in group))))
        group.clear()

    for i, o in enumerate(ops):
        if o["matmul"]:
            close()
            kernels.append(dict(name=o["op"], flops=o["flops"], bytes=o["read_bytes"] + o["write_bytes"], mma="wgmma",
                                launches=1))
        else:
            group.append(i)
    close()
    return kernels


def baseline_time(card: dict, kernels: List[dict]) -> float:
    """Modelled time of eager/compile kernels: launches plus max(bytes at HBM, FLOPs at peak) each."""
    return sum(k["launches"] * card["launch_us"] + max(k["bytes"] / (card["hbm_tb_s"] * 1e6),
                                                       k["flops"] / (card["peak_tflops"][k["mma"]] * 1e6))
               for k in kernels)
