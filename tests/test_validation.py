"""Bad input to the public API is refused with an error naming the argument, before any
backend runs."""

import math

import pytest
import torch

import demul_fast as df


def _good(gen, C=4, M=3, D=5, B=6, K=7):
    return dict(
        text_features=torch.randn(C, M, D, generator=gen),
        prompt_logits=torch.zeros(C, M),
        image_features=torch.randn(B, D, generator=gen),
        labels=torch.randint(0, C, (B,), generator=gen),
        scale=100.0,
        llm_embeddings=torch.randn(C, K, generator=gen),
        phi_weight=torch.randn(K, D, generator=gen),
        phi_bias=torch.randn(K, generator=gen),
    )


def test_good_input_runs(gen):
    out = df.demul_head(**_good(gen))
    assert torch.isfinite(out.loss)


HEAD_CASES = [
    # (argument to change, replacement builder, error type, text that must appear)
    ("text_features", lambda g: torch.randn(4, 3, generator=g), ValueError, "text_features"),
    ("text_features", lambda g: torch.randint(0, 3, (4, 3, 5)), TypeError, "text_features"),
    ("text_features", lambda g: [[1.0]], TypeError, "text_features"),
    ("prompt_logits", lambda g: torch.zeros(5, 3), ValueError, "prompt_logits"),
    ("prompt_logits", lambda g: torch.zeros(4, 2), ValueError, "prompt_logits"),
    ("prompt_logits", lambda g: torch.zeros(4), ValueError, "prompt_logits"),
    ("image_features", lambda g: torch.randn(6, 4, generator=g), ValueError, "image_features"),
    ("image_features", lambda g: torch.randn(6, 5, generator=g).double(), TypeError, "image_features"),
    ("image_features", lambda g: torch.randn(6, 5, 1, generator=g), ValueError, "image_features"),
    ("labels", lambda g: torch.tensor([0, 1, 2, 3, 4, 0]), ValueError, "labels"),
    ("labels", lambda g: torch.tensor([0, 1, 2, 3, -1, 0]), ValueError, "labels"),
    ("labels", lambda g: torch.tensor([0, 1, 2]), ValueError, "labels"),
    ("labels", lambda g: torch.zeros(6), TypeError, "labels"),
    ("labels", lambda g: torch.zeros(6, 1, dtype=torch.long), ValueError, "labels"),
    ("scale", lambda g: float("nan"), ValueError, "scale"),
    ("scale", lambda g: float("inf"), ValueError, "scale"),
    ("scale", lambda g: torch.tensor(float("inf")), ValueError, "scale"),
    ("scale", lambda g: torch.ones(2), ValueError, "scale"),
    ("scale", lambda g: "100", TypeError, "scale"),
    ("llm_embeddings", lambda g: torch.randn(5, 7, generator=g), ValueError, "llm_embeddings"),
    ("llm_embeddings", lambda g: torch.randn(4, 8, generator=g), ValueError, "llm_embeddings"),
    ("phi_weight", lambda g: torch.randn(7, 6, generator=g), ValueError, "phi_weight"),
    ("phi_weight", lambda g: torch.randn(7, generator=g), ValueError, "phi_weight"),
    ("phi_bias", lambda g: torch.randn(6, generator=g), ValueError, "phi_bias"),
    ("alpha", lambda g: math.nan, ValueError, "alpha"),
    ("label_smoothing", lambda g: 1.5, ValueError, "label_smoothing"),
    ("label_smoothing", lambda g: -0.1, ValueError, "label_smoothing"),
]


@pytest.mark.parametrize("arg,make,exc,text", HEAD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(HEAD_CASES)])
def test_head_rejects_bad_input(gen, arg, make, exc, text):
    kwargs = _good(gen)
    kwargs[arg] = make(gen)
    with pytest.raises(exc, match=text):
        df.demul_head(**kwargs)


def test_head_rejects_phi_without_llm_and_llm_without_phi(gen):
    kwargs = _good(gen)
    kwargs["llm_embeddings"] = None
    with pytest.raises(ValueError, match="llm_embeddings"):
        df.demul_head(**kwargs)
    kwargs = _good(gen)
    kwargs["phi_weight"] = None
    with pytest.raises(ValueError, match="phi_weight"):
        df.demul_head(**kwargs)


def test_head_rejects_mixed_devices(gen):
    kwargs = _good(gen)
    kwargs["labels"] = kwargs["labels"].to("meta")
    with pytest.raises(ValueError, match="labels"):
        df.demul_head(**kwargs)


def test_cross_entropy_rejects_bad_input(gen):
    X, U = torch.randn(3, 4, generator=gen), torch.randn(5, 4, generator=gen)
    y = torch.tensor([0, 4, 2])
    assert torch.isfinite(df.cosine_cross_entropy(X, U, y, 10.0))
    with pytest.raises(ValueError, match="class_features"):
        df.cosine_cross_entropy(X, torch.randn(5, 3), y, 10.0)
    with pytest.raises(ValueError, match="labels"):
        df.cosine_cross_entropy(X, U, torch.tensor([0, 5, 2]), 10.0)
    with pytest.raises(TypeError, match="share a dtype"):
        df.cosine_cross_entropy(X, U.half(), y, 10.0)
    with pytest.raises(ValueError, match="scale"):
        df.cosine_cross_entropy(X, U, y, math.inf)
    with pytest.raises(ValueError, match="label_smoothing"):
        df.cosine_cross_entropy(X, U, y, 10.0, label_smoothing=2.0)


def test_aggregate_and_distill_reject_bad_input(gen):
    T = torch.randn(4, 3, 5, generator=gen)
    with pytest.raises(ValueError, match="prompt_logits"):
        df.aggregate_prompts(T, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="text_features"):
        df.aggregate_prompts(torch.randn(0, 3, 5), torch.zeros(0, 3))
    W, E = torch.randn(7, 5, generator=gen), torch.randn(4, 7, generator=gen)
    assert torch.isfinite(df.prompt_distill_loss(T, W, None, E))
    with pytest.raises(ValueError, match="phi_weight"):
        df.prompt_distill_loss(T, torch.randn(7, 4), None, E)
    with pytest.raises(ValueError, match="llm_embeddings"):
        df.prompt_distill_loss(T, W, None, torch.randn(3, 7))
    with pytest.raises(ValueError, match="phi_bias"):
        df.prompt_distill_loss(T, W, torch.randn(6), E)
