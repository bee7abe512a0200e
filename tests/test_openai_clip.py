"""OpenAI's ``clip`` package (and the code bases that vendor it, CoOp first): the CoOp-style
prompt layout and full-length text encoder (this project's stand-in, tests/support/
coop_layout.py) swapped for ``CoOpTextEncoder``, ``DeMul`` over an
OpenAI model, the refusals, and ``load_clip`` on an OpenAI checkpoint file."""

import pytest
import torch
import torch.nn as nn

from demul_fast import DeMul, towers
from demul_fast.coop import CoOpTextEncoder
from demul_fast.model import DeMulReference
from demul_fast.text_encoder import PrefixSharedTextEncoder, UnsupportedTextTower
from clip_tiny import openai_tokenize, tiny_openai_clip
from numerics import assert_error_rule
from support.coop_layout import ContextPrompts, FullLengthTextEncoder

NAMES = ["cat", "golden retriever", "extraordinarily long class name " * 14, "sea anemone", "x"]
N_CTX = 4


def coop_learner(model, position="end", seed=0):
    """A learned context [n_ctx, W] in the model's dtype over the NAMES prompts, in the
    CoOp-style layout with the class tokens at ``position`` (tests/support/coop_layout.py)."""
    return ContextPrompts(model, openai_tokenize, NAMES, N_CTX, position=position,
                          generator=torch.Generator().manual_seed(seed))


