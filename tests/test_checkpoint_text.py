"""Per-layer activation checkpointing of the prefix-shared text encoder (``checkpoint_text``):
the same loss and gradients, bit for bit on the CPU (the backward recomputes each layer with
the same operations), and less activation memory held between forward and backward."""

import os
import sys

import open_clip
import pytest
import torch
from open_clip.model import CLIP

from demul_fast import DeMul
from clip_tiny import tiny_hf_clip

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.distributed_memory import SavedActivations  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["cat", "golden_retriever", "x", "sea anemone", "a rather long class name with many words"]


def _open_clip():
    torch.manual_seed(0)
    text = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=3)
    clip = CLIP(embed_dim=48, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=32),
                text_cfg=text)
    return clip.eval(), open_clip.get_tokenizer("ViT-B-16")


def _hf():
    return tiny_hf_clip().float(), open_clip.get_tokenizer("ViT-B-16")  # the same BPE vocabulary


@pytest.mark.parametrize("family", ["open_clip", "transformers"])
def test_checkpointing_is_exact_and_saves_activations(family, gen):
    clip, tok = _open_clip() if family == "open_clip" else _hf()
    e = torch.randn(len(NAMES), 20, generator=gen)
    d = 48  # the joint embedding width of both tiny models
    phi = torch.nn.Linear(d, 20)
    results, held = [], []
    for checkpoint in (False, True):
        torch.manual_seed(1)
        model = DeMul(clip, tok, NAMES, llm_embeddings=e, phi=phi, n_prompts=3, n_ctx=4, backend="torch",
                      checkpoint_text=checkpoint)
        with torch.no_grad():
            model.head.prompt_logits.normal_(generator=torch.Generator().manual_seed(2))
        x = torch.randn(7, d, generator=torch.Generator().manual_seed(3))
        y = torch.tensor([0, 1, 2, 3, 4, 0, 2])
        with SavedActivations(clip) as saved:
            t = model.text_features()
        held.append(saved.bytes)
        out = model.head(t, x, y, scale=100.0)
        out.loss.backward()
        results.append([out.loss.detach(), model.ctx.grad, model.head.prompt_logits.grad])
    for name, plain, ckpt in zip(["loss", "dctx", "dA"], *results):
        assert torch.equal(plain, ckpt), name
    print(f"{family}: text-encoder activations held for the backward {held[0]} B, checkpointed {held[1]} B")
    assert held[1] < held[0] / 2


def test_checkpointing_needs_the_prefix_encoder():
    clip, tok = _open_clip()
    with pytest.raises(ValueError, match="checkpoint_text"):
        DeMul(clip, tok, NAMES, n_prompts=2, n_ctx=4, text_encoder="full", checkpoint_text=True)
