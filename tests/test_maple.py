"""MaPLe's deep text prompts through ``CoOpTextEncoder``: an OpenAI tower whose blocks are
MaPLe's deep-prompt blocks (tests/support/family.py, written from issue 27's description)
is recognised by what its blocks compute, and ``forward(prompts, tokenized_prompts,
compound_prompts_deeper_text)`` equals MaPLe's full-length text encoder in float64 (outputs,
the gradients of ctx and of every deep prompt) for J in {1, 3, 9} and the class token at the
end, in the middle and in front; float16-cast weights under the error rule; blocks that only
look like MaPLe's are refused, naming what the probe found."""

import pytest
import torch
import torch.nn as nn

from demul_fast import towers
from demul_fast.coop import CoOpTextEncoder
from demul_fast.text_encoder import UnsupportedTextTower
from clip_tiny import tiny_openai_clip
from numerics import assert_error_rule
from support.family import DeepPromptBlock, DeepPromptLearner, DeepTextEncoder, to_deep_prompt_tower

NAMES = ["cat", "golden retriever", "extraordinarily long class name " * 14, "sea anemone", "x"]
N_CTX = 2
LAYERS = 10

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def maple_model(seed, dtype=torch.float64):
    model = tiny_openai_clip(width=32, heads=2, layers=LAYERS, seed=seed, dtype=dtype)
    return to_deep_prompt_tower(model, N_CTX)


def step(learner, encoder, upstream):
    """Text features [C, D] and the gradients of ctx and the J deep prompts."""
    prompts, deeper = learner()
    out = encoder(prompts, learner.tokenized_prompts, deeper)
    params = [learner.ctx, *learner.compound_prompts_text]
    grads = torch.autograd.grad((out.double() * upstream).sum(), params)
    return out.detach(), grads


def assert_exact(got, want, what, tol=1e-10):
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert scale > 0 and err <= tol * scale, f"{what}: error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("attention", ["masked", "prefix"])
@pytest.mark.parametrize("depth, position", [(1, "end"), (3, "end"), (9, "end"), (3, "middle"), (3, "front")])
def test_deep_prompts_float64_exact(depth, position, attention):
    model = maple_model(seed=depth)
    assert towers.text_tower(model).deep_ctx == N_CTX
    learner = DeepPromptLearner(NAMES, model, N_CTX, depth, position, seed=depth)
    upstream = torch.randn(len(NAMES), 48, generator=torch.Generator().manual_seed(depth), dtype=torch.float64)
    ref, ref_grads = step(learner, DeepTextEncoder(model), upstream)
    fast = CoOpTextEncoder(model, attention=attention)
    out, grads = step(learner, fast, upstream)
    assert_exact(out, ref, "features")
    for j, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_exact(g, r, "dctx" if j == 0 else f"d deep prompt {j - 1}")
    assert fast.last_plan.shared_len == (1 + N_CTX if position == "end" else 0)
    # without the deep prompts the features differ: they really entered every layer 1..J
    with torch.no_grad():
        prompts, deeper = learner()
        shallow = fast(prompts, learner.tokenized_prompts)
        fewer = fast(prompts, learner.tokenized_prompts, deeper[:-1])
    assert (shallow - ref).abs().max() > 1e-3 * ref.abs().max()
    assert (fewer - ref).abs().max() > 1e-6 * ref.abs().max()


