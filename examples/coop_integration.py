"""Using demul_fast in a CoOp code base: swap two layers, keep the trainer.

A CoOp-style model (Zhou et al., "Learning to Prompt for Vision-Language Models") is a
prompt learner (token embeddings of [SOT], a learned context, the class tokens), a text
encoder that runs the prompt embeddings through CLIP's text transformer, the frozen image
encoder and cosine logits with cross-entropy. Turning it into DeMul (M learned prompts,
per-class prompt weights, LLM distillation; docs/SPEC.md) with demul_fast takes two swaps
in ``PromptedDeMul``:

1. the full-length text encoder  ->  ``demul_fast.nn.CoOpTextEncoder(clip_model)``: the
   same ``forward(prompts, tokenized_prompts)``, the same result up to float rounding,
   but truncated after the last EOT and with the shared [SOT] + context block computed
   once per prompt instead of once per class;
2. logits + ``F.cross_entropy``  ->  ``demul_fast.nn.DeMulHead(C, M, llm_embeddings,
   phi)``: prompt weighting, cosine cross-entropy and distillation in one fused call.

The prompt learner is this project's stand-in for CoOp's layout (tests/support/coop_layout.py;
no CoOp code is copied), with M prompts (``ctx [M, n_ctx, width]``); it builds one
``[C, 77, width]`` prompt tensor per prompt with ``expand`` of that prompt's context, which
is what lets ``CoOpTextEncoder`` share the prefix with exact gradients (see
``demul_fast/coop.py``).

Runs on random data with a small randomly initialised open_clip model (no downloads):

    python examples/coop_integration.py                     # a few DeMul training steps
    python examples/coop_integration.py --encoder plain     # the same at full length
    python examples/coop_integration.py --compare 5 --model ViT-B-16 --classes 64 \
        --n-ctx 16 --prompts 1                              # time plain vs fast steps

In a real run the LLM embeddings come from ``demul_fast.app.llm.class_name_embeddings`` and
phi from ``demul_fast.app.phi_cache.fit_phi_for_model``; here both are random.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

import demul_fast.nn as dnn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.coop_layout import ContextPrompts, FullLengthTextEncoder  # noqa: E402  (the CoOp-style layout)

WORDS = ["dog", "sea lion", "golden retriever", "red-winged blackbird", "cat", "maple tree", "airliner",
         "garden spider", "espresso", "african elephant", "fire truck", "sunflower", "mountain bike",
         "great white shark", "lighthouse", "hot air balloon"]


def classnames(n: int) -> List[str]:
    """n class names of different token lengths (distinct for n <= 256)."""
    names = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        names.append(w if i < len(WORDS) else f"{WORDS[(i // len(WORDS)) % len(WORDS)]} {w}")
    return names


def build_clip(name: str, seed: int):
    """A randomly initialised open_clip model and its tokenizer, frozen and in eval mode.
    "tiny": width-64, 2-layer text tower and a 32-px vision tower, for tests and CI."""
    import open_clip
    from open_clip.model import CLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny":
            model = CLIP(embed_dim=32,
                         vision_cfg=dict(layers=1, width=32, patch_size=8, image_size=32, head_width=16),
                         text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
            tokenizer = open_clip.get_tokenizer("ViT-B-16")
        else:
            model = open_clip.create_model(name, pretrained=None)
            tokenizer = open_clip.get_tokenizer(name)
    return model.eval().requires_grad_(False), tokenizer


class PromptedDeMul(nn.Module):
    """A CoOp-style model with M learned contexts and the DeMul head. ``encoder="fast"`` uses
    CoOpTextEncoder; ``"plain"`` runs every prompt at full length."""

    def __init__(self, classnames: Sequence[str], clip_model: nn.Module, tokenizer, n_ctx: int, n_prompts: int,
                 llm_embeddings: torch.Tensor, phi: nn.Linear, encoder: str = "fast"):
        super().__init__()
        self.prompt_learner = ContextPrompts(clip_model, tokenizer, classnames, n_ctx, n_prompts=n_prompts)
        self.image_encoder = clip_model.visual
        if encoder == "fast":
            self.text_encoder = dnn.CoOpTextEncoder(clip_model)              # swap 1
        elif encoder == "plain":
            self.text_encoder = FullLengthTextEncoder(clip_model)
        else:
            raise ValueError(f"encoder must be 'fast' or 'plain', got {encoder!r}")
        self.head = dnn.DeMulHead(len(classnames), n_prompts, llm_embeddings=llm_embeddings, phi=phi)  # swap 2
        self.logit_scale = clip_model.logit_scale

    def text_features(self) -> torch.Tensor:
        """T [C, M, D]: one text-encoder call per prompt, as CoOp calls it per step."""
        tokenized = self.prompt_learner.tokens
        return torch.stack([self.text_encoder(p, tokenized) for p in self.prompt_learner()], dim=1)

    def forward(self, image: Optional[torch.Tensor] = None, label: Optional[torch.Tensor] = None,
                image_features: Optional[torch.Tensor] = None):
        if image_features is None:
            with torch.no_grad():
                image_features = self.image_encoder(image)
        return self.head(self.text_features(), image_features, label, scale=self.logit_scale.exp())


def make_model(args, encoder: str, clip=None):
    """PromptedDeMul on ``clip`` = (model, tokenizer) (built from ``args.model`` if None)."""
    clip_model, tokenizer = clip or build_clip(args.model, args.seed)
    names = classnames(args.classes)
    dim = clip_model.text_projection.shape[1]
    gen = torch.Generator().manual_seed(args.seed)
    llm = torch.randn(args.classes, args.llm_dim, generator=gen)          # stands in for LLM embeddings
    phi = nn.Linear(dim, args.llm_dim)
    with torch.no_grad():
        phi.weight.copy_(torch.randn(args.llm_dim, dim, generator=gen) * dim ** -0.5)
        phi.bias.zero_()
    torch.manual_seed(args.seed)                                          # same ctx init for both encoders
    model = PromptedDeMul(names, clip_model, tokenizer, args.n_ctx, args.prompts, llm, phi, encoder)
    model.embed_dim = dim
    for name, p in model.named_parameters():                             # CoOp: train the prompt learner only
        p.requires_grad_(name.startswith("prompt_learner") or name == "head.prompt_logits")
    return model


def random_batch(args, model: PromptedDeMul):
    gen = torch.Generator().manual_seed(args.seed + 1)
    size = model.image_encoder.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(args.batch, 3, size, size, generator=gen)
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
    return images, labels


def train(args, encoder: str) -> dict:
    """A few SGD steps on one random few-shot batch; returns the losses and the model."""
    model = make_model(args, encoder)
    images, labels = random_batch(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    losses = []
    for _ in range(args.steps):
        out = model(images, labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return {"losses": losses, "model": model}


def compare(args) -> dict:
    """Time training steps with the plain and the fast encoder, interleaved, on given image
    features (the image tower is not what differs). Returns the median seconds per step
    (wall clock and process CPU time; on a busy machine run it with one thread and read
    the CPU time)."""
    clip = build_clip(args.model, args.seed)                              # one frozen CLIP for both
    models = {e: make_model(args, e, clip) for e in ("plain", "fast")}
    gen = torch.Generator().manual_seed(args.seed + 1)
    feats = torch.randn(args.batch, models["fast"].embed_dim, generator=gen)
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
    opts = {e: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=args.lr)
            for e, m in models.items()}
    wall = {e: [] for e in models}
    cpu = {e: [] for e in models}
    for i in range(args.compare + 1):                                     # +1: warm-up
        for e, m in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            out = m(label=labels, image_features=feats)
            opts[e].zero_grad(set_to_none=True)
            out.loss.backward()
            opts[e].step()
            if i:
                wall[e].append(time.perf_counter() - t0)
                cpu[e].append(time.process_time() - c0)
    plan = models["fast"].text_encoder.last_plan
    r = {"plan": plan, "tokens": {"plain": args.classes * 77 * args.prompts, "fast": plan.tokens * args.prompts}}
    for e in models:
        r[e + "_s"] = sorted(wall[e])[len(wall[e]) // 2]
        r[e + "_cpu_s"] = sorted(cpu[e])[len(cpu[e]) // 2]
    r["ratio"] = r["plain_s"] / r["fast_s"]
    r["cpu_ratio"] = r["plain_cpu_s"] / r["fast_cpu_s"]
    return r


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help='"tiny" (default) or an open_clip model name, e.g. ViT-B-16')
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--n-ctx", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4, help="M, learned prompts (1 = CoOp)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--llm-dim", type=int, default=48)
    p.add_argument("--encoder", choices=("fast", "plain"), default="fast",
                   help="fast: CoOpTextEncoder; plain: every prompt at full length")
    p.add_argument("--compare", type=int, default=0, metavar="STEPS",
                   help="time STEPS training steps with each encoder (interleaved) and print the ratio")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare:
        r = compare(args)
        t = r["tokens"]
        print(f"model {args.model}, C={args.classes}, M={args.prompts}, n_ctx={args.n_ctx}, B={args.batch}, "
              f"{torch.get_num_threads()} thread(s), median of {args.compare} steps:")
        for label, key in (("plain (full length)", "plain"), ("fast (CoOpTextEncoder)", "fast")):
            print(f"  {label:<25} wall {r[key + '_s'] * 1e3:9.1f} ms  cpu {r[key + '_cpu_s'] * 1e3:9.1f} ms "
                  f"{t[key]:7d} tokens")
        print(f"  ratio plain / fast: wall {r['ratio']:.2f}x, cpu {r['cpu_ratio']:.2f}x")
        print(f"  {r['plan']}")
        return r
    r = train(args, args.encoder)
    print(f"{args.encoder} encoder, C={args.classes}, M={args.prompts}: losses "
          + ", ".join(f"{x:.4f}" for x in r["losses"]))
    return r


if __name__ == "__main__":
    main()
