"""Stand-ins for the prompt-learning layouts of CoOp's family on OpenAI's ``clip``, written
for these tests from the methods' descriptions (docs/family.md):

* ``PromptLearner``: CoOp's unified context, ``[SOT ; ctx ; class tokens ...]`` with the
  class token at the end, in the middle or in front (middle/front build each class's row
  apart and stack the rows, as CoOp does).
* ``ConditionalPromptLearner``: CoCoOp. A meta-net (Linear, ReLU, Linear) maps each image
  feature to a shift of the shared context, ``ctx_b = ctx + meta_net(x_b)``; image b's
  prompts are CoOp's with ``ctx_b``, built per image and stacked: ``[B, C, L, W]``.
* ``TextEncoder``: CoOp's/CoCoOp's text encoder, full length (77 positions per row).
* ``cocoop_loop_logits``: CoCoOp's per-image loop (one text-encoder call per image);
  ``cocoop_batched_logits``: the same logits from one call on ``[B, C, L, W]``.
* ``DeepPromptBlock`` / ``to_deep_prompt_tower``: MaPLe's text block as issue 27 describes
  it (forward on ``[x, deeper, counter]``; at layers i >= 1, while counter < len(deeper), the
  context positions 1..n_ctx of x are replaced by ``deeper[counter]``, counter += 1; then the
  usual pre-LN residual block), and ``DeepTextEncoder``, MaPLe's full-length encoder with its
  third argument; ``DeepPromptLearner`` holds ctx and the J deep prompts.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_tiny import openai_tokenize


def class_name_lengths(classnames: Sequence[str]) -> List[int]:
    return [int((openai_tokenize([name])[0] != 0).sum()) - 2 for name in classnames]


class PromptLearner(nn.Module):
    """CoOp's layout: one context [n_ctx, W] for all classes (``position``: end, middle, front)."""

    def __init__(self, classnames, clip_model, n_ctx, position="end", seed=0):
        super().__init__()
        dtype = clip_model.dtype
        width = clip_model.ln_final.weight.shape[0]
        gen = torch.Generator().manual_seed(seed)
        self.ctx = nn.Parameter((0.02 * torch.randn(n_ctx, width, generator=gen)).to(dtype))
        texts = [" ".join(["X"] * n_ctx) + " " + name + "." for name in classnames]
        self.register_buffer("tokenized_prompts", openai_tokenize(texts), persistent=False)
        with torch.no_grad():
            emb = clip_model.token_embedding(self.tokenized_prompts).to(dtype)
        self.register_buffer("token_prefix", emb[:, :1], persistent=False)
        self.register_buffer("token_suffix", emb[:, 1 + n_ctx:], persistent=False)
        self.name_lens = class_name_lengths(classnames)
        self.n_cls, self.n_ctx, self.position = len(classnames), n_ctx, position

    def build(self, ctx: torch.Tensor) -> torch.Tensor:
        """[C, L, W] prompts around one context ctx [n_ctx, W]."""
        ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        prefix, suffix = self.token_prefix, self.token_suffix
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        rows, half = [], self.n_ctx // 2
        for i, n in enumerate(self.name_lens):
            name, rest = suffix[i:i + 1, :n], suffix[i:i + 1, n:]
            if self.position == "middle":
                rows.append(torch.cat([prefix[i:i + 1], ctx[i:i + 1, :half], name, ctx[i:i + 1, half:], rest], 1))
            else:
                rows.append(torch.cat([prefix[i:i + 1], name, ctx[i:i + 1], rest], 1))
        return torch.cat(rows, dim=0)

    def forward(self) -> torch.Tensor:
        return self.build(self.ctx)


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


class TextEncoder(nn.Module):
    """CoOp's / CoCoOp's text encoder: every row at its full 77 positions."""

    def __init__(self, clip_model):
        super().__init__()
        self.transformer, self.ln_final = clip_model.transformer, clip_model.ln_final
        self.positional_embedding, self.text_projection = clip_model.positional_embedding, clip_model.text_projection
        self.dtype = clip_model.dtype

    def forward(self, prompts, tokenized_prompts):
        x = (prompts + self.positional_embedding.to(self.dtype)).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        x = self.ln_final(x).to(self.dtype)
        return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection


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


class DeepTextEncoder(TextEncoder):
    """MaPLe's text encoder: the full-length tower on ``[x, deeper, 0]``."""

    def forward(self, prompts, tokenized_prompts, compound_prompts_deeper_text):
        x = (prompts + self.positional_embedding.to(self.dtype)).permute(1, 0, 2)
        x = self.transformer([x, list(compound_prompts_deeper_text), 0])[0].permute(1, 0, 2)
        x = self.ln_final(x).to(self.dtype)
        return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection


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
