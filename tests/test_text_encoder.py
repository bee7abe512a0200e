"""PrefixSharedTextEncoder (SPEC 3.1) against the full-length CoOp computation (SPEC 3).

Three computations must agree: the prefix-shared encoder, ``text_encoder.FullTextEncoder``
and, independently of both, open_clip's ``encode_text`` steps written out here on the same
embeddings (and ``encode_text`` itself on token ids when the context is the 'X' token's
embedding). Small custom text towers keep this fast; one test uses ViT-B-16's text tower.
"""

import copy

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CustomTextCLIP

from demul_fast import prefix_attention
from demul_fast.prefix_attention import PackedLayout, shared_prefix_attention
from demul_fast.text_encoder import FullTextEncoder
from demul_fast.text_encoder import (PrefixSharedTextEncoder, UnsupportedTextTower, prefix_shared_forward,
                                     text_tower)
from clip_tiny import tiny_hf_clip
from numerics import assert_error_rule

TINY_VISION = dict(image_size=32, layers=1, width=32, patch_size=16, head_width=32)
SMALL_TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
LONG_NAME = "extraordinarily long_class name " * 14  # tokenised past 77: truncated, EOT at position 76
NAMES = ["cat", "golden_retriever", "x", LONG_NAME, "Komodo dragon", "sea anemone"]

VARIANTS = {
    "default": dict(),
    "quickgelu": dict(quick_gelu=True),
    "layerscale": dict(text=dict(ls_init_value=0.3)),
    "proj_linear_bias": dict(text=dict(proj_bias=True)),
    "eos_pool": dict(text=dict(pool_type="eos", eos_id=49407)),
    "custom_text": dict(custom=True),
}


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


def make_clip(seed=0, text=None, quick_gelu=False, custom=False, dtype=torch.float64):
    torch.manual_seed(seed)
    cls = CustomTextCLIP if custom else CLIP
    model = cls(embed_dim=48, vision_cfg=TINY_VISION, text_cfg={**SMALL_TEXT, **(text or {})}, quick_gelu=quick_gelu)
    with torch.no_grad():  # LayerNorm affine and biases away from their (1, 0) init, so a missed one shows
        for name, p in model.named_parameters():
            if "ln" in name or "bias" in name or "gamma" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval().requires_grad_(False)


def encode_text_on_embeddings(model, x, pool):
    """open_clip's CLIP.encode_text, written out, from token embeddings x [N, L, W]."""
    t = getattr(model, "text", model)
    pool_type = getattr(t, "pool_type", getattr(t, "text_pool_type", "argmax"))
    assert pool_type in ("argmax", "eos")
    x = x + t.positional_embedding
    x = t.transformer(x, attn_mask=t.attn_mask)
    x = t.ln_final(x)
    x = x[torch.arange(x.shape[0]), pool]
    proj = t.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def direct_features(model, full: FullTextEncoder, ctx):
    """[C, M, D] through ``encode_text_on_embeddings``, prompt by prompt."""
    emb = getattr(model, "text", model).token_embedding(full.ids)
    n = ctx.shape[1]
    rows = []
    for m in range(ctx.shape[0]):
        x = torch.cat([emb[:, :1], ctx[m].expand(emb.shape[0], -1, -1), emb[:, 1 + n:]], dim=1)
        rows.append(encode_text_on_embeddings(model, x, full.eot))
    return torch.stack(rows, dim=1)


def features_and_grad(encoder, ctx, upstream):
    ctx = ctx.detach().clone().requires_grad_()
    out = encoder(ctx)
    (grad,) = torch.autograd.grad((out * upstream).sum(), ctx)
    return out.detach(), grad


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float64_matches_full_and_encode_text(variant, tokenizer):
    model = make_clip(**VARIANTS[variant])
    n_ctx, m = 5, 3
    fast = PrefixSharedTextEncoder(model, tokenizer, NAMES, n_ctx)
    full = FullTextEncoder(model, tokenizer, NAMES, n_ctx)
    p, s = fast.num_tokens
    assert (p, s) == (1 + n_ctx, 76 - n_ctx)  # the long name reaches the last position
    gen = torch.Generator().manual_seed(1)
    ctx = 0.3 * torch.randn(m, n_ctx, 64, generator=gen, dtype=torch.float64)
    upstream = torch.randn(len(NAMES), m, 48, generator=gen, dtype=torch.float64)
    t_fast, g_fast = features_and_grad(fast, ctx, upstream)
    t_full, g_full = features_and_grad(full, ctx, upstream)
    t_dir, g_dir = features_and_grad(lambda c: direct_features(model, full, c), ctx, upstream)
    assert t_fast.shape == (len(NAMES), m, 48)
    for name, a, b in [("fast-full", t_fast, t_full), ("full-direct", t_full, t_dir),
                       ("grad fast-full", g_fast, g_full), ("grad full-direct", g_full, g_dir)]:
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11 * float(b.abs().max()), msg=name)


