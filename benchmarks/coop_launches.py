"""Launches per training step of ``CoOpTextEncoder`` inside CoOp's prompt-learner layout,
counted (not timed) as ``benchmarks/launches.py`` counts: eager by dispatch, compiled from
inductor's generated code (forward graph + its AOT backward, generated, not built).

    python benchmarks/coop_launches.py --C 100 --attention auto     # and --attention prefix

The step's text side as tests/test_coop_capture.py compiles it: CoOp's learner
(tests/support/family.py ``PromptLearner``: unified context of n_ctx tokens, class token at
the end), ``CoOpTextEncoder`` on a random OpenAI ``clip.model.CLIP`` with the ViT-B/16 text
shape (width 512, 8 heads, 12 layers; ``family.build_model``), unit-norm text features and a
cosine-logit cross-entropy over B random unit image features, forward + backward. One eager
call plans first (the plan is decided outside the step); then the eager step is counted and
the step is compiled with ``fullgraph=True, dynamic=False``. Float32, CPU, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here] + [os.path.dirname(_here)]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import family, launches  # noqa: E402


def count(C: int, n_ctx: int, B: int, attention: str) -> dict:
    from demul_fast.coop import CoOpTextEncoder

    model = family.build_model(512, 8, 12, torch.float32)
    learner = family._support().PromptLearner(family.classnames(C), model, n_ctx, seed=3)
    enc = CoOpTextEncoder(model, attention=attention)
    gen = torch.Generator().manual_seed(11)
    feats = torch.randn(B, model.visual.output_dim, generator=gen)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    labels = torch.randint(0, C, (B,), generator=gen)

    def step(feats, labels):
        text = enc(learner(), learner.tokenized_prompts)
        text = text / text.norm(dim=-1, keepdim=True)
        return F.cross_entropy(20.0 * feats @ text.t(), labels)

    step(feats, labels).backward()  # plans (host reads happen here, outside the counted steps)
    plan = enc.last_plan
    eager = launches.count_eager(lambda: step(feats, labels).backward())
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    t0 = time.perf_counter()
    _, comp = launches.count_compiled(lambda: compiled(feats, labels).backward(), run=False)
    return dict(C=C, n_ctx=n_ctx, B=B, attention=attention, plan=repr(plan), eager=eager, compiled=comp,
                codegen_s=round(time.perf_counter() - t0, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--C", type=int, default=100)
    p.add_argument("--n-ctx", type=int, default=16)
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--attention", default="auto", choices=("auto", "masked", "prefix"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(count(args.C, args.n_ctx, args.B, args.attention)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
