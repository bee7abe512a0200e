"""CoOp over OpenAI's ``clip`` package: swap one line, keep the trainer.

CoOp (and CoCoOp, KgCoOp, MaPLe, PromptSRC, ...) vendor OpenAI's ``clip/`` and encode the
prompt learner's ``[C, 77, width]`` prompts with a ``TextEncoder`` that runs every class at
77 tokens through the sequence-first transformer. The swap:

    self.text_encoder = TextEncoder(clip_model)
 -> self.text_encoder = demul_fast.nn.CoOpTextEncoder(clip_model)

Same ``forward(prompts, tokenized_prompts)``, same ``[C, D]`` up to float rounding, same
dtype (``clip.build_model``'s float16 weights compute in float16, as CoOp does), but
truncated after the last EOT and with [SOT] + the learned context computed once instead of
once per class. The prompt layout (one learned context broadcast over the classes, class
token at the end) and the full-length text encoder swapped out are this project's own
stand-ins for CoOp's (tests/support/coop_layout.py); no CoOp code is copied.

Random weights built with ``clip.model.CLIP`` (no downloads):

    python examples/coop_openai_clip.py                        # a few CoOp steps, tiny model
    python examples/coop_openai_clip.py --encoder plain        # the same with the full-length encoder
    python examples/coop_openai_clip.py --fp16                 # weights cast as clip.build_model casts
    python examples/coop_openai_clip.py --compare 3 --model ViT-B/16 --classes 64 --n-ctx 16
                                                               # time text-encoder fwd+bwd, both ways
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

import demul_fast.nn as dnn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.coop_layout import ContextPrompts, FullLengthTextEncoder  # noqa: E402  (the CoOp-style layout)

WORDS = ["dog", "sea lion", "golden retriever", "red-winged blackbird", "cat", "maple tree", "airliner",
         "garden spider", "espresso", "african elephant", "fire truck", "sunflower", "mountain bike",
         "great white shark", "lighthouse", "hot air balloon"]

# (embed_dim, transformer width, heads, layers) of the text towers; the image tower is small
# in both: only the text encoder differs between the two paths.
TEXT_TOWERS = {"tiny": (48, 64, 2, 2), "ViT-B/16": (512, 512, 8, 12)}


def classnames(n: int) -> List[str]:
    """n class names of different token lengths (distinct for n <= 256)."""
    return [WORDS[i % len(WORDS)] if i < len(WORDS) else f"{WORDS[(i // len(WORDS)) % len(WORDS)]} "
            f"{WORDS[i % len(WORDS)]}" for i in range(n)]


def build_clip(name: str, seed: int, fp16: bool):
    """A random OpenAI ``clip.model.CLIP`` with the text tower of ``name``, eval, frozen;
    ``fp16``: weights cast as ``clip.build_model`` casts them."""
    import clip.model

    embed_dim, width, heads, layers = TEXT_TOWERS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = clip.model.CLIP(embed_dim, image_resolution=32, vision_layers=1, vision_width=64,
                                vision_patch_size=16, context_length=77, vocab_size=49408,
                                transformer_width=width, transformer_heads=heads, transformer_layers=layers)
    if fp16:
        clip.model.convert_weights(model)
    return model.eval().requires_grad_(False)


class PromptedCLIP(nn.Module):
    """A CoOp-style model: learned context prompts (tests/support/coop_layout.py), a text
    encoder called as ``encoder(prompts, tokens)``, the frozen image tower, cosine logits.
    ``encoder="fast"`` is the one-line swap."""

    def __init__(self, classnames, clip_model, n_ctx: int, encoder: str = "fast"):
        super().__init__()
        import clip

        self.prompt_learner = ContextPrompts(clip_model, clip.tokenize, classnames, n_ctx)
        self.tokenized_prompts = self.prompt_learner.tokens
        self.image_encoder = clip_model.visual
        if encoder == "fast":
            self.text_encoder = dnn.CoOpTextEncoder(clip_model)    # the swap
        elif encoder == "plain":
            self.text_encoder = FullLengthTextEncoder(clip_model)
        else:
            raise ValueError(f"encoder must be 'fast' or 'plain', got {encoder!r}")
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype

    def forward(self, image):
        image_features = F.normalize(self.image_encoder(image.type(self.dtype)), dim=-1)
        text_features = F.normalize(self.text_encoder(self.prompt_learner(), self.tokenized_prompts), dim=-1)
        return self.logit_scale.exp() * image_features @ text_features.t()


def make_model(args, encoder: str, clip_model=None) -> PromptedCLIP:
    clip_model = clip_model if clip_model is not None else build_clip(args.model, args.seed, args.fp16)
    torch.manual_seed(args.seed)  # the same ctx initialisation for both encoders
    model = PromptedCLIP(classnames(args.classes), clip_model, args.n_ctx, encoder)
    for name, p in model.named_parameters():  # CoOp: only the prompt learner learns
        p.requires_grad_("prompt_learner" in name)
    return model


def train(args, encoder: str) -> dict:
    """A few SGD steps of CoOp on one random batch; returns the losses and the model."""
    model = make_model(args, encoder)
    gen = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(args.batch, 3, 32, 32, generator=gen)
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
    opt = torch.optim.SGD(model.prompt_learner.parameters(), lr=args.lr, momentum=0.9)
    losses = []
    for _ in range(args.steps):
        loss = F.cross_entropy(model(images).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "model": model}


def compare(args) -> dict:
    """Time the text encoder's forward + backward (features [C, D] and d ctx), full length and
    the fast one, interleaved, on one frozen model; report the medians (wall and process
    CPU time) and the largest difference of features and ctx gradients."""
    clip_model = build_clip(args.model, args.seed, args.fp16)
    models = {e: make_model(args, e, clip_model) for e in ("plain", "fast")}
    gen = torch.Generator().manual_seed(args.seed + 2)
    upstream = torch.randn(args.classes, clip_model.text_projection.shape[1], generator=gen)
    wall = {e: [] for e in models}
    cpu = {e: [] for e in models}
    results = {}
    for i in range(args.compare + 1):                                     # +1: warm-up
        for e, m in models.items():
            m.prompt_learner.zero_grad(set_to_none=True)
            t0, c0 = time.perf_counter(), time.process_time()
            out = m.text_encoder(m.prompt_learner(), m.tokenized_prompts)
            (out.float() * upstream).sum().backward()
            if i:
                wall[e].append(time.perf_counter() - t0)
                cpu[e].append(time.process_time() - c0)
            results[e] = (out.detach().float(), m.prompt_learner.ctx.grad.float())
    r = {"plan": models["fast"].text_encoder.last_plan, "tokens": {"plain": args.classes * 77}}
    r["tokens"]["fast"] = r["plan"].tokens
    for e in models:
        r[e + "_s"] = sorted(wall[e])[len(wall[e]) // 2]
        r[e + "_cpu_s"] = sorted(cpu[e])[len(cpu[e]) // 2]
    r["ratio"] = r["plain_s"] / r["fast_s"]
    r["cpu_ratio"] = r["plain_cpu_s"] / r["fast_cpu_s"]
    for k, name in ((0, "features"), (1, "dctx")):
        a, b = results["fast"][k], results["plain"][k]
        r[name + "_rel_err"] = float((a - b).abs().max() / b.abs().max())
    return r


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(TEXT_TOWERS), default="tiny", help="text tower shape")
    p.add_argument("--fp16", action="store_true", help="cast the weights as clip.build_model does")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--n-ctx", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--encoder", choices=("fast", "plain"), default="fast",
                   help="fast: CoOpTextEncoder; plain: every prompt at full length")
    p.add_argument("--compare", type=int, default=0, metavar="STEPS",
                   help="time STEPS text-encoder forward+backward calls with each encoder and print the ratio")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare:
        r = compare(args)
        t = r["tokens"]
        print(f"OpenAI CLIP text tower {args.model} ({'float16' if args.fp16 else 'float32'} weights), "
              f"C={args.classes}, n_ctx={args.n_ctx}, {torch.get_num_threads()} thread(s), "
              f"median of {args.compare} forward+backward calls:")
        for label, key in (("full length", "plain"), ("CoOpTextEncoder", "fast")):
            print(f"  {label:<17} wall {r[key + '_s'] * 1e3:9.1f} ms  cpu {r[key + '_cpu_s'] * 1e3:9.1f} ms "
                  f"{t[key]:6d} tokens")
        print(f"  ratio plain / fast: wall {r['ratio']:.2f}x, cpu {r['cpu_ratio']:.2f}x")
        print(f"  max |fast - plain| / max |plain|: features {r['features_rel_err']:.2e}, "
              f"d ctx {r['dctx_rel_err']:.2e}")
        print(f"  {r['plan']}")
        return r
    r = train(args, args.encoder)
    print(f"{args.encoder} encoder, C={args.classes}: losses " + ", ".join(f"{x:.4f}" for x in r["losses"]))
    return r


if __name__ == "__main__":
    main()
