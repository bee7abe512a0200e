"""MaPLe's deep text prompts through the prefix-shared encoder.

MaPLe replaces the context positions 1..n_ctx with a new learned block at each of the
first J layers; its text encoder is CoOp's with a third argument:

    text_features = self.text_encoder(prompts, tokenized_prompts, deep_compound_prompts_text)

Its blocks take ``[x, deeper_prompts, counter]``. ``CoOpTextEncoder`` recognises such blocks
by what they compute (it probes each block's forward once), and takes the same three
arguments:

    self.text_encoder = CoOpTextEncoder(clip_model)      # clip_model with MaPLe's blocks

The replaced positions precede every class token and the tower is causal, so [SOT + context]
is still shared by all classes at every layer; every row is truncated after its EOT. MaPLe's
blocks, prompt learner and full-length text encoder are played here by the tests' stand-ins
(tests/support/family.py, written from MaPLe's description), over a random OpenAI
``clip.model.CLIP`` (no downloads):

    python examples/maple_deep_prompts.py                        # tiny tower: check + a few steps
    python examples/maple_deep_prompts.py --width 512 --heads 8 --layers 12 --classes 64 --depth 9
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from demul_fast.coop import CoOpTextEncoder  # noqa: E402
from support.family import (DeepPromptLearner, DeepTextEncoder, compare_then_step, min_times,  # noqa: E402
                            new_report, to_deep_prompt_tower)

NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray",
         "stingray", "rooster", "hen", "ostrich", "brambling", "goldfinch", "house finch", "junco"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--n-ctx", type=int, default=2)
    p.add_argument("--depth", type=int, default=3, help="J: deep prompts for layers 1..J")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import clip.model

    torch.manual_seed(args.seed)
    model = clip.model.CLIP(embed_dim=48, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                            context_length=77, vocab_size=49408, transformer_width=args.width,
                            transformer_heads=args.heads, transformer_layers=args.layers).eval().requires_grad_(False)
    model = to_deep_prompt_tower(model, args.n_ctx)  # MaPLe's blocks (same weights)
    names = [f"{NAMES[i % len(NAMES)]} {i // len(NAMES)}" if i >= len(NAMES) else NAMES[i] for i in range(args.classes)]
    learner = DeepPromptLearner(names, model, args.n_ctx, args.depth, seed=args.seed)
    plain, fast = DeepTextEncoder(model), CoOpTextEncoder(model)
    params = [learner.ctx, *learner.compound_prompts_text]
    target = torch.randn(args.classes, 48, generator=torch.Generator().manual_seed(args.seed + 1))
    opt = torch.optim.SGD(params, lr=args.lr)
    report = new_report("full", "prefix-shared")

    def loss_of(encoder):
        def loss():
            prompts, deeper = learner()
            text = encoder(prompts, learner.tokenized_prompts, deeper)
            return (1 - torch.cosine_similarity(text, target, dim=-1)).mean()
        return loss

    for _ in range(args.steps):  # train on the prefix-shared call's gradients
        compare_then_step(report, params, opt, ("full", loss_of(plain)), ("prefix-shared", loss_of(fast)))
    report["plan"] = fast.last_plan
    t_full, t_fast = min_times(report)
    print(f"losses {[round(x, 5) for x in report['losses']]}; prefix-shared vs MaPLe's encoder: max relative "
          f"difference {report['max_rel_diff']:.2e} (float32); {fast.last_plan}")
    print(f"text encoder fwd+bwd, min of {args.steps}: full length {t_full * 1e3:.1f} ms, prefix-shared "
          f"{t_fast * 1e3:.1f} ms ({t_full / t_fast:.1f}x; measured here, the first step includes the plan)")
    return report


if __name__ == "__main__":
    main()
