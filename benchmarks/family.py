"""``benchmarks/run.py --suite family``: CoOp's family beyond DeMul (docs/family.md).

* **CoCoOp**: per-image contexts ``ctx + meta_net(x_b)``. CoCoOp's own ``CustomCLIP``
  encodes the C class prompts once per image, in a loop over the B images, with its
  full-length ``TextEncoder``; the batched provider is one ``CoOpTextEncoder`` call on the
  ``[B, C, L, W]`` prompts (each image's [SOT + context] block once, the suffixes packed).
* **MaPLe**: deep text prompts at layers 1..J. MaPLe's full-length text encoder (its blocks
  on ``[x, deeper, counter]``) against ``CoOpTextEncoder(..., compound_prompts_deeper_text)``.

Each provider runs forward + backward of a step's text side (prompt learner, encoder,
CoCoOp's logits and a cross-entropy; MaPLe's features against a fixed cotangent). Time: one
warm-up call each (the counted one), then 3 calls of every provider interleaved (loop,
batched, loop, ...); the minimum wall time and the minimum process CPU time (user + sys of
all threads: less sensitive to other processes on a shared machine) are reported, with the
load average before and after. Launches (counted): non-view aten operators dispatched during one call (a
``TorchDispatchMode``), what an eager GPU run launches as kernels. Agreement: the fast
provider's outputs and every parameter's gradient against the plain one on the benchmark's
own inputs (max relative difference, printed; the float64 proofs are tests/test_cocoop.py
and tests/test_maple.py).

The layouts are the tests' stand-ins (tests/support/family.py, written from the methods'
descriptions), over a random OpenAI ``clip.model.CLIP`` with the ViT-B/16 text shape
(width 512, 8 heads, 12 layers; preset ``tiny``: a micro tower for the tests). Class names:
the first C of the shipped ImageNet list.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")

# (C, B, n_ctx) for CoCoOp, (C, n_ctx, J) for MaPLe, and the text tower
SIZES = {"default": dict(cocoop=(32, 4, 4), maple=(64, 2, 9), width=512, heads=8, layers=12),
         "tiny": dict(cocoop=(5, 2, 2), maple=(6, 2, 2), width=32, heads=2, layers=3)}


class LaunchCounter(TorchDispatchMode):
    """Counts the non-view aten operators dispatched (each is a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.launches += 1
        return func(*args, **(kwargs or {}))


def _support():
    if _TESTS not in sys.path:
        sys.path.insert(0, _TESTS)
    import support.family as family  # noqa: PLC0415
    return family


def build_model(width: int, heads: int, layers: int, dtype: torch.dtype, seed: int = 0):
    """A random OpenAI ``clip.model.CLIP`` with the given text shape (a small image tower)."""
    import clip.model

    torch.manual_seed(seed)
    model = clip.model.CLIP(embed_dim=512 if width >= 512 else 48, image_resolution=32, vision_layers=1,
                            vision_width=64, vision_patch_size=16, context_length=77, vocab_size=49408,
                            transformer_width=width, transformer_heads=heads, transformer_layers=layers)
    return model.to(dtype).eval().requires_grad_(False)


def classnames(c: int) -> List[str]:
    path = os.path.join(os.path.dirname(_TESTS), "demul_fast", "data", "imagenet.txt")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    return names[:c]


def cocoop_providers(sizes, dtype):
    """(providers, params, describe) for CoCoOp's layout: each provider runs forward +
    backward and returns (logits, grads)."""
    from demul_fast.coop import CoOpTextEncoder

    fam = _support()
    c, b, n_ctx = sizes["cocoop"]
    model = build_model(sizes["width"], sizes["heads"], sizes["layers"], dtype)
    learner = fam.ConditionalPromptLearner(classnames(c), model, n_ctx)
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(b, model.visual.output_dim, generator=gen).to(dtype)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    labels = torch.arange(b) % c
    params = [p for p in learner.parameters() if p.requires_grad]
    plain, fast = fam.TextEncoder(model), CoOpTextEncoder(model)

    def provider(logits_fn, encoder) -> Callable:
        def run():
            logits = logits_fn(learner, encoder, feats, 100.0)
            loss = fam.cross_entropy(logits, labels)
            return logits.detach(), torch.autograd.grad(loss, params)
        return run

    providers = {"cocoop-loop": provider(fam.cocoop_loop_logits, plain),
                 "batched": provider(fam.cocoop_batched_logits, fast)}
    return providers, lambda: fast.last_plan


def maple_providers(sizes, dtype):
    from demul_fast.coop import CoOpTextEncoder

    fam = _support()
    c, n_ctx, depth = sizes["maple"]
    model = fam.to_deep_prompt_tower(build_model(sizes["width"], sizes["heads"], sizes["layers"], dtype), n_ctx)
    learner = fam.DeepPromptLearner(classnames(c), model, n_ctx, depth)
    params = [learner.ctx, *learner.compound_prompts_text]
    plain, fast = fam.DeepTextEncoder(model), CoOpTextEncoder(model)
    cot = None

    def provider(encoder) -> Callable:
        def run():
            nonlocal cot
            prompts, deeper = learner()
            out = encoder(prompts, learner.tokenized_prompts, deeper)
            if cot is None:
                cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
            return out.detach(), torch.autograd.grad((out * cot).sum(), params)
        return run

    return {"maple-full": provider(plain), "prefix-shared": provider(fast)}, lambda: fast.last_plan


def rel_diff(fast, ref) -> float:
    outs_f, grads_f = fast
    outs_r, grads_r = ref
    worst = 0.0
    for a, b in zip((outs_f, *grads_f), (outs_r, *grads_r)):
        worst = max(worst, float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)))
    return worst


