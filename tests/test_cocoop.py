"""CoCoOp's layout (per-image contexts ``ctx + meta_net(x_b)``) through ``CoOpTextEncoder``:
one call on prompts [B, C, L, W] against CoCoOp's per-image loop over its full-length text
encoder, in float64 (outputs and the gradient of every parameter: ctx and the meta-net's),
for B in {1, 3} and the class token at the end, in the middle and in front; the same loop
with ``CoOpTextEncoder`` inside (the gradient walk through CoCoOp's unbind/stack); float16-
cast OpenAI weights under the error rule; the gradient walk's recognition of stack, unbind,
select and unsqueeze, and its refusals."""

import math

import pytest
import torch

from demul_fast.coop import CoOpTextEncoder, equal_prefix_len, gradient_shareable_len
from clip_tiny import tiny_openai_clip
from numerics import assert_error_rule
from support.family import (ConditionalPromptLearner, TextEncoder, cocoop_batched_logits, cocoop_loop_logits,
                            cross_entropy)

NAMES = ["cat", "golden retriever", "extraordinarily long class name " * 14, "sea anemone", "x",
         "red-winged blackbird"]
N_CTX = 4

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def image_features(b, model, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, model.visual.output_dim, generator=gen, dtype=torch.float64).to(model.dtype)
    return x / x.norm(dim=-1, keepdim=True)


def loss_and_grads(learner, logits_fn, encoder, feats, labels):
    """Cross-entropy of CoCoOp's logits and the gradient of every trainable parameter."""
    params = [p for p in learner.parameters() if p.requires_grad]
    logits = logits_fn(learner, encoder, feats, 4.0)
    loss = cross_entropy(logits, labels) + 1e-3 * logits.double().square().sum()
    grads = torch.autograd.grad(loss, params)
    return logits.detach(), grads


def assert_exact(got, want, what, tol=1e-10):
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= tol * scale, f"{what}: error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("attention", ["masked", "prefix"])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_batched_call_is_exact_against_the_per_image_loop(b, position, attention):
    model = tiny_openai_clip(seed=b)
    learner = ConditionalPromptLearner(NAMES, model, N_CTX, position, seed=b)
    feats = image_features(b, model, seed=10 + b)
    labels = torch.arange(b) % len(NAMES)
    ref_logits, ref_grads = loss_and_grads(learner, cocoop_loop_logits, TextEncoder(model), feats, labels)
    fast = CoOpTextEncoder(model, attention=attention)
    logits, grads = loss_and_grads(learner, cocoop_batched_logits, fast, feats, labels)
    assert len(grads) == 5  # ctx and the meta-net's two weights and biases
    assert_exact(logits, ref_logits, "logits")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert float(r.abs().max()) > 0
        assert_exact(g, r, f"grad {i}")
    plan = fast.last_plan
    assert plan.groups == b and plan.rows == len(NAMES)
    # end: [SOT] + ctx_b shared by the C classes of image b; middle / front stack per-class
    # rows (cat along the rows): nothing is provable, truncation and packing only
    want_shared = 1 + N_CTX if (position == "end" and b >= 1) else 0
    assert plan.shared_len == want_shared
    eot = learner.tokenized_prompts.argmax(-1)
    assert plan.tokens == b * (want_shared + int((eot + 1 - want_shared).sum()))


def test_loop_with_the_fast_encoder_shares_through_unbind_and_stack():
    """CoCoOp's own loop with CoOpTextEncoder swapped in: each image's prompts come out of
    ``torch.stack`` by iteration (unbind); the walk follows them to the expand."""
    model = tiny_openai_clip(seed=5)
    learner = ConditionalPromptLearner(NAMES, model, N_CTX, seed=5)
    feats = image_features(2, model, seed=6)
    labels = torch.tensor([1, 3])
    ref_logits, ref_grads = loss_and_grads(learner, cocoop_loop_logits, TextEncoder(model), feats, labels)
    fast = CoOpTextEncoder(model)
    logits, grads = loss_and_grads(learner, cocoop_loop_logits, fast, feats, labels)
    assert fast.last_plan.shared_len == 1 + N_CTX and fast.last_plan.groups == 1
    assert_exact(logits, ref_logits, "logits")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_exact(g, r, f"grad {i}")


@pytest.mark.parametrize("attention", ["masked", "prefix"])
def test_float16_cast_weights_error_rule(attention):
    """``clip.build_model``'s float16 weights (CoCoOp's fp16 setting): the batched call's
    error vs float64 at most 2x (3x for gradients) CoCoOp's own loop in float16."""
    model64, model16 = tiny_openai_clip(seed=7), tiny_openai_clip(seed=7, dtype=torch.float16)
    l64 = ConditionalPromptLearner(NAMES, model64, N_CTX, seed=7)
    l16 = ConditionalPromptLearner(NAMES, model16, N_CTX, seed=7)
    with torch.no_grad():
        for p64, p16 in zip(l64.parameters(), l16.parameters()):
            p64.copy_(p16)  # the same (float16-rounded) parameters
    feats16 = image_features(3, model16, seed=8)
    feats64 = feats16.double()
    labels = torch.tensor([0, 2, 4])
    ref_logits, ref_grads = loss_and_grads(l64, cocoop_loop_logits, TextEncoder(model64), feats64, labels)
    plain_logits, plain_grads = loss_and_grads(l16, cocoop_loop_logits, TextEncoder(model16), feats16, labels)
    fast = CoOpTextEncoder(model16, attention=attention)
    logits, grads = loss_and_grads(l16, cocoop_batched_logits, fast, feats16, labels)
    assert fast.last_plan.shared_len == 1 + N_CTX and logits.dtype == torch.float16
    # float16-cast weights compute in float16 by design (CoOp's setting): so does the yardstick
    assert_error_rule("CoCoOp logits fp16", logits, ref_logits, plain_logits, k=2.0, compute_dtype=torch.float16)
    for i, (g, r, p) in enumerate(zip(grads, ref_grads, plain_grads)):
        assert_error_rule(f"CoCoOp grad {i} fp16", g, r, p, k=3.0, compute_dtype=torch.float16)


