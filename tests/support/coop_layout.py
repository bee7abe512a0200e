"""A stand-in for what a CoOp-style prompt learner hands its text encoder, written for this
project (no code of CoOp or its descendants is copied here): the tests check
``CoOpTextEncoder`` against it, and the examples build their CoOp-style models on it.

The layout. Each class c has the prompt text ``"X X ... X <name>."`` (n_ctx placeholders),
tokenised at the model's context length; its embedding row is

    [SOT] ; context (n_ctx rows) ; the class tokens, ".", EOT, padding

where the context is one learned tensor [n_ctx, W] broadcast (``expand``) over the classes,
or one per class [C, n_ctx, W]. ``position`` may also put the class tokens before the
context ("front") or between its two halves ("middle").

The text forward a CoOp code base runs on it: every row at full length, + the positional
embedding, the text transformer (OpenAI's blocks take [L, N, W], sequence first; open_clip's
[N, L, W] with the causal mask passed in), ln_final, then the row at the EOT token (the
largest token id: the argmax of the token ids) times text_projection.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

Tensor = torch.Tensor


def prompt_tokens(tokenize: Callable, classnames: Sequence[str], n_ctx: int) -> Tensor:
    """Token ids [C, L] of the prompt texts "X ... X <name>." (underscores as spaces)."""
    texts = [" ".join("X" for _ in range(n_ctx)) + " " + name.replace("_", " ") + "." for name in classnames]
    return tokenize(texts)


def name_lengths(tokenize: Callable, classnames: Sequence[str]) -> List[int]:
    """Tokens of each class name alone: its EOT position (the argmax id) minus the SOT."""
    return [int(t.argmax()) - 1 for t in tokenize([name.replace("_", " ") for name in classnames])]


def layout(embedded: Tensor, ctx: Tensor, n_ctx: int, position: str = "end",
           name_lens: Optional[Sequence[int]] = None) -> Tensor:
    """The prompt embeddings [C, L, W] from the token embeddings of ``prompt_tokens``.

    embedded: [C, L, W] token embeddings (their n_ctx placeholder rows are replaced)
    ctx:      [n_ctx, W] (broadcast over the classes) or [C, n_ctx, W]
    position: "end" (class tokens after the context), "front" or "middle" (``name_lens``
              needed: the class tokens of each row move before / into the context)
    """
    c = embedded.shape[0]
    ctx = ctx.expand(c, -1, -1) if ctx.dim() == 2 else ctx
    sot, rest = embedded[:, :1], embedded[:, 1 + n_ctx:]
    if position == "end":
        return torch.cat([sot, ctx, rest], dim=1)
    if position not in ("front", "middle") or name_lens is None:
        raise ValueError(f"position {position!r} needs name_lens and is one of end, front, middle")
    cut = n_ctx // 2 if position == "middle" else 0
    rows = [torch.cat([sot[i], ctx[i, :cut], rest[i, :n], ctx[i, cut:], rest[i, n:]]) for i, n in enumerate(name_lens)]
    return torch.stack(rows)


def full_text_forward(clip_model: nn.Module, prompts: Tensor, tokens: Tensor,
                      deep_prompts: Optional[Sequence[Tensor]] = None) -> Tensor:
    """Text features [C, D] of prompt embeddings [C, L, W], every row at full length.

    ``deep_prompts``: MaPLe's deeper context blocks, for an OpenAI tower whose blocks take
    ``[x, deep_prompts, counter]`` (tests/support/family.py ``DeepPromptBlock``)."""
    x = prompts + clip_model.positional_embedding.to(prompts.dtype)
    transformer = clip_model.transformer
    if deep_prompts is not None:  # MaPLe's blocks: sequence first, [x, deeper, counter] in and out
        x = transformer([x.transpose(0, 1), list(deep_prompts), 0])[0].transpose(0, 1)
    elif getattr(transformer, "batch_first", False):  # open_clip
        x = transformer(x, attn_mask=clip_model.attn_mask)
    else:  # OpenAI's clip: sequence first, the causal mask held by each block
        x = transformer(x.transpose(0, 1)).transpose(0, 1)
    x = clip_model.ln_final(x).to(prompts.dtype)
    eot = tokens.argmax(dim=-1)
    return x[torch.arange(x.shape[0], device=x.device), eot] @ clip_model.text_projection


class ContextPrompts(nn.Module):
    """A learned context over frozen token embeddings, in the layout above.

    ctx: a Parameter [n_ctx, W] (one context, broadcast over the classes), or [M, n_ctx, W]
    with ``n_prompts=M`` (M contexts, one prompt tensor each), normal(std 0.02), in the
    model's compute dtype (``generator`` seeds it). ``forward()`` returns the
    prompts [C, L, W], or a list of M of them. ``tokens`` [C, L] is the buffer of token ids.
    """

    def __init__(self, clip_model: nn.Module, tokenize: Callable, classnames: Sequence[str], n_ctx: int,
                 n_prompts: Optional[int] = None, position: str = "end", generator: Optional[torch.Generator] = None):
        super().__init__()
        weight = clip_model.token_embedding.weight
        # OpenAI's clip.model.CLIP names its compute dtype (float16 weights keep a float32
        # token embedding); open_clip's computes in its embedding's dtype
        dtype = getattr(clip_model, "dtype", None) or weight.dtype
        tokens = prompt_tokens(tokenize, classnames, n_ctx)
        with torch.no_grad():
            embedded = clip_model.token_embedding(tokens.to(weight.device)).to(dtype)
        shape = (n_ctx, weight.shape[1]) if n_prompts is None else (n_prompts, n_ctx, weight.shape[1])
        ctx = torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02
        self.ctx = nn.Parameter(ctx.to(device=weight.device, dtype=dtype))
        self.register_buffer("tokens", tokens)
        self.register_buffer("embedded", embedded)
        self.n_ctx, self.position, self.several = n_ctx, position, n_prompts is not None
        self.name_lens = None if position == "end" else name_lengths(tokenize, classnames)

    def forward(self):
        if self.several:
            return [layout(self.embedded, ctx, self.n_ctx, self.position, self.name_lens) for ctx in self.ctx]
        return layout(self.embedded, self.ctx, self.n_ctx, self.position, self.name_lens)


class FullLengthTextEncoder(nn.Module):
    """``forward(prompts [C, L, W], tokens [C, L]) -> [C, D]`` by ``full_text_forward``: the
    text encoder ``CoOpTextEncoder`` replaces, with the same call. The CLIP model is
    registered as a submodule (its weights are shared, not copied)."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip_model = clip_model

    def forward(self, prompts: Tensor, tokens: Tensor) -> Tensor:
        return full_text_forward(self.clip_model, prompts, tokens)
