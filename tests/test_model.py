"""DeMul (prefix-shared encoder + DeMulHead) against DeMulReference (full encoder +
reference head): same parameters, same loss and gradients; state, caching, saving."""

import copy

import open_clip
import pytest
import torch
from open_clip.model import CLIP

from demul_fast import DeMul, UnsupportedTextTower
from demul_fast.model import DeMulReference
from numerics import assert_error_rule

TINY_VISION = dict(image_size=32, layers=1, width=32, patch_size=16, head_width=32)
SMALL_TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
NAMES = ["cat", "golden_retriever", "x", "sea anemone", "a rather long class name with many words in it"]
C, M, N_CTX, D, K, B = len(NAMES), 3, 4, 48, 20, 7


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(scope="module")
def clip64():
    torch.manual_seed(0)
    return CLIP(embed_dim=D, vision_cfg=TINY_VISION, text_cfg=SMALL_TEXT).double()


def head_args(kind, gen):
    e = torch.randn(C, K, generator=gen, dtype=torch.float64)
    if kind == "linear":
        return dict(llm_embeddings=e, phi=torch.nn.Linear(D, K).double())
    if kind == "mlp":
        return dict(llm_embeddings=e, phi=torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(),
                                                              torch.nn.Linear(16, K)).double())
    return {}


def loss_and_grads(module, x, y):
    module.zero_grad(set_to_none=True)
    out = module(labels=y, image_features=x)
    params = [module.ctx] + ([module.head.prompt_logits] if module.head.learn_weights else [])
    return [out.loss.detach()] + list(torch.autograd.grad(out.loss, params)), out


CONFIGS = {
    "linear_phi": dict(kind="linear"),
    "mlp_phi_uniform_weights": dict(kind="mlp", learn_weights=False, alpha=0.5),
    "no_llm_smoothing_entropy": dict(kind="none", label_smoothing=0.1, entropy_weight=0.2),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_demul_matches_reference_float64(config, clip64, tokenizer, gen):
    cfg = dict(CONFIGS[config])
    kw = dict(head_args(cfg.pop("kind"), gen), n_prompts=M, n_ctx=N_CTX, **cfg)
    fast = DeMul(clip64, tokenizer, NAMES, **kw).double()
    ref = DeMulReference(clip64, tokenizer, NAMES, **kw).double()
    with torch.no_grad():
        fast.ctx.normal_(0, 0.3, generator=gen)
        fast.head.prompt_logits.normal_(generator=gen) if fast.head.learn_weights else None
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=gen)
    got, out = loss_and_grads(fast, x, y)
    want, out_ref = loss_and_grads(ref, x, y)
    for name, a, b in zip(["loss", "dctx", "dA"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{config} {name}")
    assert out.logits.shape == (B, C)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-10, atol=1e-10)


def test_float32_error_rule(clip64, tokenizer, gen):
    """DeMul in float32 vs DeMulReference in float64: within the rule's multiple of the
    float32 reference's own error."""
    kw = dict(head_args("linear", gen), n_prompts=M, n_ctx=N_CTX)
    ref64 = DeMulReference(clip64, tokenizer, NAMES, **kw).double()
    with torch.no_grad():
        ref64.ctx.normal_(0, 0.3, generator=gen)
        ref64.head.prompt_logits.normal_(generator=gen)
    clip32 = copy.deepcopy(clip64).float()
    kw32 = dict(kw, llm_embeddings=kw["llm_embeddings"].float(), phi=copy.deepcopy(kw["phi"]).float())
    fast = DeMul(clip32, tokenizer, NAMES, **kw32).float()
    plain = DeMulReference(clip32, tokenizer, NAMES, **kw32).float()
    state = {k: v for k, v in ref64.state_dict().items() if not k.startswith("clip_model.")}
    fast.load_state_dict(state, strict=False)
    plain.load_state_dict(state, strict=False)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=gen)
    want, _ = loss_and_grads(ref64, x, y)
    got, _ = loss_and_grads(fast, x.float(), y)
    base, _ = loss_and_grads(plain, x.float(), y)
    for name, f, r, p, k in zip(["loss", "dctx", "dA"], got, want, base, [2.0, 3.0, 3.0]):
        assert_error_rule(name, f, r, p, k=k, dtype=torch.float32)


def test_state_dict_keys_and_interchange(clip64, tokenizer, gen):
    kw = dict(head_args("linear", gen), n_prompts=M, n_ctx=N_CTX)
    fast = DeMul(clip64, tokenizer, NAMES, **kw)
    ref = DeMulReference(clip64, tokenizer, NAMES, **kw)
    assert set(fast.state_dict()) == set(ref.state_dict())
    assert {n for n, p in fast.named_parameters() if p.requires_grad} == {"ctx", "head.prompt_logits"}
    assert not any(p.requires_grad for p in clip64.parameters())
    with torch.no_grad():
        ref.ctx.normal_(generator=gen)
    fast.load_state_dict(ref.state_dict())
    torch.testing.assert_close(fast.ctx, ref.ctx)
    fast.train()
    assert not fast.clip_model.training  # CLIP stays in eval mode


