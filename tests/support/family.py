"""Stand-ins for the prompt-learning layouts of CoOp's family on OpenAI's ``clip``, written
for these tests from the methods' descriptions (docs/family.md), on this project's CoOp
layout (tests/support/coop_layout.py):

* ``PromptLearner``: CoOp's unified context, ``[SOT ; ctx ; class tokens ...]`` with the
  class token at the end, in the middle or in front: coop_layout's ``ContextPrompts`` on
  OpenAI's tokenizer, under the names CoOp's learners use.
* ``ConditionalPromptLearner``: CoCoOp. A meta-net (Linear, ReLU, Linear) maps each image
  feature to a shift of the shared context, ``ctx_b = ctx + meta_net(x_b)``; image b's
  prompts are CoOp's with ``ctx_b``, built per image and stacked: ``[B, C, L, W]``.
* ``TextEncoder``: CoOp's/CoCoOp's text encoder, full length (77 positions per row):
  coop_layout's ``FullLengthTextEncoder``.
* ``cocoop_loop_logits``: CoCoOp's per-image loop (one text-encoder call per image);
  ``cocoop_batched_logits``: the same logits from one call on ``[B, C, L, W]``.
* ``DeepPromptBlock`` / ``to_deep_prompt_tower``: MaPLe's text block as issue 27 describes
  it (forward on ``[x, deeper, counter]``; at layers i >= 1, while counter < len(deeper), the
  context positions 1..n_ctx of x are replaced by ``deeper[counter]``, counter += 1; then the
  usual pre-LN residual block), and ``DeepTextEncoder``, MaPLe's full-length encoder with its
  third argument (coop_layout's ``full_text_forward`` with the deep prompts);
  ``DeepPromptLearner`` holds ctx and the J deep prompts.
* ``new_report``, ``compare_then_step``, ``min_times``: the examples' checked training
  loop (examples/cocoop_batched.py, examples/maple_deep_prompts.py): each step compares the
  fast call's loss and gradients with the reference's, then trains on the fast call's.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_tiny import openai_tokenize
from support.coop_layout import ContextPrompts, FullLengthTextEncoder, full_text_forward, layout


class PromptLearner(ContextPrompts):
    """CoOp's layout (tests/support/coop_layout.py) on OpenAI's tokenizer: one context
    [n_ctx, W] for all classes (``position``: end, middle, front), seeded by ``seed``.
    ``tokenized_prompts``, ``token_prefix`` [C, 1, W] and ``token_suffix`` are the names
    CoOp's learners give the token ids and the frozen rows around the context."""

    def __init__(self, classnames, clip_model, n_ctx, position="end", seed=0):
        super().__init__(clip_model, openai_tokenize, classnames, n_ctx, position=position,
                         generator=torch.Generator().manual_seed(seed))
        self.n_cls = len(classnames)

    @property
    def tokenized_prompts(self) -> torch.Tensor:
        return self.tokens

    @property
    def token_prefix(self) -> torch.Tensor:
        return self.embedded[:, :1]

    @property
    def token_suffix(self) -> torch.Tensor:
        return self.embedded[:, 1 + self.n_ctx:]

    def build(self, ctx: torch.Tensor) -> torch.Tensor:
        """[C, L, W] prompts around one context ctx [n_ctx, W]."""
        return layout(self.embedded, ctx, self.n_ctx, self.position, self.name_lens)


