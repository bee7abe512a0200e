"""A modelled (not measured) time of one DeMul training step on an H100 and an H200 (docs/step.md).

    python benchmarks/step_model.py                        # reads the counted rows, prints the tables
    python benchmarks/step_model.py --counts benchmarks/results/step-cpu.jsonl --json out.json

For each workload (C classes, ViT-B/16 text and image towers, M=4 prompts, n_ctx=16, B=32,
K=3072, bfloat16) and each way of running the step it gives where the time goes:

    image   the frozen image tower's forward over the batch (224 px, 197 tokens)
    text    the text tower's forward and backward (backward: activations only, the tower is frozen)
    head    the DeMul head forward and backward (benchmarks/floors.head_cost)
    optim   the SGD update of ctx and the prompt logits
    launch  host time of the kernel launches that the device does not hide

Ways: ``reference`` (the full-length CoOp encoder, C*M prompts of 77 tokens, eager),
``eager`` (DeMul, eager), ``compiled`` (DeMul under torch.compile, inductor's launcher),
``graphs`` (compiled and replayed as CUDA graphs: ``--compile reduce-overhead``).

The model, per component: device time = max(FLOPs / matmul rate, bytes / bandwidth) (the
same bytes for every way: it does not credit compiled code with its fusion, so it favours
eager; the text FLOPs are those of the products each way's code runs:
``text_linear_adjustment``), plus a device-side cost per kernel (its start and tail) of
``kernel_gap_us`` each. Host time = launches x the per-launch host cost of the way (one
graph launch per graph when replayed). The step takes max(device, host): the host runs
ahead of the device while it can (eager PyTorch is asynchronous), so a step is either
launch-bound or device-bound. Launch counts are *counted* (benchmarks/launches.py: eager
by dispatch, compiled from inductor's generated code, on a CPU; rows of ``run.py --suite
step --count-only``); FLOPs and bytes are *counted* from the shapes; the constants below
are stated ceilings, so every time here is *modelled*.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here] + [os.path.dirname(_here)]

from benchmarks.floors import Cost, encoder_cost, head_cost  # noqa: E402


@dataclass(frozen=True)
class Machine:
    name: str
    matmul_tflops: float  # sustained bf16 dense matmul rate
    bandwidth_tbs: float  # sustained HBM bandwidth
    eager_launch_us: float = 5.0  # host cost of one eager PyTorch op (dispatch + launch)
    compiled_launch_us: float = 3.0  # host cost of one launch from inductor's Python wrapper
    graph_launch_us: float = 10.0  # host cost of replaying one CUDA graph
    kernel_gap_us: float = 1.0  # device-side cost of each kernel (start, tail), also inside a graph


MACHINES = {
    "H100": Machine("H100 SXM", matmul_tflops=650.0, bandwidth_tbs=2.8),
    "H200": Machine("H200 SXM", matmul_tflops=650.0, bandwidth_tbs=4.0),
}

# ViT-B/16 (open_clip): the shapes the step suite counts at
TEXT = dict(width=512, layers=12, embed_dim=512, params=37_828_608, context=77)
IMAGE = dict(params=85_798_656, tokens=197, width=768, layers=12)
SIZES = dict(M=4, n_ctx=16, B=32, K=3072, D=512, e=2)
WAYS = ("reference", "eager", "compiled", "graphs")
ACT_ELEMS = 16  # activation elements read+written per token, layer and pass (qkv, attention, MLP, norms)


def text_linear_adjustment(suffix_lengths: List[int], way: str) -> int:
    """FLOPs (forward + backward) by which DeMul's text tower differs from
    ``floors.encoder_cost`` (every packed row through every linear layer), counted from the
    shapes of what the code runs (``demul_fast/text_encoder.py``, ``prefix_attention.py``):

    * every way: the last layer runs out_proj and the MLP on the C*M EOT rows only
      (``_layer_forward``'s last branch): minus the other rows' 9 W^2 multiply-adds each;
    * compiled ways (``compiled``, ``graphs``): layer 0's ln_1 and q/k/v run on the M*P
      prefix rows and one prompt's suffix rows (the suffix is the same for the M prompts
      before layer 0: ``PackedLayout.shared_suffix_maps``): minus (M - 1) * sum(len) rows of
      3 W^2. (out_proj runs on the T packed rows again: the attention is the custom op
      ``demul_fast::prefix_attention``, which writes packed rows; before it, out_proj ran on
      the one-call attention's B*S query slots, (B*S - T) more rows in 11 layers.)

    The backward of a frozen tower computes input gradients only: the same products again.
    Attention scores and layer norms are not adjusted (under 1 % of the text FLOPs here)."""
    M, n_ctx = SIZES["M"], SIZES["n_ctx"]
    w, layers = TEXT["width"], TEXT["layers"]
    C, P = len(suffix_lengths), n_ctx + 1
    tokens = M * P + M * sum(suffix_lengths)
    per_pass = -(tokens - C * M) * 2 * 9 * w * w
    if way in ("compiled", "graphs"):
        per_pass += -(M - 1) * sum(suffix_lengths) * 2 * 3 * w * w
    return 2 * per_pass


def text_cost(suffix_lengths: List[int], full: bool, way: Optional[str] = None) -> Cost:
    """FLOPs and bytes of the text tower's forward + backward over C classes x M prompts:
    prefix-shared (floors.encoder_cost, adjusted to what the code of ``way`` runs:
    ``text_linear_adjustment``; way None: not adjusted) or full length (C*M sequences of 77
    tokens, every position attending to its causal past), plus the activation traffic."""
    M, n_ctx, e = SIZES["M"], SIZES["n_ctx"], SIZES["e"]
    w, layers, L = TEXT["width"], TEXT["layers"], TEXT["context"]
    C = len(suffix_lengths)
    if full:
        tokens = C * M * L
        keys = C * M * L * (L + 1) // 2
        per_token = 2 * (4 * w * w + 8 * w * w)
        flops = layers * (tokens * per_token + 4 * w * keys) + 2 * C * M * w * TEXT["embed_dim"]
        cost = Cost(2 * e * TEXT["params"], 2 * flops)
    else:
        cost = encoder_cost("fwd+bwd", n_prompts=M, n_ctx=n_ctx, suffix_lengths=suffix_lengths, width=w,
                            layers=layers, embed_dim=TEXT["embed_dim"], weight_bytes=e * TEXT["params"], e=e)
        if way is not None:
            cost = cost + Cost(0, text_linear_adjustment(suffix_lengths, way))
        tokens = M * (n_ctx + 1) + M * sum(suffix_lengths)
    return cost + Cost(3 * e * ACT_ELEMS * tokens * layers * w, 0)  # fwd once, bwd twice


def image_cost() -> Cost:
    B, e = SIZES["B"], SIZES["e"]
    t, w, layers = IMAGE["tokens"], IMAGE["width"], IMAGE["layers"]
    flops = 2 * IMAGE["params"] * t * B + layers * B * 4 * w * t * t
    return Cost(e * (IMAGE["params"] + B * 3 * 224 * 224) + e * ACT_ELEMS * B * t * layers * w, flops)


def optim_cost(C: int) -> Cost:
    n = SIZES["M"] * SIZES["n_ctx"] * TEXT["width"] + C * SIZES["M"]
    return Cost(4 * 4 * n, 4 * n)  # float32 param, grad, momentum read, param + momentum written


def device_ms(cost: Cost, m: Machine) -> float:
    return max(cost.flops / (m.matmul_tflops * 1e12), cost.bytes / (m.bandwidth_tbs * 1e12)) * 1e3


@dataclass
class Breakdown:
    machine: str
    C: int
    way: str
    image_ms: float
    text_ms: float
    head_ms: float
    optim_ms: float
    kernels: int
    kernel_gap_ms: float
    host_ms: float
    step_ms: float
    bound: str
    step_ms_features: float  # the same step from given image features (no image tower)


def breakdown(m: Machine, C: int, way: str, suffix_lengths: List[int], launches: Dict[str, int]) -> Breakdown:
    """launches: {"text_head": per step of the text tower + head (fwd+bwd), "image": the image
    tower's forward, "optim": the update, "graphs": graphs replayed per step} for this way."""
    M, D, B, K, e = SIZES["M"], SIZES["D"], SIZES["B"], SIZES["K"], SIZES["e"]
    image = device_ms(image_cost(), m)
    text = device_ms(text_cost(suffix_lengths, full=way == "reference", way=way), m)
    head = device_ms(head_cost("demul_head", "fwd+bwd", C, M, D, B, K, e), m)
    optim = device_ms(optim_cost(C), m)
    out = []
    for with_images in (True, False):
        kernels = launches["text_head"] + launches["optim"] + (launches["image"] if with_images else 0)
        gap = kernels * m.kernel_gap_us * 1e-3
        work = (image if with_images else 0.0) + text + head + optim
        if way == "graphs":  # one host call per graph; the optimizer update is launched by the wrapper
            host = launches["graphs"] * m.graph_launch_us * 1e-3 + launches["optim"] * m.compiled_launch_us * 1e-3
        else:
            per = m.eager_launch_us if way in ("reference", "eager") else m.compiled_launch_us
            host = kernels * per * 1e-3
        out.append((kernels, gap, host, max(work + gap, host), "launch" if host > work + gap else "device"))
    (kernels, gap, host, step, bound), (_, _, _, step_f, _) = out
    return Breakdown(m.name, C, way, image, text, head, optim, kernels, gap, host, step, bound, step_f)


def load_counts(path: str) -> Dict[int, Dict[str, int]]:
    """{C: {provider: launches_per_step}} from the step suite's JSON lines (the last row wins)."""
    counts: Dict[int, Dict[str, int]] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("suite") != "step" or rec.get("launches_per_step") is None or rec.get("op") != "step":
                continue
            if rec["sizes"].get("clip") != "ViT-B-16":
                continue
            counts.setdefault(int(rec["sizes"]["C"]), {})[rec["provider"]] = int(rec["launches_per_step"])
    return counts


def ways_launches(step_counts: Dict[str, int], fixed: Dict[str, int]) -> Dict[str, Dict[str, int]]:
    """Per way, the launch counts ``breakdown`` takes. fixed: image tower and optimizer counts
    (``count_fixed``)."""
    return {
        "reference": dict(text_head=step_counts["eager"], image=fixed["image_eager"], optim=fixed["optim_eager"],
                          graphs=0),
        "eager": dict(text_head=step_counts["demul-torch"], image=fixed["image_eager"], optim=fixed["optim_eager"],
                      graphs=0),
        # the image tower runs inside the compiled forward graph (counted on its own)
        "compiled": dict(text_head=step_counts["demul-torch-compile"], image=fixed["image_compiled"],
                         optim=fixed["optim_compiled"], graphs=0),
        # forward (with the image tower inside it) and backward: two graphs
        "graphs": dict(text_head=step_counts["demul-torch-compile"], image=fixed["image_compiled"],
                       optim=fixed["optim_compiled"], graphs=2),
    }


def count_fixed(device: str = "cpu") -> Dict[str, int]:
    """Counted launches of the frozen ViT-B/16 image tower's forward (eager, and compiled:
    generated code) and of the SGD update of ctx [4, 16, 512] and prompt logits [C, 4]
    (eager foreach, and compiled). The image tower's count does not depend on the batch
    (counted at B=2)."""
    import torch

    from benchmarks import launches, models
    from demul_fast.compiled_step import TrainStep  # noqa: F401  (the compiled update it runs)

    model, _ = models.clip_model("ViT-B-16", device, torch.float32)
    images = torch.randn(2, 3, 224, 224, device=device)
    with torch.no_grad():
        model.encode_image(images)
        image_eager = launches.count_eager(lambda: model.encode_image(images))["launches"]
        enc = torch.compile(model.encode_image, fullgraph=True, dynamic=False)
        image_compiled = launches.count_compiled(lambda: enc(images), run=False)[1]["launches"]
    params = [torch.randn(4, 16, 512, device=device, requires_grad=True),
              torch.randn(100, 4, device=device, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4, foreach=True)
    opt.step()
    optim_eager = launches.count_eager(opt.step)["launches"]
    import inspect
    update = torch.compile(lambda: inspect.unwrap(type(opt).step)(opt), fullgraph=True, dynamic=False)
    optim_compiled = launches.count_compiled(lambda: torch.no_grad()(update)(), run=False)[1]["launches"]
    return dict(image_eager=image_eager, image_compiled=image_compiled, optim_eager=optim_eager,
                optim_compiled=optim_compiled)


def model_rows(counts: Dict[int, Dict[str, int]], fixed: Dict[str, int]) -> List[Breakdown]:
    import open_clip

    from benchmarks import models
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    rows = []
    for C in sorted(counts):
        need = ("eager", "demul-torch", "demul-torch-compile")
        if any(k not in counts[C] for k in need):
            continue
        lengths = models.suffix_lengths(tokenizer, models.classnames(C), SIZES["n_ctx"])
        per_way = ways_launches(counts[C], fixed)
        for m in MACHINES.values():
            for way in WAYS:
                rows.append(breakdown(m, C, way, lengths, per_way[way]))
    return rows


def format_rows(rows: List[Breakdown]) -> str:
    head = ["machine", "C", "way", "kernels", "image", "text", "head", "optim", "kernel gaps", "host",
            "step ms", "bound", "x eager", "x ref", "step ms (features)", "x eager", "x ref"]
    base = {(r.machine, r.C, r.way): r for r in rows}
    body = []
    for r in rows:
        e, ref = base[(r.machine, r.C, "eager")], base[(r.machine, r.C, "reference")]
        body.append([r.machine, r.C, r.way, r.kernels] + [f"{x:.3f}" for x in (r.image_ms, r.text_ms, r.head_ms,
                                                                                 r.optim_ms, r.kernel_gap_ms,
                                                                                 r.host_ms, r.step_ms)]
                    + [r.bound, f"{e.step_ms / r.step_ms:.1f}", f"{ref.step_ms / r.step_ms:.1f}",
                       f"{r.step_ms_features:.3f}", f"{e.step_ms_features / r.step_ms_features:.1f}",
                       f"{ref.step_ms_features / r.step_ms_features:.1f}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(x) for x in line) + " |" for line in body]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default=os.path.join(here, "results", "step-cpu.jsonl"),
                   help="JSON lines of run.py --preset step --suite step (--count-only)")
    p.add_argument("--fixed", default=os.path.join(here, "results", "step_fixed_counts.json"),
                   help="image tower and optimizer launch counts (written by --count-fixed)")
    p.add_argument("--count-fixed", action="store_true", help="count them now (minutes on a CPU) and write --fixed")
    p.add_argument("--json", default=None, help="write the modelled rows here")
    args = p.parse_args(argv)
    if args.count_fixed:
        fixed = count_fixed()
        with open(args.fixed, "w") as f:
            json.dump(fixed, f, indent=1)
    with open(args.fixed) as f:
        fixed = json.load(f)
    rows = model_rows(load_counts(args.counts), fixed)
    print("MODELLED (not measured): " + "; ".join(f"{m.name}: {asdict(m)}" for m in MACHINES.values()))
    print(f"counted launches: image tower and optimizer {fixed}")
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machines": {k: asdict(v) for k, v in MACHINES.items()}, "fixed_counts": fixed,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