def test_class_features_cache(clip64, tokenizer, gen):
    model = DeMul(clip64, tokenizer, NAMES, n_prompts=M, n_ctx=N_CTX).double().eval()
    first = model.class_features()
    assert first.shape == (C, D) and not first.requires_grad
    assert model.class_features() is first  # cached
    x = torch.randn(B, D, dtype=torch.float64)
    torch.testing.assert_close(model(image_features=x).logits,
                               clip64.logit_scale.exp() * torch.nn.functional.normalize(x, dim=-1) @ first.T)
    with torch.no_grad():
        model.ctx.add_(0.1 * torch.randn(model.ctx.shape, generator=gen, dtype=model.ctx.dtype))  # an optimizer step
    second = model.class_features()
    assert second is not first and not torch.allclose(second, first)
    with torch.no_grad():
        model.head.prompt_logits[0, 0] = 3.0
    third = model.class_features()
    assert third is not second and not torch.allclose(third[0], second[0])
    model.train()
    assert model.class_features().requires_grad and model._cache is None


def test_ctx_init(clip64, tokenizer):
    model = DeMul(clip64, tokenizer, NAMES, n_prompts=2, n_ctx=4, ctx_init="a photo of_a").double()
    ids = tokenizer(["a photo of a"])[0, 1:5]
    torch.testing.assert_close(model.ctx.detach(), clip64.token_embedding(ids).expand(2, -1, -1))
    with pytest.raises(ValueError, match="has 4 tokens but n_ctx=5"):
        DeMul(clip64, tokenizer, NAMES, n_prompts=2, n_ctx=5, ctx_init="a photo of a")
    with pytest.raises(ValueError, match="2 phrases but n_prompts=3"):
        DeMul(clip64, tokenizer, NAMES, n_prompts=3, n_ctx=4, ctx_init=["a photo of a", "a picture of a"])


def test_refusals(clip64, tokenizer):
    with pytest.raises(ValueError, match="classnames is empty"):
        DeMul(clip64, tokenizer, [], n_ctx=N_CTX)
    with pytest.raises(ValueError, match="classnames is empty"):
        DeMulReference(clip64, tokenizer, [], n_ctx=N_CTX)
    torch.manual_seed(1)
    bidirectional = CLIP(embed_dim=D, vision_cfg=TINY_VISION, text_cfg=dict(SMALL_TEXT, no_causal_mask=True))
    with pytest.raises(UnsupportedTextTower, match="causal"):
        DeMul(bidirectional, tokenizer, NAMES, n_ctx=N_CTX)
    auto = DeMul(bidirectional, tokenizer, NAMES, n_prompts=M, n_ctx=N_CTX, text_encoder="auto")
    assert auto.text_encoder.mode == "full"
    with pytest.raises(ValueError, match="text_encoder must be"):
        DeMul(clip64, tokenizer, NAMES, n_ctx=N_CTX, text_encoder="fast")
    with pytest.raises(ValueError, match="give images or image_features"):
        DeMul(clip64, tokenizer, NAMES, n_prompts=M, n_ctx=N_CTX)(labels=torch.zeros(2, dtype=torch.long))


def test_forward_from_images(clip64, tokenizer, gen):
    model = DeMul(clip64, tokenizer, NAMES, n_prompts=M, n_ctx=N_CTX).double()
    images = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 4])
    out = model(images=images, labels=y)
    expected = model(image_features=clip64.encode_image(images), labels=y)
    torch.testing.assert_close(out.loss, expected.loss)
    out.loss.backward()
    assert model.ctx.grad is not None and model.ctx.grad.abs().sum() > 0


def test_save_load_round_trip(clip64, tokenizer, gen, tmp_path):
    kw = dict(head_args("linear", gen), n_prompts=M, n_ctx=N_CTX, alpha=0.25)
    model = DeMul(clip64, tokenizer, NAMES, **kw).double()
    with torch.no_grad():
        model.ctx.normal_(generator=gen)
        model.head.prompt_logits.normal_(generator=gen)
    model.save_prompts(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "prompts.safetensors"]
    loaded = DeMul.from_saved_prompts(str(tmp_path), clip64, tokenizer, **head_args("linear", gen)).double()
    assert loaded.config["classnames"] == NAMES and loaded.head.alpha == 0.25
    torch.testing.assert_close(loaded.ctx, model.ctx)
    torch.testing.assert_close(loaded.head.prompt_logits, model.head.prompt_logits.float().double())
    other = DeMulReference(clip64, tokenizer, NAMES, n_prompts=M, n_ctx=N_CTX).double().load_prompts(str(tmp_path))
    torch.testing.assert_close(other.eval().class_features(), model.eval().class_features())
    with pytest.raises(ValueError, match="other class names"):
        DeMul(clip64, tokenizer, NAMES[:-1], n_prompts=M, n_ctx=N_CTX).load_prompts(str(tmp_path))
    with pytest.raises(ValueError, match="shape"):
        DeMul(clip64, tokenizer, NAMES, n_prompts=M + 1, n_ctx=N_CTX).load_prompts(str(tmp_path))


def test_transformers_clip_model(tokenizer, gen):
    """DeMul over a small random transformers CLIPModel: same loss and ctx gradient as the
    reference, images encoded by get_image_features."""
    import transformers  # noqa: PLC0415 - the test extra (checked by conftest)

    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16), projection_dim=D)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(config).double()
    fast = DeMul(hf, tokenizer, NAMES, n_prompts=M, n_ctx=N_CTX).double()
    ref = DeMulReference(hf, tokenizer, NAMES, n_prompts=M, n_ctx=N_CTX).double()
    ref.load_state_dict(fast.state_dict())
    images = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    y = torch.tensor([1, 3])
    fast_out, ref_out = fast(images=images, labels=y), ref(images=images, labels=y)
    torch.testing.assert_close(fast_out.loss, ref_out.loss, rtol=1e-10, atol=1e-12)
    (g_fast,) = torch.autograd.grad(fast_out.loss, fast.ctx)
    (g_ref,) = torch.autograd.grad(ref_out.loss, ref.ctx)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-12)
