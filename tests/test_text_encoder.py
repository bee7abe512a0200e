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


def _random_packed_layout(seed, g, p, n, s, heads, dtype):
    """A packed layout of g groups of n suffixes of length s after a prefix of p, with
    random EOT positions, prepared for ``dtype``: (the generator, to draw the inputs from
    next; the layout; its packed row count)."""
    gen = torch.Generator().manual_seed(seed)
    eot = torch.randint(0, s, (g, n), generator=gen)
    layout = PackedLayout.build(g, p, n, s, eot)
    layout.prepare(dtype, [heads])
    return gen, layout, g * p + layout.suffix_rows


@pytest.mark.parametrize("eot_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p, s", [(3, 5), (17, 7), (4, 4)])
def test_one_call_attention_matches_the_eager_op(eot_only, dtype, p, s):
    """``_attend`` (one scaled_dot_product_attention call per layer: what a compiled step runs)
    against the eager batched op, forward and gradients of q, k, v, on random packed rows of
    random EOTs; float64 to 1e-12, lower precisions against the float64 op's result: within
    3x the eager op's own error in that dtype (plus a rounding floor)."""
    g, n, heads, hd = 2, 5, 4, 8
    gen, layout, rows = _random_packed_layout(11 + p + s, g, p, n, s, heads, dtype)
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


# -- the attention's forward against a yardstick that rounds what the fast paths round -------
#
# In float16/bfloat16 the 3x-own-error rule above cannot see a 1% error confined to the
# attention (bf16's own error is about 2^-8 relative per rounding). The yardstick below
# computes in float64 from the same half-precision q, k, v (exact in float64) and rounds,
# in the half dtype, exactly the intermediates the path under test rounds; every other
# operation of the path runs in float32, and its error is carried as an interval of
# float32 size. The path's output must then be one of the half values the interval rounds
# to: [round(Y_lo), round(Y_hi)] (rounding to nearest is monotone). A rounding whose input
# lies within the float32 slack of a rounding boundary may go either way; the interval
# keeps both sides (that is the only place a half ulp enters the bound).
#
# Float32 slack of a sum of n products of exact (half) inputs computed in float32:
#   |fl(sum) - sum| <= n * eps32 * sum |a_j b_j|                    (n roundings of u32 <= eps32)
# The bounds below use eps32 for u32 (a factor-2 margin) and never depend on cancellation.

def _rnd(x, dtype):
    return x.to(dtype).double()


def _dot_interval(lo, hi, v, eps, n):
    """sum_j x_j v_j over the last axis of x (weights in [lo, hi], lo >= 0) and rows of v,
    as an interval, plus float32 accumulation slack n * eps * sum_j hi_j |v_j|."""
    v = v.unsqueeze(-3)                                                            # [H, 1, T, hd]
    a, b = lo.unsqueeze(-1) * v, hi.unsqueeze(-1) * v
    slack = n * eps * (hi.unsqueeze(-1) * v.abs()).sum(-2)
    return torch.minimum(a, b).sum(-2) - slack, torch.maximum(a, b).sum(-2) + slack


