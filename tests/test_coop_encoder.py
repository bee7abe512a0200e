"""CoOpTextEncoder against the full-length text forward of CoOp-style code (all rows at 77 tokens).

The reference is this project's stand-in for that layout and forward
(tests/support/coop_layout.py): ``x = prompts + positional_embedding; transformer(x,
attn_mask); ln_final; x[arange, tokenized.argmax(-1)] @ text_projection``. Forward and the gradient w.r.t. the
context parameter(s) are compared in float64 (agreement to float rounding) for a shared
context (CoOp's expand: sharing must happen), class-specific contexts (CSC) with random
and with identical values (no sharing: each class keeps its own gradient), and class
names of different token lengths; float32 under the package's error rule.
"""

import copy
import math

import open_clip
import pytest
import torch
from open_clip.model import CLIP

from demul_fast.coop import CoOpTextEncoder, equal_prefix_len, gradient_shareable_len
from demul_fast.text_encoder import UnsupportedTextTower
from clip_tiny import tiny_hf_clip
from numerics import assert_error_rule
from support.coop_layout import full_text_forward, layout, prompt_tokens

WIDTH, N_CTX = 64, 4
# different token lengths, one long name; EOT positions differ per row
CLASSNAMES = ["dog", "sea lion", "a very long class name with many many words in it for a test",
              "red-winged blackbird", "cat"]
TOL64 = 1e-12


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_clip(seed=0, **text_overrides):
    torch.manual_seed(seed)
    text_cfg = dict(context_length=77, vocab_size=49408, width=WIDTH, heads=2, layers=2)
    text_cfg.update(text_overrides)
    model = CLIP(embed_dim=32, vision_cfg=dict(layers=1, width=32, patch_size=16, image_size=32, head_width=16),
                 text_cfg=text_cfg)
    model.eval().requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def model64():
    return tiny_clip().double()


@pytest.fixture(scope="module")
def tokens():
    return prompt_tokens(open_clip.get_tokenizer("ViT-B-16"), CLASSNAMES, N_CTX)


def plain_coop(model, prompts, tokenized):
    """The full-length text forward of CoOp-style code (tests/support/coop_layout.py)."""
    return full_text_forward(model, prompts, tokenized)


def coop_prompts(model, tokenized, ctx):
    """The CoOp-style layout [SOT ; ctx ; class tokens, EOT, padding]: ctx [n_ctx, W] is
    broadcast over the classes (one context), ctx [C, n_ctx, W] is one per class (CSC)."""
    with torch.no_grad():
        emb = model.token_embedding(tokenized).to(ctx.dtype)
    return layout(emb, ctx, N_CTX)


def run_both(model, tokenized, ctx, encoder=None, gen=None):
    """(fast out, plain out, fast grad, plain grad) for one random output cotangent."""
    encoder = encoder or CoOpTextEncoder(model)
    ref = plain_coop(model, coop_prompts(model, tokenized, ctx), tokenized)
    cot = torch.randn(ref.shape, dtype=ref.dtype, generator=gen)
    (g_ref,) = torch.autograd.grad((ref * cot).sum(), ctx)
    out = encoder(coop_prompts(model, tokenized, ctx), tokenized)
    (g_out,) = torch.autograd.grad((out * cot).sum(), ctx)
    return out, ref, g_out, g_ref, encoder


def eot_len(tokenized):
    return int(tokenized.argmax(-1).max()) + 1


def test_shared_context_shares_and_is_exact(model64, tokens, gen):
    ctx = torch.randn(N_CTX, WIDTH, dtype=torch.float64, generator=gen, requires_grad=True)
    out, ref, g_out, g_ref, enc = run_both(model64, tokens, ctx, gen=gen)
    plan = enc.last_plan
    assert plan.shared_len == 1 + N_CTX
    assert plan.seq_len == eot_len(tokens) < 77
    # [SOT] + ctx once, then each row's own positions up to its EOT (packed, no padding)
    assert plan.tokens == 1 + N_CTX + int((tokens.argmax(-1) + 1 - (1 + N_CTX)).sum())
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL64)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=TOL64)


