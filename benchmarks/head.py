"""The ``head`` suite: the four head functions of docs/SPEC.md section 4, each provider side by side.

Ops are named after the public functions: ``aggregate_prompts``, ``cosine_cross_entropy``,
``prompt_distill_loss``, ``demul_head``. phi and E are frozen, as in DeMul: each input set
carries its ``DistillBasis`` (SPEC 4.3), built when the inputs are made (the one-time cost
is measured apart: ``basis_cost``). Providers:

* ``eager``:   ``demul_fast.reference`` in the run's dtype (the baseline of every ratio; the
  direct form of SPEC 4.1, which multiplies by W in every call);
* ``compile``: ``torch.compile`` of the same reference function;
* ``torch``, ``triton``, ``cuda``: ``demul_fast.<op>(..., backend=name, distill_basis=basis)``
  (the K-free form where the backend takes the basis), when the backend can run on this
  device and dtype (``demul_fast.ops.backends.why_not``);
* ``liger`` (``prompt_distill_loss`` only): Liger-Kernel's ``LigerFusedLinearCosineSimilarityLoss``.
  Its student is a linear layer over hidden states and its loss is 1 - cos between the
  student's and a teacher's outputs; here the student input is t^ = normalize(T) as
  [C*M, D] (normalised inside the timed call, so dT flows back through it), the student
  weight and bias are phi's W [K, D] and b, and the teacher's outputs must equal e[c] for
  each of the row's class: teacher input one-hot(class) [C*M, C] with teacher weight
  E^T [K, C] when C <= K, else E repeated per prompt [C*M, K] with the identity [K, K]
  (the smaller teacher product; it is work Liger does that the fused op does not need).
  weight_hard_loss=0, weight_soft_loss=1, beta=1, temperature=1, all labels valid: the
  loss is sum(1 - cos) / (C*M), exactly L_dist. Liger computes the gradients inside its
  forward (chunk by chunk), so its ``fwd`` row holds the gradient work and its ``bwd`` row
  is nearly free: compare ``fwd+bwd``. It also computes dW and db, which the fused op
  skips (phi is frozen).
* ``cce`` (``cosine_cross_entropy`` only, CUDA, label_smoothing 0): Apple's cut-cross-entropy
  ``linear_cross_entropy(e, c, targets)`` with e = scale * normalize(X) [B, D] (computed in
  the timed call), c = the class features [C, D], ``filter_eps=None`` (no gradient
  filtering: exact), mean reduction: exactly L_ce.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import time
from typing import Dict

import torch

import demul_fast
from demul_fast import reference as ref
from demul_fast.ops.backends import why_not

from .floors import basis_flops, head_cost
from .workload import Inputs, Provider, Workload, gold_inputs, unavailable

OPS = ("aggregate_prompts", "cosine_cross_entropy", "prompt_distill_loss", "demul_head")
GRAD_NAMES = {"aggregate_prompts": ("T", "A"), "cosine_cross_entropy": ("U",), "prompt_distill_loss": ("T",),
              "demul_head": ("T", "A")}
DISTILL_OPS = ("prompt_distill_loss", "demul_head")
SCALE = 100.0


def make_inputs(sizes: Dict[str, int], dtype: torch.dtype, device: torch.device, seed: int,
                op: str) -> Inputs:
    """Random inputs of the head (never zeros): T [C,M,D], A [C,M], X [B,D], y [B],
    U [C,D] (unit rows), E [C,K], W [K,D], b [K], G [C,D] (aggregate_prompts' output
    gradient), and for the distillation ops the frozen phi/E's ``basis`` (SPEC 4.3)."""
    C, M, D, B, K = (sizes[k] for k in ("C", "M", "D", "B", "K"))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    inputs = {
        "T": rnd(C, M, D), "A": rnd(C, M, std=0.5), "X": rnd(B, D),
        "y": torch.randint(0, C, (B,), generator=g).to(device),
        "U": torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=-1).to(device=device, dtype=dtype),
        "E": rnd(C, K), "W": rnd(K, D, std=1 / math.sqrt(D)), "b": rnd(K, std=0.1), "G": rnd(C, D),
        "scale": SCALE, "ls": float(sizes.get("label_smoothing", 0.0)), "alpha": 1.0,
    }
    if op in DISTILL_OPS:
        inputs["basis"] = demul_fast.build_distill_basis(inputs["W"], inputs["b"], inputs["E"])
    for name in GRAD_NAMES[op]:
        inputs[name].requires_grad_(True)
    return inputs