@pytest.mark.parametrize("attention", ["masked", "prefix"])
def test_float16_cast_weights_error_rule(attention):
    model64, model16 = maple_model(seed=4), maple_model(seed=4, dtype=torch.float16)
    l64 = DeepPromptLearner(NAMES, model64, N_CTX, 3, seed=4)
    l16 = DeepPromptLearner(NAMES, model16, N_CTX, 3, seed=4)
    with torch.no_grad():
        for p64, p16 in zip(l64.parameters(), l16.parameters()):
            p64.copy_(p16)
    upstream = torch.randn(len(NAMES), 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref, ref_grads = step(l64, DeepTextEncoder(model64), upstream)
    plain, plain_grads = step(l16, DeepTextEncoder(model16), upstream)
    fast = CoOpTextEncoder(model16, attention=attention)
    out, grads = step(l16, fast, upstream)
    assert out.dtype == torch.float16 and fast.last_plan.shared_len == 1 + N_CTX
    # float16-cast weights compute in float16 by design (MaPLe's setting): so does the yardstick
    assert_error_rule("MaPLe T fp16", out, ref, plain, k=2.0, compute_dtype=torch.float16)
    for j, (g, r, p) in enumerate(zip(grads, ref_grads, plain_grads)):
        assert_error_rule(f"MaPLe grad {j} fp16", g, r, p, k=3.0, compute_dtype=torch.float16)


@pytest.mark.parametrize("attention", ["masked", "prefix"])
def test_batched_groups_with_deep_prompts(attention):
    """Deep prompts with [B, N, L, W] groups (different contexts per group)."""
    model = maple_model(seed=6)
    learner = DeepPromptLearner(NAMES, model, N_CTX, 3, seed=6)
    shift = torch.randn(2, 1, 1, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(2, len(NAMES), 48, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    prompts, deeper = learner()
    params = [learner.ctx, *learner.compound_prompts_text]
    grouped = torch.cat([learner.token_prefix.expand(2, -1, -1, -1),
                         (learner.ctx.unsqueeze(0).unsqueeze(0) + shift).expand(-1, len(NAMES), -1, -1),
                         learner.token_suffix.expand(2, -1, -1, -1)], dim=2)
    plain = DeepTextEncoder(model)
    ref = torch.stack([plain(p, learner.tokenized_prompts, deeper) for p in grouped])
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params, retain_graph=True)
    fast = CoOpTextEncoder(model, attention=attention)
    out = fast(grouped, learner.tokenized_prompts, deeper)
    grads = torch.autograd.grad((out * upstream).sum(), params)
    assert fast.last_plan.shared_len == 1 + N_CTX and fast.last_plan.groups == 2
    assert_exact(out.detach(), ref.detach(), "features")
    for j, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_exact(g, r, f"grad {j}")


class ScaledDeepBlock(DeepPromptBlock):
    """MaPLe's signature and replacement, another residual computation."""

    def forward(self, inputs):
        x, deeper, counter = super().forward(inputs)
        return [x * 1.01, deeper, counter]


class EarlyDeepBlock(DeepPromptBlock):
    """Replaces one position fewer than its deep prompt has (keeps x's length only for k + 1)."""

    def forward(self, inputs):
        x, deeper, counter = inputs
        if not self.first_layer and counter < len(deeper):
            ctx = deeper[counter][1:].unsqueeze(1).expand(-1, x.shape[1], -1).to(x.dtype)
            x = torch.cat([x[:1], ctx, x[self.n_ctx:]], dim=0)
            counter += 1
        return DeepPromptBlock.forward(self, [x, [], 0])[:1] + [deeper, counter]


@pytest.mark.parametrize("change, match", [
    (lambda m: m.transformer.resblocks.__setitem__(3, ScaledDeepBlock(m.transformer.resblocks[3], N_CTX, False)),
     r"resblock 3 \(ScaledDeepBlock\).*not MaPLe's deep-prompt block: on \[x, \[\], 0\] it is not the standard"),
    (lambda m: m.transformer.resblocks.__setitem__(2, EarlyDeepBlock(m.transformer.resblocks[2], N_CTX, False)),
     r"resblock 2 \(EarlyDeepBlock\).*on \[x, deeper, 0\] it does not compute MaPLe's deep-prompt block"),
    (lambda m: setattr(m.transformer.resblocks[0], "first_layer", False),
     r"not MaPLe's schedule .*resblock 0: deep-prompt, replaces 2 positions"),
    (lambda m: setattr(m.transformer.resblocks[5], "first_layer", True),
     r"not MaPLe's schedule .*resblock 5: deep-prompt, never replaces"),
    (lambda m: setattr(m.transformer.resblocks[4], "n_ctx", 3),
     r"not MaPLe's schedule .*resblock 4: deep-prompt, replaces 3 positions"),
])
def test_refusals_name_what_was_found(change, match):
    model = maple_model(seed=8, dtype=torch.float32)
    change(model)
    with pytest.raises(UnsupportedTextTower, match=match):
        CoOpTextEncoder(model)


def test_bad_deep_prompts_name_the_argument():
    model = maple_model(seed=9)
    learner = DeepPromptLearner(NAMES, model, N_CTX, 3, seed=9)
    enc = CoOpTextEncoder(model)
    prompts, deeper = learner()
    ids = learner.tokenized_prompts
    with pytest.raises(ValueError, match=r"compound_prompts_deeper_text\[1\] must be .*n_ctx=2"):
        enc(prompts, ids, [deeper[0], torch.zeros(3, 32, dtype=torch.float64)])
    with pytest.raises(ValueError, match="compound_prompts_deeper_text has 10 blocks"):
        enc(prompts, ids, [deeper[0]] * LAYERS)
    assert isinstance(nn.ParameterList(deeper), nn.ParameterList)
    enc(prompts, ids, nn.ParameterList(deeper))  # MaPLe passes its ParameterList


@pytest.mark.parametrize("attention", ["masked", "prefix"])
def test_deep_prompts_on_a_standard_tower(attention):
    """A tower of standard blocks takes deep prompts too (MaPLe's semantics run by the
    encoder): against MaPLe's encoder over the same weights with MaPLe's blocks."""
    import copy

    model = tiny_openai_clip(width=32, heads=2, layers=4, seed=10)
    assert towers.text_tower(model).deep_ctx is None
    maple = to_deep_prompt_tower(copy.deepcopy(model), N_CTX)
    learner = DeepPromptLearner(NAMES, model, N_CTX, 3, seed=10)
    upstream = torch.randn(len(NAMES), 48, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    ref, ref_grads = step(learner, DeepTextEncoder(maple), upstream)
    out, grads = step(learner, CoOpTextEncoder(model, attention=attention), upstream)
    assert_exact(out, ref, "features")
    for j, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_exact(g, r, f"grad {j}")