def test_csc_random_contexts_fall_back_and_are_exact(model64, tokens, gen):
    ctx = torch.randn(len(CLASSNAMES), N_CTX, WIDTH, dtype=torch.float64, generator=gen, requires_grad=True)
    out, ref, g_out, g_ref, enc = run_both(model64, tokens, ctx, gen=gen)
    assert enc.last_plan.shared_len == 0
    assert enc.last_plan.seq_len == eot_len(tokens)
    assert enc.last_plan.tokens == int((tokens.argmax(-1) + 1).sum())  # truncated and packed
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL64)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=TOL64)


def test_csc_equal_values_keep_per_class_gradients(model64, tokens, gen):
    # CSC initialised from one phrase: equal values, but C different parameters
    one = torch.randn(1, N_CTX, WIDTH, dtype=torch.float64, generator=gen)
    ctx = one.repeat(len(CLASSNAMES), 1, 1).requires_grad_()
    out, ref, g_out, g_ref, enc = run_both(model64, tokens, ctx, gen=gen)
    assert enc.last_plan.shared_len == 0
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL64)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=TOL64)
    # the per-class gradients really differ, so routing their sum to one row would show
    assert (g_ref[0] - g_ref[1]).abs().max() > 1e-3 * g_ref.abs().max()


def test_equal_values_are_shared_when_no_gradient_is_needed(model64, tokens, gen):
    one = torch.randn(1, N_CTX, WIDTH, dtype=torch.float64, generator=gen)
    ctx = one.repeat(len(CLASSNAMES), 1, 1)
    prompts = coop_prompts(model64, tokens, ctx)
    enc = CoOpTextEncoder(model64)
    with torch.no_grad():
        out = enc(prompts, tokens)
    assert enc.last_plan.shared_len == 1 + N_CTX
    torch.testing.assert_close(out, plain_coop(model64, prompts, tokens), rtol=0, atol=TOL64)
    ctx.requires_grad_()  # a CSC parameter, but no graph is recorded: sharing is safe
    with torch.no_grad():
        enc(coop_prompts(model64, tokens, ctx), tokens)
    assert enc.last_plan.shared_len == 1 + N_CTX


def test_prompts_leaf_requiring_grad_is_not_shared(model64, tokens, gen):
    ctx = torch.randn(N_CTX, WIDTH, dtype=torch.float64, generator=gen)
    prompts = coop_prompts(model64, tokens, ctx).detach().requires_grad_()  # equal rows, N params
    enc = CoOpTextEncoder(model64)
    out = enc(prompts, tokens)
    assert enc.last_plan.shared_len == 0
    ref = plain_coop(model64, prompts, tokens)
    cot = torch.randn(ref.shape, dtype=ref.dtype, generator=gen)
    (g_ref,) = torch.autograd.grad((ref * cot).sum(), prompts)
    (g_out,) = torch.autograd.grad((out * cot).sum(), prompts)
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL64)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=TOL64)


def test_mixed_shared_and_class_specific_tokens(model64, tokens, gen):
    # [SOT ; shared ctx (2 tokens, expand) ; CSC ctx (2 tokens) ; name ...]: only the
    # broadcast part is shareable, both parameters get exact gradients
    shared = torch.randn(2, WIDTH, dtype=torch.float64, generator=gen, requires_grad=True)
    csc = torch.randn(1, 2, WIDTH, dtype=torch.float64, generator=gen).repeat(len(CLASSNAMES), 1, 1)
    csc.requires_grad_()
    emb = model64.token_embedding(tokens)
    n = len(CLASSNAMES)

    def prompts():
        return torch.cat([emb[:, :1], shared.expand(n, -1, -1).double(), csc, emb[:, 1 + N_CTX:]], dim=1)

    ref = plain_coop(model64, prompts(), tokens)
    cot = torch.randn(ref.shape, dtype=ref.dtype, generator=gen)
    g_ref = torch.autograd.grad((ref * cot).sum(), (shared, csc))
    enc = CoOpTextEncoder(model64)
    out = enc(prompts(), tokens)
    g_out = torch.autograd.grad((out * cot).sum(), (shared, csc))
    # the CSC block starts at position 3 but its start is only known to be >= 2 from the
    # graph (the SOT piece needs no gradient, so its length is not recorded): 2 is shared
    assert enc.last_plan.shared_len == 2
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL64)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL64)