class ConditionalPromptLearner(PromptLearner):
    """CoCoOp's layout: ``ctx + meta_net(image feature)`` per image, prompts [B, C, L, W]."""

    def __init__(self, classnames, clip_model, n_ctx, position="end", seed=0):
        super().__init__(classnames, clip_model, n_ctx, position, seed)
        vis = clip_model.visual.output_dim
        width = self.ctx.shape[1]
        torch.manual_seed(seed + 1)
        self.meta_net = nn.Sequential(nn.Linear(vis, max(vis // 16, 2)), nn.ReLU(inplace=True),
                                      nn.Linear(max(vis // 16, 2), width)).to(clip_model.dtype)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        shifted = self.ctx.unsqueeze(0) + self.meta_net(image_features).unsqueeze(1)   # [B, n_ctx, W]
        return torch.stack([self.build(ctx_b) for ctx_b in shifted])                   # [B, C, L, W]


TextEncoder = FullLengthTextEncoder  # CoOp's / CoCoOp's text encoder: every row at its full 77 positions


def cocoop_loop_logits(learner, encoder, image_features, logit_scale):
    """CoCoOp's CustomCLIP forward after the image encoder: one text call per image."""
    prompts = learner(image_features)
    logits = []
    for prompts_b, image_b in zip(prompts, image_features):
        text = encoder(prompts_b, learner.tokenized_prompts)
        text = text / text.norm(dim=-1, keepdim=True)
        logits.append(logit_scale * image_b @ text.t())
    return torch.stack(logits)


def cocoop_batched_logits(learner, encoder, image_features, logit_scale):
    """The same logits from one call of ``CoOpTextEncoder`` on all B images' prompts."""
    text = encoder(learner(image_features), learner.tokenized_prompts)                 # [B, C, D]
    text = text / text.norm(dim=-1, keepdim=True)
    return logit_scale * torch.einsum("bd,bcd->bc", image_features, text)


class DeepPromptBlock(nn.Module):
    """MaPLe's text block (its modules are OpenAI's block's own)."""

    def __init__(self, blk, n_ctx: int, first_layer: bool):
        super().__init__()
        self.attn, self.ln_1, self.mlp, self.ln_2, self.attn_mask = blk.attn, blk.ln_1, blk.mlp, blk.ln_2, blk.attn_mask
        self.n_ctx, self.first_layer = n_ctx, first_layer

    def forward(self, inputs):
        x, deeper, counter = inputs
        if not self.first_layer and counter < len(deeper):
            ctx = deeper[counter].unsqueeze(1).expand(-1, x.shape[1], -1).to(x.dtype)   # [n_ctx, N, W]
            x = torch.cat([x[:1], ctx, x[1 + self.n_ctx:]], dim=0)
            counter += 1
        mask = self.attn_mask.to(dtype=x.dtype, device=x.device)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return [x + self.mlp(self.ln_2(x)), deeper, counter]


def to_deep_prompt_tower(model, n_ctx: int):
    """``model`` with every text block replaced by a ``DeepPromptBlock`` (same weights)."""
    blocks = model.transformer.resblocks
    for i in range(len(blocks)):
        blocks[i] = DeepPromptBlock(blocks[i], n_ctx, first_layer=(i == 0))
    return model


class DeepTextEncoder(FullLengthTextEncoder):
    """MaPLe's text encoder: the full-length tower on ``[x, deeper, 0]``."""

    def forward(self, prompts, tokenized_prompts, compound_prompts_deeper_text):
        return full_text_forward(self.clip_model, prompts, tokenized_prompts, compound_prompts_deeper_text)


class DeepPromptLearner(PromptLearner):
    """MaPLe's text side: CoOp's prompts and J deep prompts [n_ctx, W] (layers 1..J)."""

    def __init__(self, classnames, clip_model, n_ctx, depth, position="end", seed=0):
        super().__init__(classnames, clip_model, n_ctx, position, seed)
        gen = torch.Generator().manual_seed(seed + 2)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter((0.02 * torch.randn(self.ctx.shape, generator=gen)).to(self.ctx.dtype)) for _ in range(depth)])

    def forward(self):
        return self.build(self.ctx), list(self.compound_prompts_text)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)



def new_report(reference: str, candidate: str) -> Dict:
    """The examples' report: the trained candidate's losses, the largest relative difference
    of its loss and gradients from the reference's, and each side's step times."""
    return {"losses": [], "max_rel_diff": 0.0, "times_s": {reference: [], candidate: []}}


def compare_then_step(report: Dict, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
                      reference: Tuple[str, Callable[[], torch.Tensor]],
                      candidate: Tuple[str, Callable[[], torch.Tensor]]) -> None:
    """One checked training step of an example: run each side's loss (``(name, fn)``, fn()
    -> scalar) and its gradients with respect to ``params``, timed; fold the largest
    relative difference max|a - b| / max|b| of the candidate's loss and gradients from the
    reference's into ``report["max_rel_diff"]``; then train on the candidate's gradients
    (set ``.grad``, ``optimizer.step()``) and record its loss."""
    results = {}
    for name, loss_fn in (reference, candidate):
        t0 = time.perf_counter()
        loss = loss_fn()
        grads = torch.autograd.grad(loss, list(params))
        report["times_s"][name].append(time.perf_counter() - t0)
        results[name] = (loss.detach(), grads)
    (loss_r, g_r), (loss_c, g_c) = results[reference[0]], results[candidate[0]]
    for a, b in zip((loss_c, *g_c), (loss_r, *g_r)):
        report["max_rel_diff"] = max(report["max_rel_diff"], float((a - b).abs().max() / b.abs().max()))
    with torch.no_grad():
        for q, g in zip(params, g_c):
            q.grad = g
    optimizer.step()
    report["losses"].append(float(loss_c))


def min_times(report: Dict) -> List[float]:
    """Each side's fastest step time (seconds), in the report's order (reference, candidate)."""
    return [min(times) for times in report["times_s"].values()]