def test_x_context_equals_encode_text(tokenizer):
    """With ctx = the embedding of 'X', the prompts are exactly CoOp's token strings."""
    model = make_clip(seed=3, text=dict(ls_init_value=0.5))
    n_ctx = 4
    fast = PrefixSharedTextEncoder(model, tokenizer, NAMES, n_ctx)
    x_id = tokenizer(["X"])[0, 1]
    ctx = model.token_embedding(x_id).expand(2, n_ctx, -1)
    ids = tokenizer([" ".join(["X"] * n_ctx) + " " + n.replace("_", " ") + "." for n in NAMES])
    expected = model.encode_text(ids)
    torch.testing.assert_close(fast(ctx), expected.unsqueeze(1).expand(-1, 2, -1), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("variant, dtype", [("default", torch.float32), ("layerscale", torch.float32),
                                            ("default", torch.bfloat16), ("default", torch.float16)])
def test_low_precision_error_rule(variant, dtype, tokenizer):
    """Prefix path in float32/bfloat16/float16 vs float64 reference: at most 2x (3x for
    gradients) the error of the full path in the same dtype (tests/numerics.py)."""
    model64 = make_clip(seed=5, **VARIANTS[variant])
    model_lp = copy.deepcopy(model64).to(dtype)
    n_ctx, m = 7, 2
    gen = torch.Generator().manual_seed(2)
    ctx = 0.3 * torch.randn(m, n_ctx, 64, generator=gen, dtype=torch.float64)
    upstream = torch.randn(len(NAMES), m, 48, generator=gen, dtype=torch.float64)
    t64, g64 = features_and_grad(FullTextEncoder(model64, tokenizer, NAMES, n_ctx), ctx, upstream)
    t_plain, g_plain = features_and_grad(FullTextEncoder(model_lp, tokenizer, NAMES, n_ctx), ctx.to(dtype),
                                         upstream.to(dtype))
    t_fast, g_fast = features_and_grad(PrefixSharedTextEncoder(model_lp, tokenizer, NAMES, n_ctx), ctx.to(dtype),
                                       upstream.to(dtype))
    assert t_fast.dtype == dtype and g_fast.dtype == dtype
    # the model's layers run in dtype by design: the yardstick is the full path in dtype
    assert_error_rule(f"T {dtype}", t_fast, t64, t_plain, k=2.0, compute_dtype=dtype)
    assert_error_rule(f"dctx {dtype}", g_fast, g64, g_plain, k=3.0, compute_dtype=dtype)


def test_vit_b16_text_tower(tokenizer):
    """ViT-B-16's text tower (width 512, 12 layers, 8 heads), random init, float64."""
    cfg = open_clip.get_model_config("ViT-B-16")
    torch.manual_seed(0)
    model = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=TINY_VISION, text_cfg=cfg["text_cfg"])
    model = model.double().eval().requires_grad_(False)
    names, n_ctx, m = ["cat", "golden_retriever", "sea anemone"], 16, 2
    gen = torch.Generator().manual_seed(3)
    ctx = 0.02 * torch.randn(m, n_ctx, 512, generator=gen, dtype=torch.float64)
    upstream = torch.randn(len(names), m, 512, generator=gen, dtype=torch.float64)
    t_fast, g_fast = features_and_grad(PrefixSharedTextEncoder(model, tokenizer, names, n_ctx), ctx, upstream)
    t_full, g_full = features_and_grad(FullTextEncoder(model, tokenizer, names, n_ctx), ctx, upstream)
    torch.testing.assert_close(t_fast, t_full, rtol=1e-11, atol=1e-11 * float(t_full.abs().max()))
    torch.testing.assert_close(g_fast, g_full, rtol=1e-10, atol=1e-10 * float(g_full.abs().max()))


@pytest.mark.parametrize("p, s, eot", [(3, 5, [[0, 4, 2, 3], [4, 1, 0, 2]]),
                                       (7, 3, [[0, 2, 1, 2], [2, 1, 0, 0]])])  # P > S: J = 3 prefix items, 2 pad slots