def test_cocoop_style_conditional_context(model64, tokens, gen):
    """CoCoOp: per image, ctx + meta_net(image feature) broadcast to all classes by expand.
    Shared per call; gradients reach ctx and the meta-net exactly."""
    ctx = torch.randn(N_CTX, WIDTH, dtype=torch.float64, generator=gen, requires_grad=True)
    meta = torch.nn.Linear(16, WIDTH).double()
    feats = torch.randn(2, 16, dtype=torch.float64, generator=gen)
    emb = model64.token_embedding(tokens)
    n = len(CLASSNAMES)

    def loss(encode):
        total = 0
        for f in feats:
            shifted = ctx + meta(f)                                  # [n_ctx, W]
            prompts = torch.cat([emb[:, :1], shifted.unsqueeze(0).expand(n, -1, -1), emb[:, 1 + N_CTX:]], 1)
            total = total + encode(prompts).square().sum()
        return total

    params = (ctx, meta.weight, meta.bias)
    ref = loss(lambda p: plain_coop(model64, p, tokens))
    g_ref = torch.autograd.grad(ref, params)
    enc = CoOpTextEncoder(model64)
    out = loss(lambda p: enc(p, tokens))
    g_out = torch.autograd.grad(out, params)
    assert enc.last_plan.shared_len == 1 + N_CTX
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL64)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL64)


def test_share_prefix_off_gives_the_same_result(model64, tokens, gen):
    ctx = torch.randn(N_CTX, WIDTH, dtype=torch.float64, generator=gen, requires_grad=True)
    enc = CoOpTextEncoder(model64, share_prefix=False)
    out, ref, g_out, g_ref, _ = run_both(model64, tokens, ctx, encoder=enc, gen=gen)
    assert enc.last_plan.shared_len == 0
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL64)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=TOL64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_error_rule(tokens, gen, dtype):
    """Fast vs the float64 reference within 2x (outputs) / 3x (gradients) the plain CoOp
    computation's own error in that dtype."""
    model_lp = tiny_clip(seed=1).to(dtype)
    model64 = tiny_clip(seed=1).double()
    ctx64 = torch.randn(N_CTX, WIDTH, dtype=torch.float64, generator=gen)
    ctx_lp = ctx64.to(dtype).requires_grad_()
    ctx64.requires_grad_()
    ref64 = plain_coop(model64, coop_prompts(model64, tokens, ctx64), tokens)
    cot = torch.randn(ref64.shape, dtype=torch.float64, generator=gen)
    (g64,) = torch.autograd.grad((ref64 * cot).sum(), ctx64)
    plain = plain_coop(model_lp, coop_prompts(model_lp, tokens, ctx_lp), tokens)
    (g_plain,) = torch.autograd.grad((plain * cot.to(dtype)).sum(), ctx_lp)
    enc = CoOpTextEncoder(model_lp)
    fast = enc(coop_prompts(model_lp, tokens, ctx_lp), tokens)
    (g_fast,) = torch.autograd.grad((fast * cot.to(dtype)).sum(), ctx_lp)
    assert enc.last_plan.shared_len == 1 + N_CTX
    assert fast.dtype == dtype
    # the model's layers run in dtype by design: the yardstick is the plain CoOp path in dtype
    assert_error_rule(f"coop out {dtype}", fast, ref64, plain, k=2.0, compute_dtype=dtype)
    assert_error_rule(f"coop dctx {dtype}", g_fast, g64, g_plain, k=3.0, compute_dtype=dtype)