def coop_step(learner, encoder, upstream):
    """Features [C, D] and d ctx of one CoOp text-encoder call."""
    learner.zero_grad(set_to_none=True)
    out = encoder(learner(), learner.tokens)
    (out.double() * upstream).sum().backward()
    return out.detach(), learner.ctx.grad.detach().clone()


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_coop_layout_float64_is_exact_and_does_less_work(position):
    model = tiny_openai_clip()
    learner = coop_learner(model, position)
    upstream = torch.randn(len(NAMES), 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t_coop, g_coop = coop_step(learner, FullLengthTextEncoder(model), upstream)
    fast = CoOpTextEncoder(model)
    t_fast, g_fast = coop_step(learner, fast, upstream)
    torch.testing.assert_close(t_fast, t_coop, rtol=1e-10, atol=1e-11 * float(t_coop.abs().max()))
    torch.testing.assert_close(g_fast, g_coop, rtol=1e-9, atol=1e-10 * float(g_coop.abs().max()))
    plan = fast.last_plan
    # end: [SOT] + ctx shared. middle / front: CoOp builds each class's row apart and stacks the
    # rows (cat along dim 0), so no shared block is provable from the graph: truncated and packed only
    assert plan.shared_len == (1 + N_CTX if position == "end" else 0)
    assert plan.tokens < 0.5 * len(NAMES) * 77  # CoOp runs C * 77 positions; the long name alone needs 77


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_coop_layout_low_precision_error_rule(dtype):
    """float32 and the float16-cast weights of ``clip.build_model`` (CoOp's fp16 setting):
    CoOpTextEncoder's error vs float64 at most 2x (3x for d ctx) CoOp's own in that dtype."""
    model64, model_lp = tiny_openai_clip(seed=3), tiny_openai_clip(seed=3, dtype=dtype)
    assert model_lp.dtype == dtype
    learner_lp = coop_learner(model_lp)
    learner64 = coop_learner(model64)
    with torch.no_grad():
        learner64.ctx.copy_(learner_lp.ctx)
    upstream = torch.randn(len(NAMES), 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t64, g64 = coop_step(learner64, FullLengthTextEncoder(model64), upstream)
    t_plain, g_plain = coop_step(learner_lp, FullLengthTextEncoder(model_lp), upstream)
    t_fast, g_fast = coop_step(learner_lp, CoOpTextEncoder(model_lp), upstream)
    assert t_fast.dtype == dtype and g_fast.dtype == dtype
    # float16-cast weights compute in float16 by design (CoOp's setting): so does the yardstick
    assert_error_rule(f"CoOp T {dtype}", t_fast, t64, t_plain, k=2.0, compute_dtype=dtype)
    assert_error_rule(f"CoOp dctx {dtype}", g_fast, g64, g_plain, k=3.0, compute_dtype=dtype)


def test_demul_over_openai_clip_matches_the_reference():
    model = tiny_openai_clip(seed=4)
    gen = torch.Generator().manual_seed(5)
    llm = torch.randn(len(NAMES), 24, generator=gen, dtype=torch.float64)
    phi = nn.Linear(48, 24).double()
    kw = dict(llm_embeddings=llm, phi=phi, n_prompts=3, n_ctx=N_CTX, ctx_init="a photo of a")
    fast, ref = DeMul(model, openai_tokenize, NAMES, **kw), DeMulReference(model, openai_tokenize, NAMES, **kw)
    torch.testing.assert_close(fast.ctx, ref.ctx)  # "a photo of a": the token embeddings, through the tower API
    images = torch.randn(6, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    out_f, out_r = fast(images, labels), ref(images, labels)
    torch.testing.assert_close(out_f.loss, out_r.loss, rtol=1e-9, atol=1e-12)
    (gf,) = torch.autograd.grad(out_f.loss, fast.ctx)
    (gr,) = torch.autograd.grad(out_r.loss, ref.ctx)
    torch.testing.assert_close(gf, gr, rtol=1e-7, atol=1e-12)


def _with_block(model, i, block):
    model.transformer.resblocks[i] = block
    return model


class MaPLeStyleBlock(nn.Module):
    """MaPLe's text block: the standard modules, but forward takes [x, prompts, counter]."""

    def __init__(self, blk):
        super().__init__()
        self.attn, self.ln_1, self.mlp, self.ln_2, self.attn_mask = blk.attn, blk.ln_1, blk.mlp, blk.ln_2, blk.attn_mask

    def forward(self, inputs):
        x, prompts, counter = inputs
        return [x, prompts, counter]


class ScaledResidualBlock(MaPLeStyleBlock):
    """Same modules and signature as OpenAI's block, another computation."""

    def forward(self, x):
        x = x + 0.5 * self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False,
                                attn_mask=self.attn_mask.to(x.dtype))[0]
        return x + self.mlp(self.ln_2(x))


@pytest.mark.parametrize("change, match", [
    (lambda m: setattr(m.transformer.resblocks[1], "attn_mask", None), "resblock 1 .* no attention mask"),
    (lambda m: setattr(m.transformer.resblocks[0], "attn_mask", torch.zeros(77, 77)), "all-zero attention mask"),
    (lambda m: _with_block(m, 1, MaPLeStyleBlock(m.transformer.resblocks[1])), "MaPLeStyleBlock.*forward fails"),
    (lambda m: _with_block(m, 0, ScaledResidualBlock(m.transformer.resblocks[0])),
     "ScaledResidualBlock.*not the standard causal pre-LN residual block"),
])
def test_refusals_name_what_was_found(change, match):
    model = tiny_openai_clip(dtype=torch.float32)
    change(model)
    assert towers.family(model).name == "openai_clip"
    for build in (lambda: CoOpTextEncoder(model), lambda: PrefixSharedTextEncoder(model, openai_tokenize, NAMES, 2)):
        with pytest.raises(UnsupportedTextTower, match=match):
            build()


def test_bidirectional_tower_falls_back_to_the_full_path():
    model = tiny_openai_clip()
    for blk in model.transformer.resblocks:
        blk.attn_mask = None
    enc = PrefixSharedTextEncoder(model, openai_tokenize, NAMES, N_CTX, fallback="full")
    assert enc.mode == "full"
    x_id = openai_tokenize(["X"])[0, 1]
    ctx = model.token_embedding(x_id).expand(1, N_CTX, -1)
    ids = openai_tokenize([" ".join(["X"] * N_CTX) + " " + n + "." for n in NAMES])
    torch.testing.assert_close(enc(ctx)[:, 0], model.encode_text(ids), rtol=1e-11, atol=1e-12)


def test_siglip_style_transformers_tower_is_refused():
    import transformers
    cfg = transformers.SiglipTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16)
    model = transformers.SiglipTextModel(cfg).eval()
    assert towers.family(model).name == "transformers"
    with pytest.raises(UnsupportedTextTower, match="SigLIP-style"):
        towers.text_tower(model)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_load_clip_reads_an_openai_checkpoint(tmp_path):
    """An OpenAI-format TorchScript file as ``--pretrained``: OpenAI's model and tokenizer
    (heads = width / 64, as clip.build_model infers them)."""
    from clip_tiny import tiny_config
    from demul_fast.app.models import load_clip

    model = tiny_openai_clip(heads=1, dtype=torch.float32, embed_dim=32)
    ids = openai_tokenize(["a photo of a cat.", "x"])
    traced = torch.jit.trace(model, (torch.randn(1, 3, 32, 32), ids[:1]), check_trace=False)
    path = tmp_path / "tiny-openai.pt"
    traced.save(str(path))
    config = tiny_config(tmp_path)
    clip_model, tokenizer, pre_cfg, info = load_clip(str(config), str(path), torch.device("cpu"))
    assert type(clip_model).__name__ == "CLIP" and towers.family(clip_model).name == "openai_clip"
    assert info["family"] == "openai_clip" and pre_cfg["size"] == (32, 32)
    assert clip_model.dtype == torch.float32  # float16 in the file, float32 on CPU as clip.load does
    torch.testing.assert_close(tokenizer(["a photo of a cat.", "x"]), ids)
    torch.testing.assert_close(clip_model.encode_text(ids), model.encode_text(ids), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="OpenAI CLIP checkpoint"):
        load_clip("ViT-B-16", str(path), torch.device("cpu"))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_train_and_eval_with_an_openai_checkpoint(tmp_path):
    """``demul-fast train --pretrained <OpenAI checkpoint file>`` end to end on CPU (one
    epoch, no distillation), and ``eval`` rebuilds the same model from the file."""
    import json

    import numpy as np
    from PIL import Image

    from clip_tiny import tiny_config
    from demul_fast.app import cli

    model = tiny_openai_clip(heads=1, dtype=torch.float32, embed_dim=32, seed=6)
    ckpt = tmp_path / "openai.pt"
    traced = torch.jit.trace(model, (torch.randn(1, 3, 32, 32), openai_tokenize(["a cat."])), check_trace=False)
    traced.save(str(ckpt))
    rng = np.random.default_rng(0)
    for c, colour in (("red_thing", (230, 30, 30)), ("blue_thing", (30, 30, 230))):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            img = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "data" / c / f"{i}.png")
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "data"), "--out", str(out), "--model", str(tiny_config(tmp_path)),
            "--pretrained", str(ckpt), "--shots", "2", "--epochs", "1", "--batch-size", "4", "--prompts", "2",
            "--n-ctx", "2", "--alpha", "0", "--workers", "0", "--device", "cpu", "--no-progress"]
    assert cli.main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["clip"]["family"] == "openai_clip" and run["module"] == "DeMul"
    assert cli.main(["eval", "--checkpoint", str(out), "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 2