def test_prefix_shared_forward_groups_with_distinct_suffixes(tokenizer, p, s, eot):
    """The core function with G groups of N arbitrary (not shared, not expanded) suffixes of
    varying EOT, against each sequence run alone through encode_text's steps; the prefix
    longer or shorter than the suffix slots (the prefix queries' items in the attention call)."""
    model = make_clip(seed=7, text=dict(ls_init_value=0.2))
    g, n, w = 2, 4, 64
    gen = torch.Generator().manual_seed(4)
    prefix = torch.randn(g, p, w, generator=gen, dtype=torch.float64)
    suffix = torch.randn(g, n, s, w, generator=gen, dtype=torch.float64)
    eot = torch.tensor(eot)
    prefix.requires_grad_()
    out = prefix_shared_forward(text_tower(model), prefix, suffix, eot)
    assert out.shape == (g, n, 48)
    x = torch.cat([prefix.unsqueeze(1).expand(g, n, p, w), suffix], dim=2).reshape(g * n, p + s, w)
    pad = torch.zeros(g * n, 77 - p - s, w, dtype=x.dtype)  # positions after the EOT: never seen by it
    expected = encode_text_on_embeddings(model, torch.cat([x, pad], dim=1), (eot + p).flatten()).view(g, n, -1)
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-12)
    up = torch.randn(g, n, 48, generator=gen, dtype=torch.float64)
    (ga,) = torch.autograd.grad((out * up).sum(), prefix)
    (gb,) = torch.autograd.grad((expected * up).sum(), prefix)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-11)
    layout = PackedLayout.build(g, p, n, s, eot)  # a layout built once and reused
    torch.testing.assert_close(prefix_shared_forward(text_tower(model), prefix, suffix, eot, layout=layout), out)
    with pytest.raises(ValueError, match="layout is for"):
        prefix_shared_forward(text_tower(model), prefix[:, :2], suffix, eot, layout=layout)