def test_token_analysis_follows_a_modified_tokenized_tensor(model64, tokens, gen):
    tok = open_clip.get_tokenizer("ViT-B-16")
    other = prompt_tokens(tok, ["a", "b c", "d", "e", "f"], N_CTX)
    ids = tokens.clone()
    ctx = torch.randn(N_CTX, WIDTH, dtype=torch.float64, generator=gen)
    enc = CoOpTextEncoder(model64)
    with torch.no_grad():
        enc(coop_prompts(model64, ids, ctx), ids)
        assert enc.last_plan.seq_len == eot_len(tokens)
        ids.copy_(other)  # in place: same object, new version
        prompts = coop_prompts(model64, ids, ctx)
        out = enc(prompts, ids)
    assert enc.last_plan.seq_len == eot_len(other)
    torch.testing.assert_close(out, plain_coop(model64, prompts, ids), rtol=0, atol=TOL64)


def test_custom_text_clip_and_layer_scale(tokens, gen):
    torch.manual_seed(3)
    model = open_clip.model.CustomTextCLIP(
        embed_dim=32, vision_cfg=dict(layers=1, width=32, patch_size=16, image_size=32, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=WIDTH, heads=2, layers=2, ls_init_value=0.5))
    model = model.double().eval().requires_grad_(False)
    text = model.text
    ctx = torch.randn(N_CTX, WIDTH, dtype=torch.float64, generator=gen, requires_grad=True)

    ref = plain_coop(text, coop_prompts(text, tokens, ctx), tokens)
    cot = torch.randn(ref.shape, dtype=ref.dtype, generator=gen)
    (g_ref,) = torch.autograd.grad((ref * cot).sum(), ctx)
    enc = CoOpTextEncoder(model)
    out = enc(coop_prompts(text, tokens, ctx), tokens)
    (g_out,) = torch.autograd.grad((out * cot).sum(), ctx)
    assert enc.last_plan.shared_len == 1 + N_CTX
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL64)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=TOL64)


def test_registers_the_text_modules_without_copies():
    model = tiny_clip(seed=2)
    enc = CoOpTextEncoder(model)
    text_params = {id(p) for n, p in model.named_parameters() if not n.startswith("visual")}
    enc_params = {id(p) for p in enc.parameters()}
    assert enc_params and enc_params <= text_params
    assert id(model.transformer.resblocks[0].attn.in_proj_weight) in enc_params
    enc.double()  # moves the shared text modules, the tower view follows
    assert model.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float64
    assert enc.tower.positional_embedding.dtype == torch.float64
    assert not any(n.startswith("visual") for n, _ in enc.named_parameters())


def test_a_copy_uses_its_own_weights(model64, tokens, gen):
    """A deepcopy (like an nn.DataParallel replica, whose attribute dict is copied from the
    original) computes with its own submodules, not the original's."""
    enc = CoOpTextEncoder(model64)
    twin = copy.deepcopy(enc)
    with torch.no_grad():
        twin.transformer.resblocks[0].mlp.c_fc.weight.mul_(1.5)
        twin.ln_final.weight.mul_(2.0)
    ctx = torch.randn(N_CTX, WIDTH, dtype=torch.float64, generator=gen)
    prompts = coop_prompts(model64, tokens, ctx)
    with torch.no_grad():
        out_twin, out = twin(prompts, tokens), enc(prompts, tokens)
    torch.testing.assert_close(out, plain_coop(model64, prompts, tokens), rtol=0, atol=TOL64)
    twin_model = copy.deepcopy(model64)
    twin_model.transformer, twin_model.ln_final = twin.transformer, twin.ln_final
    torch.testing.assert_close(out_twin, plain_coop(twin_model, prompts, tokens), rtol=0, atol=TOL64)
    assert (out_twin - out).abs().max() > 1e-3


