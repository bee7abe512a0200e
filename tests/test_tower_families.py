"""The same test matrix for every CLIP family in ``demul_fast.towers`` (open_clip,
transformers, OpenAI ``clip``), against each library's own forward.

The library's forward (``encode_text`` / ``get_text_features`` on token ids) is made to
see the learned context by a forward hook on its token embedding that replaces positions
1..n_ctx by ctx[m]; so outputs and ctx gradients of ``PrefixSharedTextEncoder`` and
``text_encoder.FullTextEncoder`` are compared with code none of demul_fast wrote: exact in
float64, the error rule (tests/numerics.py) in float32 and, for OpenAI, with the weights
cast to float16 as ``clip.build_model`` casts them.
"""

import copy

import open_clip
import pytest
import torch
from open_clip.model import CLIP

from demul_fast import towers
from demul_fast.coop import CoOpTextEncoder
from demul_fast.phi import clip_text_features
from demul_fast.text_encoder import FullTextEncoder
from demul_fast.text_encoder import PrefixSharedTextEncoder
from clip_tiny import openai_tokenize, tiny_hf_clip, tiny_openai_clip
from numerics import assert_error_rule

FAMILIES = ["open_clip", "transformers", "openai_clip"]
LONG_NAME = "extraordinarily long_class name " * 14  # past 77 tokens: truncated, EOT at position 76
NAMES = ["cat", "golden_retriever", LONG_NAME, "sea anemone"]
N_CTX, M, D = 4, 2, 48


def build(family: str, seed: int = 0):
    """(float64 model, tokenizer) of a small random model of ``family``."""
    if family == "open_clip":
        torch.manual_seed(seed)
        model = CLIP(embed_dim=D, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=32),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ln" in name or "bias" in name:
                    p.add_(0.1 * torch.randn_like(p))
        return model.double().eval().requires_grad_(False), open_clip.get_tokenizer("ViT-B-16")
    if family == "transformers":
        return tiny_hf_clip(seed=seed), open_clip.get_tokenizer("ViT-B-16")
    return tiny_openai_clip(seed=seed), openai_tokenize


def to_low_precision(family: str, model64, dtype, seed: int):
    """``model64``'s weights in ``dtype``; OpenAI's rebuilt with its own LayerNorm (float16:
    ``clip.build_model``'s cast, see tests/clip_tiny.py)."""
    if family == "openai_clip":
        return tiny_openai_clip(seed=seed, dtype=dtype)
    return copy.deepcopy(model64).to(dtype)


def own_embedding_and_encode(family: str, model):
    """The library's token embedding module and its own text forward on ids."""
    if family == "transformers":
        def encode(ids):
            out = model.get_text_features(input_ids=ids)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        return model.text_model.embeddings.token_embedding, encode
    return model.token_embedding, model.encode_text


def own_features(family: str, model, ids, ctx):
    """[C, M, D]: the library's own forward on ``ids`` [C, L] with positions 1..n_ctx of its
    token embeddings replaced by ctx[m] (differentiable w.r.t. ctx [M, n_ctx, W])."""
    emb, encode = own_embedding_and_encode(family, model)
    n = ctx.shape[1]
    rows = []
    for m in range(ctx.shape[0]):
        def hook(module, inputs, out, c=ctx[m]):
            return torch.cat([out[:, :1], c.to(out.dtype).expand(out.shape[0], -1, -1), out[:, 1 + n:]], dim=1)
        handle = emb.register_forward_hook(hook)
        try:
            rows.append(encode(ids))
        finally:
            handle.remove()
    return torch.stack(rows, dim=1)


def features_and_grad(fn, ctx, upstream):
    ctx = ctx.detach().clone().requires_grad_()
    out = fn(ctx)
    (grad,) = torch.autograd.grad((out.double() * upstream).sum(), ctx)
    return out.detach(), grad


def inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    ctx = 0.3 * torch.randn(M, N_CTX, 64, generator=gen, dtype=torch.float64)
    upstream = torch.randn(len(NAMES), M, D, generator=gen, dtype=torch.float64)
    return ctx, upstream


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_chosen_by_structure(family):
    model, _ = build(family)
    assert towers.family(model).name == family
    enc = CoOpTextEncoder(model)  # holds the text modules under the family's own names
    assert towers.family(enc).name == family
    assert towers.text_tower(enc).width == 64


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_matches_the_librarys_own_forward(family):
    model, tok = build(family)
    fast = PrefixSharedTextEncoder(model, tok, NAMES, N_CTX)
    full = FullTextEncoder(model, tok, NAMES, N_CTX)
    assert fast.num_tokens == (1 + N_CTX, 76 - N_CTX)  # the long name reaches the last position
    ctx, upstream = inputs()
    t_own, g_own = features_and_grad(lambda c: own_features(family, model, full.ids, c), ctx, upstream)
    for name, enc in (("prefix", fast), ("full", full)):
        t, g = features_and_grad(enc, ctx, upstream)
        assert t.shape == (len(NAMES), M, D)
        torch.testing.assert_close(t, t_own, rtol=1e-10, atol=1e-11 * float(t_own.abs().max()), msg=name)
        torch.testing.assert_close(g, g_own, rtol=1e-9, atol=1e-10 * float(g_own.abs().max()), msg=name)


@pytest.mark.parametrize("family, dtype", [(f, torch.float32) for f in FAMILIES] + [("openai_clip", torch.float16)])
def test_low_precision_error_rule(family, dtype):
    """Prefix path in ``dtype`` vs the float64 library forward: at most 2x (3x for ctx
    gradients) the error of the library's own forward run in the same dtype."""
    model64, tok = build(family, seed=2)
    model_lp = to_low_precision(family, model64, dtype, seed=2)
    fast = PrefixSharedTextEncoder(model_lp, tok, NAMES, N_CTX)
    assert fast.tower.dtype == dtype
    ids = FullTextEncoder(model64, tok, NAMES, N_CTX).ids
    ctx, upstream = inputs(3)
    t64, g64 = features_and_grad(lambda c: own_features(family, model64, ids, c), ctx, upstream)
    ctx_lp = ctx.to(dtype if dtype != torch.float16 else torch.float32)  # CoOp keeps a float32 ctx for fp16 CLIP
    t_plain, g_plain = features_and_grad(lambda c: own_features(family, model_lp, ids, c), ctx_lp, upstream)
    t_fast, g_fast = features_and_grad(fast, ctx_lp, upstream)
    assert t_fast.dtype == t_plain.dtype == dtype
    # float16-cast OpenAI weights compute in float16 by design (CoOp's setting): so does the yardstick
    assert_error_rule(f"{family} T {dtype}", t_fast, t64, t_plain, k=2.0, dtype=dtype, compute_dtype=dtype)
    assert_error_rule(f"{family} dctx {dtype}", g_fast, g64, g_plain, k=3.0, dtype=dtype, compute_dtype=dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_phi_features_are_the_librarys_own(family):
    model, tok = build(family)
    feats = clip_text_features(model, tok, ["cat", "sea_anemone"], device="cpu")
    _, encode = own_embedding_and_encode(family, model)
    ids = open_clip.get_tokenizer("ViT-B-16")(["a photo of a cat.", "a photo of a sea anemone."])  # same BPE
    own = torch.nn.functional.normalize(encode(ids).float(), dim=-1)
    torch.testing.assert_close(feats, own)


def test_transformers_text_model_with_projection():
    """``CLIPTextModelWithProjection`` (no image tower, no get_text_features): the tower,
    the prefix path and phi's features (demul_fast.phi) all match its own ``text_embeds``."""
    import transformers
    full = tiny_hf_clip()
    model = transformers.CLIPTextModelWithProjection(full.config.text_config).double().eval().requires_grad_(False)
    model.text_model.load_state_dict(full.text_model.state_dict())
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.randn_like(model.text_projection.weight))
    tok = open_clip.get_tokenizer("ViT-B-16")
    assert towers.family(model).name == "transformers"
    fast = PrefixSharedTextEncoder(model, tok, NAMES, N_CTX)
    x = model.text_model.embeddings.token_embedding(tok(["X"])[0, 1]).expand(1, N_CTX, -1)
    ids = tok([" ".join(["X"] * N_CTX) + " " + n.replace("_", " ") + "." for n in NAMES])
    own = model(input_ids=ids).text_embeds
    torch.testing.assert_close(fast(x)[:, 0], own, rtol=1e-10, atol=1e-12)
    feats = clip_text_features(model, tok, ["cat"], device="cpu")
    own = model(input_ids=tok(["a photo of a cat."])).text_embeds
    torch.testing.assert_close(feats, torch.nn.functional.normalize(own.float(), dim=-1))