def test_walk_recognises_group_structure():
    n, w = 4, 3
    ctx = torch.randn(2, 5, w, requires_grad=True)      # per-group contexts [B, n_ctx, W]
    fixed = torch.randn(n, 2, w)
    per_group = [torch.cat([fixed[:, :1], c.unsqueeze(0).expand(n, -1, -1), fixed[:, 1:]], 1) for c in ctx]
    stacked = torch.stack(per_group)                                      # [B, N, L, W]
    assert gradient_shareable_len(stacked) == math.inf
    assert gradient_shareable_len(stacked[1]) == math.inf                  # select
    assert all(gradient_shareable_len(t) == math.inf for t in stacked)    # unbind
    # in one cat: ctx.unsqueeze(1).expand over the rows
    batched = torch.cat([fixed.expand(2, -1, -1, -1)[:, :, :1], ctx.unsqueeze(1).expand(-1, n, -1, -1),
                         fixed.expand(2, -1, -1, -1)[:, :, 1:]], dim=2)
    assert gradient_shareable_len(batched) == math.inf
    torch.testing.assert_close(batched, stacked)
    # refusals: rows stacked (dim 1), a per-row parameter, an unknown op, rows selected
    rows = torch.randn(n, 5, w, requires_grad=True)
    assert gradient_shareable_len(torch.stack([rows, rows], 0)) == 0
    assert gradient_shareable_len(torch.stack([c.expand(n, -1, -1) for c in ctx], 1)) == 0
    assert gradient_shareable_len(stacked * 2) == 0
    assert gradient_shareable_len(torch.stack([stacked[:, i] for i in range(n)], 1)) == 0
    # a per-group parameter whose groups differ but whose rows are broadcast: shareable
    assert gradient_shareable_len(ctx.unsqueeze(1).expand(-1, n, -1, -1)) == math.inf
    # a [B, N, n_ctx, W] leaf: every row its own
    assert gradient_shareable_len(torch.randn(2, n, 5, w, requires_grad=True)) == 0


def test_equal_prefix_is_per_group():
    x = torch.zeros(2, 3, 6, 2)
    x[0, :, :4] = 1.0      # group 0: equal rows, different value from group 1
    x[:, :, 4:] = torch.randn(2, 3, 2, 2)
    assert equal_prefix_len(x, 6) == 4
    x[1, 2, 3, 0] = 5.0    # group 1's row 2 differs at position 3
    assert equal_prefix_len(x, 6) == 3


def test_csc_per_group_leaf_falls_back_and_stays_exact():
    """Per-image, per-class contexts with equal values ([B, C, n_ctx, W] leaf): no sharing."""
    model = tiny_openai_clip(seed=9)
    learner = ConditionalPromptLearner(NAMES, model, N_CTX, seed=9)
    ids = learner.tokenized_prompts
    one = torch.randn(1, 1, N_CTX, 64, dtype=torch.float64)
    ctx = one.repeat(2, len(NAMES), 1, 1).requires_grad_()
    pre, suf = learner.token_prefix.expand(2, -1, -1, -1), learner.token_suffix.expand(2, -1, -1, -1)
    prompts = torch.cat([pre, ctx, suf], dim=2)
    enc, plain = CoOpTextEncoder(model), TextEncoder(model)
    out = enc(prompts, ids)
    assert enc.last_plan.shared_len == 0
    ref = torch.stack([plain(p, ids) for p in prompts])
    cot = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(3))
    (g,) = torch.autograd.grad((out * cot).sum(), ctx)
    (g_ref,) = torch.autograd.grad((ref * cot).sum(), ctx)
    assert_exact(out.detach(), ref.detach(), "out")
    assert_exact(g, g_ref, "dctx")
    assert (g_ref[0, 0] - g_ref[0, 1]).abs().max() > 1e-3 * g_ref.abs().max()


def test_bad_grouped_inputs_name_the_argument():
    model = tiny_openai_clip(seed=1)
    learner = ConditionalPromptLearner(NAMES, model, N_CTX)
    enc = CoOpTextEncoder(model)
    with pytest.raises(ValueError, match="prompts"):
        enc(torch.zeros(2, 3, len(NAMES), 77, 64, dtype=torch.float64), learner.tokenized_prompts)
    with pytest.raises(ValueError, match="tokenized_prompts"):
        enc(torch.zeros(2, len(NAMES) - 1, 77, 64, dtype=torch.float64), learner.tokenized_prompts)