def measure(providers: Dict[str, Callable], reps: int) -> Dict[str, dict]:
    """Launches of one call (also the warm-up), then ``reps`` interleaved timed calls each."""
    stats = {}
    results = {}
    for name, fn in providers.items():
        with LaunchCounter() as counter:
            results[name] = fn()
        stats[name] = {"launches": counter.launches, "times_s": [], "cpu_s": []}
    for _ in range(reps):  # the counted call was the warm-up (plans, caches, allocator)
        for name, fn in providers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            stats[name]["cpu_s"].append(time.process_time() - c0)
            stats[name]["times_s"].append(time.perf_counter() - t0)
    names = list(providers)
    stats[names[1]]["max_rel_diff"] = rel_diff(results[names[1]], results[names[0]])
    return stats


def main(args) -> int:
    """Run the family suite (``args`` from benchmarks/run.py: preset, device, dtype, out,
    no_save); prints one row per provider, appends JSON lines to results/family-cpu.jsonl."""
    device = torch.device(args.device or "cpu")
    if device.type != "cpu":
        raise SystemExit("--suite family runs on the CPU (its goals are CPU measurements)")
    dtype = {"float64": torch.float64, "float32": torch.float32}.get(args.dtype or "float32")
    if dtype is None:
        raise SystemExit("--suite family: --dtype float32 or float64")
    sizes = SIZES["tiny" if args.preset == "tiny" else "default"]
    reps = 3
    load0 = os.getloadavg()[0]
    rows = []
    t_start = time.perf_counter()
    for layout, build in (("cocoop", cocoop_providers), ("maple", maple_providers)):
        providers, plan = build(sizes, dtype)
        stats = measure(providers, reps)
        (base, base_s), (fast, fast_s) = stats.items()
        for name, s in stats.items():
            rows.append(dict(suite="family", layout=layout, provider=name, sizes=dict(zip(
                ("C", "B", "n_ctx") if layout == "cocoop" else ("C", "n_ctx", "J"), sizes[layout]),
                width=sizes["width"], layers=sizes["layers"]), dtype=str(dtype).replace("torch.", ""),
                mode="fwd+bwd", min_s=min(s["times_s"]), times_s=s["times_s"], min_cpu_s=min(s["cpu_s"]),
                cpu_s=s["cpu_s"], launches=s["launches"],
                max_rel_diff=s.get("max_rel_diff"), plan=str(plan()) if name == fast else None))
        speed = min(base_s["times_s"]) / min(fast_s["times_s"])
        cpu = min(base_s["cpu_s"]) / min(fast_s["cpu_s"])
        print(f"[family] {layout} {sizes[layout]}: {base} {min(base_s['times_s']):.3f} s, {fast} "
              f"{min(fast_s['times_s']):.3f} s (wall, min of {reps}): {speed:.1f}x; CPU time {min(base_s['cpu_s']):.3f} "
              f"vs {min(fast_s['cpu_s']):.3f} s: {cpu:.1f}x; launches {base_s['launches']} vs "
              f"{fast_s['launches']} ({base_s['launches'] / max(fast_s['launches'], 1):.2f}x fewer); max rel diff "
              f"{fast_s['max_rel_diff']:.2e}; {plan()}")
    load1 = os.getloadavg()[0]
    print(f"[family] load average {load0:.1f} before, {load1:.1f} after, on {os.cpu_count()} cores; "
          f"total {time.perf_counter() - t_start:.0f} s")
    if not getattr(args, "no_save", False):
        out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"family-{device.type}.jsonl")
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps({**row, "load_before": load0, "load_after": load1, "threads":
                                    torch.get_num_threads()}) + "\n")
        print(f"rows appended to {os.path.relpath(path)}")
    return 0