@pytest.mark.parametrize("eos_token_id", [49407, 2])
def test_transformers_clip(eos_token_id, tokenizer):
    """A small random transformers CLIPModel: prefix path vs full path vs its own
    get_text_features (new configs pool at the first eos_token_id, legacy eos 2 at argmax)."""
    model = tiny_hf_clip(eos_token_id=eos_token_id)
    n_ctx, m = 4, 2
    fast = PrefixSharedTextEncoder(model, tokenizer, NAMES, n_ctx)
    full = FullTextEncoder(model, tokenizer, NAMES, n_ctx)
    gen = torch.Generator().manual_seed(5)
    ctx = 0.3 * torch.randn(m, n_ctx, 64, generator=gen, dtype=torch.float64)
    upstream = torch.randn(len(NAMES), m, 48, generator=gen, dtype=torch.float64)
    t_fast, g_fast = features_and_grad(fast, ctx, upstream)
    t_full, g_full = features_and_grad(full, ctx, upstream)
    torch.testing.assert_close(t_fast, t_full, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(g_fast, g_full, rtol=1e-10, atol=1e-11)
    x_emb = model.text_model.embeddings.token_embedding(tokenizer(["X"])[0, 1]).expand(1, n_ctx, -1)
    ids = tokenizer([" ".join(["X"] * n_ctx) + " " + n.replace("_", " ") + "." for n in NAMES])
    own = model.get_text_features(input_ids=ids)
    own = own if isinstance(own, torch.Tensor) else own.pooler_output
    torch.testing.assert_close(fast(x_emb)[:, 0], own, rtol=1e-11, atol=1e-12)


def test_refuses_non_causal_tower_and_falls_back(tokenizer):
    model = make_clip(text=dict(no_causal_mask=True))
    with pytest.raises(UnsupportedTextTower, match="causal"):
        PrefixSharedTextEncoder(model, tokenizer, NAMES[:3], 4)
    enc = PrefixSharedTextEncoder(model, tokenizer, NAMES[:3], 4, fallback="full")
    assert enc.mode == "full"
    ctx = torch.randn(2, 4, 64, dtype=torch.float64)
    torch.testing.assert_close(enc(ctx), FullTextEncoder(model, tokenizer, NAMES[:3], 4)(ctx))


@pytest.mark.parametrize("text, match", [(dict(pool_type="first"), "pooling"),
                                         (dict(qk_norm=True), "standard residual attention block"),
                                         (dict(embed_cls=True), "class token")])
def test_refuses_other_towers(text, match, tokenizer):
    model = make_clip(text=text, custom=True)
    with pytest.raises(UnsupportedTextTower, match=match):
        PrefixSharedTextEncoder(model, tokenizer, NAMES[:2], 4)


def test_bad_arguments(tokenizer):
    model = make_clip()
    with pytest.raises(ValueError, match="classnames is empty"):
        PrefixSharedTextEncoder(model, tokenizer, [], 4)
    with pytest.raises(ValueError, match="n_ctx"):
        PrefixSharedTextEncoder(model, tokenizer, ["cat"], 0)
    with pytest.raises(ValueError, match="fallback"):
        PrefixSharedTextEncoder(model, tokenizer, ["cat"], 4, fallback="yes")
    enc = PrefixSharedTextEncoder(model, tokenizer, ["cat"], 4)
    with pytest.raises(ValueError, match="ctx must be"):
        enc(torch.zeros(2, 5, 64, dtype=torch.float64))
    with pytest.raises(UnsupportedTextTower, match="not a supported CLIP model"):
        text_tower(torch.nn.Linear(3, 3))


def test_state_dict_holds_no_clip_weights(tokenizer):
    model = make_clip()
    enc = PrefixSharedTextEncoder(model, tokenizer, NAMES, 4)
    assert list(enc.state_dict()) == [] and list(enc.parameters()) == []


@pytest.mark.parametrize("eot_only", [False, True])
@pytest.mark.parametrize("p, s, eot", [(3, 4, [[0, 3, 1], [2, 3, 0]]), (5, 2, [[0, 1, 1], [1, 0, 0]])])
def test_shared_prefix_attention_gradcheck(eot_only, p, s, eot):
    """The packed attention op's gradients (the attention kernel's backward through the
    gathers, the prefix broadcast and the prefix items) against finite differences."""
    g, n, heads, hd = 2, 3, 2, 3
    layout = PackedLayout.build(g, p, n, s, torch.tensor(eot))
    gen = torch.Generator().manual_seed(6)
    rows = g * p + layout.suffix_rows
    k, v = (torch.randn(rows, heads * hd, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    q = torch.randn(g * n if eot_only else rows, heads * hd, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: shared_prefix_attention(a, b, c, layout, heads, eot_only),
                                    (q, k, v), fast_mode=True)
    # the one-call form that torch.compile traces (prefix_attention._attend), same checks
    assert torch.autograd.gradcheck(lambda a, b, c: prefix_attention._attend(a, b, c, layout, heads, eot_only),
                                    (q, k, v), fast_mode=True)


@pytest.mark.parametrize("eot_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p, s", [(3, 5), (17, 7), (4, 4)])
def test_one_call_attention_matches_the_eager_op(eot_only, dtype, p, s):
    """``_attend`` (one scaled_dot_product_attention call per layer: what a compiled step runs)
    against the eager batched op, forward and gradients of q, k, v, on random packed rows of
    random EOTs; float64 to 1e-12, lower precisions against the float64 op's result: within
    3x the eager op's own error in that dtype (plus a rounding floor)."""
    g, n, heads, hd = 2, 5, 4, 8
    gen = torch.Generator().manual_seed(11 + p + s)
    eot = torch.randint(0, s, (g, n), generator=gen)
    layout = PackedLayout.build(g, p, n, s, eot)
    layout.prepare(dtype, [heads])
    rows = g * p + layout.suffix_rows
    qkv64 = [torch.randn(g * n if (eot_only and i == 0) else rows, heads * hd, generator=gen, dtype=torch.float64)
             for i in range(3)]
    up64 = torch.randn(g * n if eot_only else rows, heads * hd, generator=gen, dtype=torch.float64)

    def run(fn, dt):
        xs = [x.to(dt).requires_grad_() for x in qkv64]
        out = fn(*xs, layout, heads, eot_only)
        grads = torch.autograd.grad((out * up64.to(dt)).sum(), xs)
        return [out.detach().double()] + [gr.double() for gr in grads]

    gold = run(shared_prefix_attention, torch.float64)
    fast = run(prefix_attention._attend, dtype)
    eager = run(shared_prefix_attention, dtype)
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), fast, gold, eager):
        err, own = float((a - b).abs().max()), float((e - b).abs().max())
        floor = 1e-12 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps * float(b.abs().max())
        assert err <= 3 * own + floor, f"{name} {dtype}: error {err:.3g} vs the eager op's {own:.3g}"
