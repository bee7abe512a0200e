"""CoCoOp with one text-encoder call per step instead of one per image.

CoCoOp shifts the context per image (``ctx_b = ctx + meta_net(x_b)``), so its model's
forward builds prompts [B, C, 77, width] and then loops over the B images, calling the text
encoder once per image on that image's C class prompts [C, 77, width].

With ``demul_fast.coop.CoOpTextEncoder`` the loop becomes one call on all B images:

    self.text_encoder = CoOpTextEncoder(clip_model)
    ...
    text_features = self.text_encoder(prompts, tokenized_prompts)          # [B, C, D]
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    logits = logit_scale * torch.einsum("bd,bcd->bc", image_features, text_features)

exact (the same logits and gradients up to float rounding), with each image's [SOT +
context] block computed once for its C classes and every row truncated after its EOT.
CoCoOp's prompt learner and text encoder are played here by the tests' stand-ins
(tests/support/family.py, written from CoCoOp's description), over a random OpenAI
``clip.model.CLIP`` (no downloads):

    python examples/cocoop_batched.py                       # tiny tower: check + a few steps
    python examples/cocoop_batched.py --width 512 --heads 8 --layers 12 --classes 32 --batch 4
                                                            # ViT-B/16's text shape, timed
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from demul_fast.coop import CoOpTextEncoder  # noqa: E402
from support.family import (ConditionalPromptLearner, TextEncoder, cocoop_batched_logits,  # noqa: E402
                            cocoop_loop_logits, compare_then_step, min_times, new_report)

NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray",
         "stingray", "rooster", "hen", "ostrich", "brambling", "goldfinch", "house finch", "junco"]


def build(args):
    import clip.model

    torch.manual_seed(args.seed)
    model = clip.model.CLIP(embed_dim=args.embed_dim, image_resolution=32, vision_layers=1, vision_width=64,
                            vision_patch_size=16, context_length=77, vocab_size=49408,
                            transformer_width=args.width, transformer_heads=args.heads,
                            transformer_layers=args.layers).eval().requires_grad_(False)
    names = (NAMES * (args.classes // len(NAMES) + 1))[:args.classes]
    names = [f"{n} {i // len(NAMES)}" if i >= len(NAMES) else n for i, n in enumerate(names)]
    return model, ConditionalPromptLearner(names, model, args.n_ctx, seed=args.seed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embed-dim", type=int, default=48)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--n-ctx", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model, learner = build(args)
    plain, fast = TextEncoder(model), CoOpTextEncoder(model)
    gen = torch.Generator().manual_seed(args.seed + 1)
    params = [q for q in learner.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr)
    report = new_report("loop", "batched")
    for _ in range(args.steps):
        feats = torch.randn(args.batch, model.visual.output_dim, generator=gen)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        labels = torch.randint(0, args.classes, (args.batch,), generator=gen)

        def loss_of(logits_fn, encoder):
            return lambda: F.cross_entropy(logits_fn(learner, encoder, feats, model.logit_scale.exp()), labels)

        # train on the batched call's gradients
        compare_then_step(report, params, opt, ("loop", loss_of(cocoop_loop_logits, plain)),
                          ("batched", loss_of(cocoop_batched_logits, fast)))
    report["plan"] = fast.last_plan
    t_loop, t_batched = min_times(report)
    print(f"losses {[round(x, 5) for x in report['losses']]}; batched vs loop: max relative difference "
          f"{report['max_rel_diff']:.2e} (float32); {fast.last_plan}")
    print(f"text side fwd+bwd, min of {args.steps}: CoCoOp's loop {t_loop * 1e3:.1f} ms, one batched call "
          f"{t_batched * 1e3:.1f} ms ({t_loop / t_batched:.1f}x; measured here, the first step includes the plan)")
    return report


if __name__ == "__main__":
    main()