def _args(op: str, i: Inputs):
    """Positional arguments of the reference/functional signature of ``op``."""
    if op == "aggregate_prompts":
        return (i["T"], i["A"])
    if op == "cosine_cross_entropy":
        return (i["X"], i["U"], i["y"], i["scale"], i["ls"])
    if op == "prompt_distill_loss":
        return (i["T"], i["W"], i["b"], i["E"])
    return (i["T"], i["A"], i["X"], i["y"], i["scale"], i["E"], i["W"], i["b"], i["alpha"], i["ls"])


REFERENCE = {op: getattr(ref, op) for op in OPS}
FUNCTIONAL = {op: getattr(demul_fast, op) for op in OPS}


def outputs(op: str, result) -> Dict[str, torch.Tensor]:
    if op == "aggregate_prompts":
        return {"U": result}
    if op == "demul_head":
        return {"loss": result.loss, "ce": result.ce_loss, "distill": result.distill_loss}
    return {"loss": result}


def root(op: str, result, inputs: Inputs):
    if op == "aggregate_prompts":
        return result, inputs["G"]
    if op == "demul_head":
        return result.loss, None
    return result, None


def _gold(op: str, gold_dtype: torch.dtype, inputs: Inputs) -> Dict[str, torch.Tensor]:
    gi = gold_inputs(inputs, gold_dtype, GRAD_NAMES[op])
    result = REFERENCE[op](*_args(op, gi))
    out = outputs(op, result)
    r, g = root(op, result, gi)
    r.backward(g)
    out.update({f"grad:{n}": gi[n].grad for n in GRAD_NAMES[op]})
    return {k: v.detach() for k, v in out.items()}


# -- providers ---------------------------------------------------------------------------

def _compile_provider(op: str, device: torch.device, allow_compile: bool) -> Provider:
    if not allow_compile:
        return unavailable("compile", "torch.compile is off for this run (on a CPU it costs about a minute "
                                      "per graph: pass --compile to include it)")
    compiled = torch.compile(REFERENCE[op])
    return Provider("compile", lambda i: compiled(*_args(op, i)), note="torch.compile(reference), default mode")


