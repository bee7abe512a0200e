"""CoOp prompt construction and tokenisation (docs/SPEC.md section 3).

Prompt m of class c is ``[SOT] ctx_m[0] .. ctx_m[n_ctx-1] <class name> . [EOT] <padding>``:
the text ``"X X ... X <name>."`` (n_ctx placeholders, underscores of the name replaced by
spaces) is tokenised by the model's tokenizer and the token embeddings at positions
1..n_ctx are replaced by the learned context, exactly as CoOp builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

Tensor = torch.Tensor


def tokenize(tokenizer: Callable, texts: Sequence[str], context_length: Optional[int] = None) -> Tensor:
    """Token ids [N, L] (int64) of ``texts``.

    ``tokenizer`` is an open_clip tokenizer or ``clip.tokenize`` (return an integer tensor),
    any callable that does the same, or a Hugging Face tokenizer (called with max-length padding to
    ``context_length``).
    """
    texts = list(texts)
    out = tokenizer(texts)
    if not isinstance(out, torch.Tensor):
        if context_length is None:
            raise ValueError("context_length is needed to pad a Hugging Face tokenizer's output")
        out = tokenizer(texts, padding="max_length", max_length=context_length, truncation=True,
                        return_tensors="pt")["input_ids"]
    if out.dim() != 2 or out.shape[0] != len(texts):
        raise ValueError(f"tokenizer returned shape {tuple(out.shape)} for {len(texts)} texts, expected [N, L]")
    return out.long()


def _argmax_pool(ids: Tensor) -> Tensor:
    return ids.argmax(dim=-1)


@dataclass
class Prompts:
    """Tokenised CoOp prompts of C classes with n_ctx context tokens.

    classnames: the C names as used in the prompts (underscores replaced by spaces)
    ids:        [C, L] token ids of ``"X X ... X <name>."``
    eot:        [C] the pooled (EOT) position of each prompt
    suffix_ids: [C, S] ids at positions n_ctx+1 .. n_ctx+S (name, ".", EOT, padding), with
                S = max(eot) - n_ctx, i.e. the prompts truncated after the last EOT
    suffix_eot: [C] eot - (n_ctx + 1): the EOT position inside the suffix
    """

    classnames: List[str]
    n_ctx: int
    ids: Tensor
    eot: Tensor
    suffix_ids: Tensor
    suffix_eot: Tensor

    @property
    def prefix_len(self) -> int:
        """P = 1 + n_ctx: [SOT] and the context."""
        return 1 + self.n_ctx


def build_prompts(classnames: Sequence[str], n_ctx: int, tokenizer: Callable,
                  pool_positions: Callable[[Tensor], Tensor] = _argmax_pool,
                  context_length: Optional[int] = None) -> Prompts:
    """Tokenise CoOp prompts; ``pool_positions(ids [C, L]) -> [C]`` is the tower's pooling
    rule (argmax of the ids for OpenAI CLIP). Raises ValueError on an empty class list, a
    non-positive n_ctx, or prompts whose EOT falls inside the context."""
    names = [str(c).replace("_", " ") for c in classnames]
    if len(names) == 0:
        raise ValueError("classnames is empty: at least one class is needed")
    if not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
    placeholder = " ".join(["X"] * n_ctx)
    ids = tokenize(tokenizer, [placeholder + " " + name + "." for name in names], context_length)
    if ids.shape[1] < n_ctx + 2:
        raise ValueError(f"n_ctx={n_ctx} does not fit the tokenizer's context length {ids.shape[1]}")
    ctx_ids = ids[:, 1:1 + n_ctx]
    if not bool((ctx_ids == ctx_ids[:1, :1]).all()) or not bool((ids[:, 0] == ids[0, 0]).all()):
        raise ValueError("the tokenizer does not map the prompt start and each 'X' placeholder to one token; "
                         "cannot locate the context positions")
    eot = pool_positions(ids).long()
    if bool((eot <= n_ctx).any()):
        bad = [names[i] for i in torch.nonzero(eot <= n_ctx).flatten().tolist()]
        raise ValueError(f"the EOT of the prompts of {bad} falls inside the context: n_ctx={n_ctx} is too long "
                         f"for the context length {ids.shape[1]}")
    s = int(eot.max()) - n_ctx
    return Prompts(classnames=names, n_ctx=n_ctx, ids=ids, eot=eot,
                   suffix_ids=ids[:, n_ctx + 1:n_ctx + 1 + s].contiguous(), suffix_eot=eot - (n_ctx + 1))


def init_phrase_tokens(phrase: str, tokenizer: Callable, pool_positions: Callable[[Tensor], Tensor] = _argmax_pool,
                       context_length: Optional[int] = None) -> Tensor:
    """Token ids [n] of ``phrase`` (underscores as spaces) between [SOT] and [EOT], for
    initialising the context from a phrase such as "a photo of a" (CoOp's ``ctx_init``)."""
    ids = tokenize(tokenizer, [phrase.replace("_", " ")], context_length)
    eot = int(pool_positions(ids)[0])
    return ids[0, 1:eot]