def _visibility(layout, eot_only):
    """[R, T] bool: key row c visible to query row r (the packed attention's definition:
    same group, key position <= query position, key in the prefix or in the query's own
    sequence), with R = all T rows or the G*N EOT rows."""
    g, p, n, s = layout.g, layout.p, layout.n, layout.s
    vs = layout.valid_slots
    grp = torch.cat([torch.arange(g).repeat_interleave(p), vs // (n * s)])
    pos = torch.cat([torch.arange(p).repeat(g), p + vs % s])
    seq = torch.cat([torch.full((g * p,), -1), vs // s])
    if eot_only:
        qrows = layout.eot_rows + g * p
        grp_q, pos_q, seq_q = grp[qrows], pos[qrows], seq[qrows]
    else:
        grp_q, pos_q, seq_q = grp, pos, seq
    return ((grp_q[:, None] == grp[None]) & (pos[None] <= pos_q[:, None])
            & ((seq[None] < 0) | (seq[None] == seq_q[:, None])))


def _attention_yardstick(q, k, v, layout, heads, eot_only, path, dtype, scale_factor=1.0):
    """(lo, hi): the half values the path's forward output may take, [R, W] each.

    path "one_call" (``_attend``, CPU flash attention; aten cpu_flash_attention for
    reduced types): scores and softmax in float32; the unnormalised weights
    e_j = exp(s_j - max) are rounded to the half dtype for the product with v (float32
    accumulation); the sum l = sum_j e_j stays float32; out = round(acc / l).
    path "eager" (``_SharedPrefixAttention``): q k^T is a half-dtype product (float32
    accumulation, rounded to half), scaled and softmaxed in float32, the probabilities
    rounded to half, then half-dtype products (each rounded): the prefixes' own attention
    one product; a suffix (or EOT) query's output round(round(P-part) + round(S-part)).
    For float32 the same model holds with float32 as the 'half' dtype."""
    eps = torch.finfo(torch.float32).eps
    hd = q.shape[-1] // heads
    scale = hd ** -0.5 * scale_factor
    vis = _visibility(layout, eot_only)                                            # [R, T]
    qd, kd, vd = (x.double().view(x.shape[0], heads, hd).transpose(0, 1) for x in (q, k, v))  # [H, *, hd]
    raw = qd @ kd.transpose(-1, -2)                                                # exact up to 1e-16
    raw_abs = qd.abs() @ kd.abs().transpose(-1, -2)
    ninf = torch.tensor(float("-inf"), dtype=torch.float64)
    if path == "one_call":
        # Which intermediates the CPU flash kernel rounds to the half dtype (its unnormalised
        # weights, its normaliser) was not pinned down by experiment (docs/testing-precision.md), so this
        # model allows either: the exact float64 attention y from the same q, k, v, and a
        # slack of 2 half roundings u (weights, normaliser) on every weight but the largest
        # (e_max = exp(0) = 1 is exact in any dtype), plus float32 slack for the scores,
        # exponentials and sums: |Y - y| <= 2u sum_{j != argmax} p_j |v_j|
        #                                   + 16 (n_keys + hd) eps (1 + max|s|) sum_j p_j |v_j|.
        # A query that sees one key gets y = v_0 exactly; that is where an output error shows.
        u = torch.finfo(dtype).eps / 2
        s = torch.where(vis, raw * scale, ninf)
        prob = torch.softmax(s, -1)
        not_max = torch.ones_like(prob).scatter_(-1, s.argmax(-1, keepdim=True), 0.0)
        pv = prob.unsqueeze(-1) * vd.abs().unsqueeze(-3)                                 # [H, R, T, hd]
        n_keys = vis.sum(-1, keepdim=True).double()
        smax = torch.where(vis, (raw * scale).abs(), 0).amax(-1, keepdim=True)
        slack = 2 * u * (not_max.unsqueeze(-1) * pv).sum(-2) \
            + 16 * (n_keys + hd) * eps * (1 + smax) * pv.sum(-2)
        y = prob @ vd
        y_lo, y_hi = y - slack, y + slack
    else:
        # half-dtype q k^T: float32 accumulation of hd exact products, then one rounding
        r_lo = _rnd(raw - hd * eps * raw_abs, dtype)
        r_hi = _rnd(raw + hd * eps * raw_abs, dtype)
        # float32 softmax of scale * r over the visible keys, r_j in [r_lo, r_hi]: p_j is
        # increasing in r_j, decreasing in the others; float32 adds (n_keys + 8) eps relative
        n_keys = vis.sum(-1, keepdim=True).double()
        ref = torch.where(vis, r_hi * scale, ninf).amax(-1, keepdim=True)
        ex_lo = torch.where(vis, torch.exp(r_lo * scale - ref), 0)
        ex_hi = torch.where(vis, torch.exp(r_hi * scale - ref), 0)
        tot_hi, tot_lo = ex_hi.sum(-1, keepdim=True), ex_lo.sum(-1, keepdim=True)
        rel = (n_keys + 8) * eps
        p_lo = ex_lo / (ex_lo + (tot_hi - ex_hi)) * (1 - rel)
        p_hi = torch.clamp(ex_hi / (ex_hi + (tot_lo - ex_lo)).clamp_min(1e-300) * (1 + rel), max=1.0)
        p_lo, p_hi = torch.where(vis, p_lo, 0), torch.where(vis, p_hi, 0)
        w_lo, w_hi = _rnd(p_lo, dtype), _rnd(p_hi, dtype)                          # rounded probabilities
        g, p = layout.g, layout.p
        is_pre_key = torch.arange(vis.shape[-1]) < g * p
        nk = vis.shape[-1]
        pa = _dot_interval(w_lo * is_pre_key, w_hi * is_pre_key, vd, eps, nk)      # prefix part
        sa = _dot_interval(w_lo * ~is_pre_key, w_hi * ~is_pre_key, vd, eps, nk)    # suffix part
        pa = (_rnd(pa[0], dtype), _rnd(pa[1], dtype))
        sa = (_rnd(sa[0], dtype), _rnd(sa[1], dtype))
        y_lo, y_hi = pa[0] + sa[0], pa[1] + sa[1]
        if not eot_only:  # the prefixes' own attention is one product, rounded once
            pre_q = (torch.arange(vis.shape[0]) < g * p).view(1, -1, 1)
            whole = _dot_interval(w_lo, w_hi, vd, eps, nk)
            y_lo = torch.where(pre_q, whole[0], y_lo)
            y_hi = torch.where(pre_q, whole[1], y_hi)
    lo, hi = _rnd(y_lo, dtype), _rnd(y_hi, dtype)
    return lo.transpose(0, 1).reshape(-1, heads * hd), hi.transpose(0, 1).reshape(-1, heads * hd)


ATTENTION_PATHS = {"one_call": prefix_attention._attend, "eager": shared_prefix_attention}


@pytest.mark.parametrize("path", ["one_call", "eager"])
@pytest.mark.parametrize("eot_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("p, s", [(3, 5), (17, 7), (4, 4)])
def test_attention_forward_rounded_yardstick(path, eot_only, dtype, p, s):
    """The attention's forward output, compiled form (``_attend``, test id ``one_call``) and
    eager op, in each dtype against ``_attention_yardstick``: a float64 computation that
    rounds what the path rounds, with float32 slack. Every output element must be a value
    the yardstick's interval rounds to. A 1% error in the output or in the attention scale
    moves elements by several half ulps, outside it (docs/testing-precision.md's rule: a
    bound a wrong kernel cannot meet in any dtype)."""
    g, n, heads, hd = 2, 5, 4, 8
    gen, layout, rows = _random_packed_layout(23 + p + s, g, p, n, s, heads, dtype)
    # scores of a few units (q scaled by 3): softmax weights far from uniform, so a 1%
    # scale error moves them
    q = (3 * torch.randn(g * n if eot_only else rows, heads * hd, generator=gen)).to(dtype)
    k, v = (torch.randn(rows, heads * hd, generator=gen).to(dtype) for _ in range(2))
    out = ATTENTION_PATHS[path](q, k, v, layout, heads, eot_only).double()
    lo, hi = _attention_yardstick(q, k, v, layout, heads, eot_only, path, dtype)
    bad = (out < lo) | (out > hi)
    assert not bad.any(), (f"{path} {dtype}: {int(bad.sum())} of {bad.numel()} outputs outside the rounded "
                           f"yardstick, worst {float(torch.maximum(lo - out, out - hi).max()):.3g}")


@pytest.mark.parametrize("p, s", [(3, 5), (17, 7)])
def test_compiled_branch_with_projection_matches_the_eager_op(p, s, monkeypatch):
    """``shared_prefix_attention(..., project=f)``: the branch torch.compile traces (f on the
    call's query slots, then the gather to packed rows; key/value blocks rebuilt in the
    backward) against the eager op followed by f, forward and gradients of q, k, v and f's
    weight, float64 to 1e-12. The branch is taken by making ``is_compiling`` report True."""
    g, n, heads, hd = 2, 5, 4, 8
    gen = torch.Generator().manual_seed(5 + p + s)
    layout = PackedLayout.build(g, p, n, s, torch.randint(0, s, (g, n), generator=gen))
    layout.prepare(torch.float64, [heads])
    rows = g * p + layout.suffix_rows
    w0 = torch.randn(heads * hd, heads * hd, generator=gen, dtype=torch.float64)
    xs0 = [torch.randn(rows, heads * hd, generator=gen, dtype=torch.float64) for _ in range(3)]
    up = torch.randn(rows, heads * hd, generator=gen, dtype=torch.float64)

    def run():
        xs = [x.clone().requires_grad_() for x in xs0]
        w = w0.clone().requires_grad_()
        out = shared_prefix_attention(*xs, layout, heads, project=lambda a: a @ w)
        return [out.detach()] + list(torch.autograd.grad((out * up).sum(), xs + [w]))

    eager = run()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = run()
    for name, a, b in zip(("out", "dq", "dk", "dv", "dw"), traced, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("p, s", [(3, 5), (7, 3)])  # P > S: J = 3 prefix items, pad slots
def test_compiled_first_layer_computes_a_shared_suffix_once(tokenizer, p, s, monkeypatch):
    """``prefix_shared_forward`` with a suffix expanded over the groups (DeMul's layout): the
    branch torch.compile traces runs layer 0's ln_1 and q/k/v on the G*P prefix rows and
    group 0's Ts/G suffix rows only (``PackedLayout.shared_suffix_maps``), against the eager
    path on all T rows: features and the prefix gradient, float64, to 1e-12. The branch is
    taken by making ``is_compiling`` report True; that layer 0's q/k/v product saw
    G*P + Ts/G rows is checked on the product's input. Groups whose EOT positions differ get
    no shared maps."""
    model = make_clip(seed=7, text=dict(ls_init_value=0.2))
    g, n, w = 3, 4, 64
    gen = torch.Generator().manual_seed(6 + p)
    prefix = torch.randn(g, p, w, generator=gen, dtype=torch.float64)
    suffix = torch.randn(1, n, s, w, generator=gen, dtype=torch.float64).expand(g, n, s, w)
    eot = torch.randint(0, s, (1, n), generator=gen).expand(g, n)
    up = torch.randn(g, n, 48, generator=gen, dtype=torch.float64)
    tower = text_tower(model)
    layout = PackedLayout.build(g, p, n, s, eot)
    layout.prepare(torch.float64, [layer.heads for layer in tower.layers])
    assert layout.shared_suffix_maps(torch.float64) is not None
    ts = layout.suffix_rows
    rows_seen = []
    qkv = tower.layers[0].qkv

    def spy(x):
        rows_seen.append(x.shape[0])
        return qkv(x)
    monkeypatch.setattr(tower.layers[0], "qkv", spy)

    def run():
        pre = prefix.clone().requires_grad_()
        out = prefix_shared_forward(tower, pre, suffix, eot, layout=layout)
        return out.detach(), torch.autograd.grad((out * up).sum(), pre)[0]

    eager = run()
    assert rows_seen[0] == g * p + ts
    rows_seen.clear()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = run()
    assert rows_seen[0] == g * p + ts // g, rows_seen
    torch.testing.assert_close(traced[0], eager[0], rtol=0, atol=1e-12, msg="features")
    torch.testing.assert_close(traced[1], eager[1], rtol=0, atol=1e-12, msg="d prefix")
    monkeypatch.undo()
    other = torch.cat([eot[:1], eot[1:].roll(1, dims=1)])  # the same row count per group, other positions
    assert (other != eot).any()
    distinct = PackedLayout.build(g, p, n, s, other)
    distinct.prepare(torch.float64, [2])
    assert distinct.shared_suffix_maps(torch.float64) is None