def test_gradient_shareable_len_rules():
    n, w = 3, 4
    p = torch.randn(n, 5, w, requires_grad=True)
    assert gradient_shareable_len(torch.randn(n, 5, w)) == math.inf      # no gradient
    assert gradient_shareable_len(p) == 0                                 # per-row leaf
    ctx = torch.randn(2, w, requires_grad=True)
    fixed = torch.randn(n, 1, w)
    assert gradient_shareable_len(torch.cat([fixed, ctx.expand(n, -1, -1)], 1)) == math.inf
    assert gradient_shareable_len(torch.cat([fixed, ctx.expand(n, -1, -1).half().float()], 1)) == math.inf
    assert gradient_shareable_len(torch.cat([fixed, ctx.repeat(n, 1, 1)], 1)) == 0     # repeat: unknown op
    assert gradient_shareable_len(torch.cat([ctx.expand(n, -1, -1), p], 1)) == 2
    assert gradient_shareable_len(torch.cat([ctx.expand(n, -1, -1), fixed.expand(-1, 2, -1)], 0)) == 0   # rows from pieces
    assert gradient_shareable_len(p[:1].expand(n, -1, -1)) == math.inf
    assert gradient_shareable_len(p * 2) == 0


def test_equal_prefix_len_is_bitwise():
    x = torch.zeros(3, 6, 2)
    x[:, 4:] = torch.randn(3, 2, 2)
    assert equal_prefix_len(x, 6) == 4
    assert equal_prefix_len(x, 3) == 3
    x[1, 2, 0] = -0.0  # equal as numbers, different bits
    assert equal_prefix_len(x, 6) == 2
    x[:, 0, 1] = float("nan")  # the same NaN in every row is bitwise equal
    assert equal_prefix_len(x, 6) == 2


def test_bad_inputs_name_the_argument(model64, tokens):
    enc = CoOpTextEncoder(model64)
    good = torch.zeros(len(CLASSNAMES), 77, WIDTH, dtype=torch.float64)
    with pytest.raises(ValueError, match="prompts"):
        enc(torch.zeros(len(CLASSNAMES), 77, WIDTH + 1, dtype=torch.float64), tokens)
    with pytest.raises(ValueError, match="tokenized_prompts"):
        enc(good, tokens[:2])
    with pytest.raises(ValueError, match="tokenized_prompts"):
        enc(good, tokens.double())
    with pytest.raises(ValueError, match="min_shared_len"):
        CoOpTextEncoder(model64, min_shared_len=0)
    with pytest.raises(UnsupportedTextTower):
        CoOpTextEncoder(tiny_clip(no_causal_mask=True))


def test_transformers_clip_model(tokens):
    """A small random transformers CLIPModel: the encoder on the plain token embeddings
    (no learned context; rows share [SOT] + "X" * n_ctx by value) vs its get_text_features."""
    model = tiny_hf_clip(eos_token_id=49407, width=WIDTH)
    enc = CoOpTextEncoder(model)
    assert any(p is model.text_projection.weight for p in enc.parameters())
    with torch.no_grad():
        prompts = model.text_model.embeddings.token_embedding(tokens)
        out = enc(prompts, tokens)
        own = model.get_text_features(input_ids=tokens)
    own = own if isinstance(own, torch.Tensor) else own.pooler_output
    assert enc.last_plan.shared_len == 1 + N_CTX
    torch.testing.assert_close(out, own, rtol=0, atol=TOL64)


def test_inside_a_compiled_function(model64, tokens, gen):
    """torch.compile of code that calls the encoder: it runs eagerly there (graph break),
    with the same result and gradient."""
    ctx = torch.randn(N_CTX, WIDTH, dtype=torch.float64, generator=gen, requires_grad=True)
    enc = CoOpTextEncoder(model64)

    def step(ctx):
        return enc(coop_prompts(model64, tokens, ctx), tokens).square().sum()

    torch._dynamo.reset()
    loss = torch.compile(step, backend="eager")(ctx)
    (g,) = torch.autograd.grad(loss, ctx)
    assert enc.last_plan.shared_len == 1 + N_CTX
    ref = plain_coop(model64, coop_prompts(model64, tokens, ctx), tokens).square().sum()
    (g_ref,) = torch.autograd.grad(ref, ctx)
    torch.testing.assert_close(loss, ref, rtol=0, atol=TOL64)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=TOL64)