def _interpret_requested() -> bool:
    """run.py --interpret: triton rows on a CPU under the interpreter (wiring checks only)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("DEMUL_FAST_BENCH_INTERPRET") == "1"


def _backend_provider(op: str, name: str, device: torch.device, dtype: torch.dtype) -> Provider:
    reason = why_not(name, device, dtype)
    if reason is None and name == "triton" and device.type != "cuda" and not _interpret_requested():
        reason = "the Triton interpreter is a correctness tool, not a performance path (needs a CUDA device)"
    if reason is not None:
        return unavailable(name, reason)
    fn = functools.partial(FUNCTIONAL[op], backend=name)
    if op in DISTILL_OPS:
        return Provider(name, lambda i: fn(*_args(op, i), distill_basis=i["basis"]),
                        note=f"demul_fast.{op}(backend={name!r}, distill_basis=basis)")
    return Provider(name, lambda i: fn(*_args(op, i)), note=f"demul_fast.{op}(backend={name!r})")


def _import(module: str):
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # noqa: BLE001 - reported as the skip reason
        return None, f"{module} is not importable ({type(exc).__name__}: {exc}); it is an optional peer"


def _liger_provider(sizes, device: torch.device, dtype: torch.dtype) -> Provider:
    mod, reason = _import("liger_kernel.chunked_loss")
    if mod is None:
        return unavailable("liger", reason)
    loss_cls = getattr(mod, "LigerFusedLinearCosineSimilarityLoss", None)
    if loss_cls is None:
        return unavailable("liger", "this liger_kernel has no LigerFusedLinearCosineSimilarityLoss")
    C, M, K = sizes["C"], sizes["M"], sizes["K"]
    loss_fn = loss_cls(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, temperature=1.0,
                       compiled=device.type == "cuda")
    teachers: Dict[int, tuple] = {}

    def teacher(i: Inputs):
        key = id(i["E"])
        if key not in teachers:  # built once per input set, outside the timed calls after the first
            E = i["E"].detach()
            rows = torch.arange(C, device=device).repeat_interleave(M)
            if C <= K:
                t_in = torch.nn.functional.one_hot(rows, C).to(dtype)
                t_w = E.t().contiguous()
            else:
                t_in = E[rows].contiguous()
                t_w = torch.eye(K, device=device, dtype=dtype)
            labels = torch.zeros(C * M, dtype=torch.long, device=device)
            teachers[key] = (t_in, t_w, labels)
        return teachers[key]

    def fn(i: Inputs):
        t_in, t_w, labels = teacher(i)
        t_hat = ref.l2_normalize(i["T"]).reshape(C * M, -1)
        return loss_fn(t_hat, i["W"], t_in, t_w, labels, i["b"])

    note = "teacher one-hot x E^T" if C <= K else "teacher E x identity"
    return Provider("liger", fn, note=f"LigerFusedLinearCosineSimilarityLoss, {note} (see benchmarks/head.py)")


def _cce_provider(sizes, device: torch.device) -> Provider:
    if device.type != "cuda":
        return unavailable("cce", "cut-cross-entropy needs a CUDA device")
    if float(sizes.get("label_smoothing", 0.0)) != 0.0:
        return unavailable("cce", "cut-cross-entropy has no label smoothing")
    mod, reason = _import("cut_cross_entropy")
    if mod is None:
        return unavailable("cce", reason)

    def fn(i: Inputs):
        e = ref.l2_normalize(i["X"]) * i["scale"]
        return mod.linear_cross_entropy(e, i["U"], i["y"], filter_eps=None)

    return Provider("cce", fn, note="cut_cross_entropy.linear_cross_entropy(scale*normalize(X), U, y, filter_eps=None)")


def providers(op: str, sizes, device: torch.device, dtype: torch.dtype, allow_compile: bool):
    out = [Provider("eager", lambda i: REFERENCE[op](*_args(op, i)), note="demul_fast.reference, run dtype"),
           _compile_provider(op, device, allow_compile),
           _backend_provider(op, "torch", device, dtype),
           _backend_provider(op, "triton", device, dtype),
           _backend_provider(op, "cuda", device, dtype)]
    if op == "prompt_distill_loss":
        out.append(_liger_provider(sizes, device, dtype))
    if op == "cosine_cross_entropy":
        out.append(_cce_provider(sizes, device))
    return out


def workloads(sizes: Dict[str, int], dtype: torch.dtype, device: torch.device, *, ops=OPS,
              allow_compile: bool = False):
    """One Workload per head op at ``sizes`` (C, M, D, B, K, label_smoothing)."""
    C, M, D, B, K = (sizes[k] for k in ("C", "M", "D", "B", "K"))
    e = torch.empty((), dtype=dtype).element_size()
    gold_dtype = torch.float64
    out = []
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown head op {op!r}; choose from {', '.join(OPS)}")
        n_bytes = {"aggregate_prompts": C * M * D + C * M, "cosine_cross_entropy": B * D + C * D,
                   "prompt_distill_loss": C * M * D + K * D + K + C * K,
                   "demul_head": C * M * D + C * M + B * D + K * D + K + C * K}[op] * e
        out.append(Workload(
            suite="head", op=op, sizes=dict(sizes), dtype=dtype, device=device,
            make_inputs=functools.partial(make_inputs, sizes, dtype, device, op=op),
            outputs=functools.partial(outputs, op), root=functools.partial(root, op),
            gold=functools.partial(_gold, op, gold_dtype),
            cost=lambda mode, op=op: head_cost(op, mode, C, M, D, B, K, e),
            input_bytes=n_bytes, grad_names=GRAD_NAMES[op],
            providers=providers(op, sizes, device, dtype, allow_compile), gold_dtype=gold_dtype))
    return out


def basis_cost(sizes: Dict[str, int], device: torch.device, reps: int = 3) -> Dict[str, float]:
    """The one-time cost of the frozen-phi basis (SPEC 4.3) at ``sizes`` (C, D, K), measured:
    ``build_distill_basis`` (QR of W [K, D] and F = E^ Q in float64) from float32 W, b, E.

    returns {"ms": median wall time, "basis_mb": what the basis keeps, "peak_mb": peak memory
    of the build above its inputs (CUDA; None on a CPU), "gflop": the float64 work counted by
    benchmarks.floors.basis_cost}
    """
    C, D, K = sizes["C"], sizes["D"], sizes["K"]
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(K, D, generator=g) / math.sqrt(D)).to(device)
    b, E = (0.1 * torch.randn(K, generator=g)).to(device), torch.randn(C, K, generator=g).to(device)
    times = []
    peak = None
    for rep in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        basis = demul_fast.build_distill_basis(W, b, E)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        if rep:  # the first call is a warm-up
            times.append(time.perf_counter() - t0)
    kept = sum(t.numel() * t.element_size() for t in basis) / 2**20
    return {"ms": 1e3 * sorted(times)[len(times) // 2], "basis_mb": kept, "peak_mb": peak,
            "gflop": basis_flops(C, D, K) / 1e9}
