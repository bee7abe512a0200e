"""demul_fast.phi: fitting phi (CLIP text space -> LLM space), save/load; the shipped name lists
(demul_fast.data.classnames); fit_phi_for_model (demul_fast.app.phi_cache)."""

import pytest
import torch

from demul_fast import phi as phi_mod
from demul_fast.app.phi_cache import fit_phi_for_model
from demul_fast.data import classnames
from demul_fast.app import llm
from clip_tiny import tiny_clip

# CoOp's class-name counts of the 11 datasets
COUNTS = {"imagenet": 1000, "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196, "oxford_flowers": 102,
          "food101": 101, "fgvc_aircraft": 100, "sun397": 397, "dtd": 47, "eurosat": 10, "ucf101": 101}


def _planted(gen, n=400, d=48, k=24, noise=0.05):
    """Pairs with a known affine map plus noise: y = normalize(W x + b + noise)."""
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    w = torch.randn(k, d, generator=gen, dtype=torch.float64)
    b = 0.3 * torch.randn(k, generator=gen, dtype=torch.float64)
    y = x @ w.T + b + noise * torch.randn(n, k, generator=gen, dtype=torch.float64)
    return x, torch.nn.functional.normalize(y, dim=-1), w, b


def test_ridge_recovers_a_planted_map(gen):
    x, y, _, _ = _planted(gen)
    phi, rep = phi_mod.fit_phi(x, y, heldout=0.2, seed=3)
    assert isinstance(phi, torch.nn.Linear) and phi.weight.shape == (24, 48)
    assert not any(p.requires_grad for p in phi.parameters())
    assert rep.n_fit == 320 and rep.n_heldout == 80 and rep.ridge in phi_mod.RIDGE_GRID
    assert rep.cos_heldout > 0.97, rep.summary()
    # and a map with no relation does not generalise: the report can tell them apart
    y_random = torch.nn.functional.normalize(torch.randn(400, 24, generator=gen, dtype=torch.float64), dim=-1)
    _, rep_random = phi_mod.fit_phi(x, y_random, heldout=0.2, seed=3)
    assert rep_random.cos_heldout < 0.5


def test_ridge_matches_the_normal_equations(gen):
    x, y, _, _ = _planted(gen, n=60, d=10, k=7, noise=0.3)
    phi, rep = phi_mod.fit_phi(x, y, ridge=0.5, heldout=0.0)
    assert rep.cos_heldout is None and rep.ridge == 0.5
    # minimise ||Y - X W^T - b||^2 + lam ||W||^2 by solving the augmented system independently
    xa = torch.cat([x, torch.ones(60, 1, dtype=x.dtype)], 1)
    reg = 0.5 * torch.eye(11, dtype=x.dtype)
    reg[10, 10] = 0.0  # the bias is not penalised
    sol = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y)  # [11, 7]
    torch.testing.assert_close(phi.weight.double(), sol[:10].T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(phi.bias.double(), sol[10], rtol=1e-5, atol=1e-6)


def test_fit_is_deterministic_and_mlp_option(gen):
    x, y, _, _ = _planted(gen, n=200, d=16, k=8)
    a, ra = phi_mod.fit_phi(x, y, seed=1)
    b, rb = phi_mod.fit_phi(x, y, seed=1)
    assert torch.equal(a.weight, b.weight) and ra == rb
    mlp, rm = phi_mod.fit_phi(x, y, method="mlp", hidden=32, epochs=30, lr=1e-2, batch_size=100, seed=1)
    assert isinstance(mlp, torch.nn.Sequential) and isinstance(mlp[-1], torch.nn.Linear)
    assert rm.cos_heldout > 0.9, rm.summary()
    with pytest.raises(ValueError, match="method"):
        phi_mod.fit_phi(x, y, method="svm")
    with pytest.raises(ValueError, match="same N"):
        phi_mod.fit_phi(x, y[:5])
    with pytest.raises(ValueError, match="heldout"):
        phi_mod.fit_phi(x, y, heldout=1.0)


@pytest.mark.parametrize("method", ["ridge", "mlp"])
def test_save_load_round_trip(tmp_path, gen, method):
    x, y, _, _ = _planted(gen, n=100, d=12, k=6)
    phi, rep = phi_mod.fit_phi(x, y, method=method, hidden=16, epochs=5)
    path = phi_mod.save_phi(tmp_path / "phi", phi, rep, meta={"llm": "minilm"})
    assert path.name == "phi.safetensors" and (tmp_path / "phi.json").is_file()
    back, info = phi_mod.load_phi(tmp_path / "phi.safetensors")
    torch.testing.assert_close(back(x.float()), phi(x.float()), rtol=0, atol=0)
    assert info["report"]["cos_fit"] == rep.cos_fit and info["meta"] == {"llm": "minilm"}
    with pytest.raises(FileNotFoundError):
        phi_mod.load_phi(tmp_path / "nothing")
    with pytest.raises(TypeError):
        phi_mod.save_phi(tmp_path / "bad", torch.nn.ReLU())


def test_shipped_name_lists():
    lists = {}
    for ds in classnames.DATASETS:
        names = classnames.dataset_classnames(ds)
        assert len(names) == COUNTS[ds], ds
        # CLIP's ImageNet names (used by CoOp) repeat "missile" and "sunglasses"
        repeated = sorted({n for n in names if names.count(n) > 1})
        assert repeated == (["missile", "sunglasses"] if ds == "imagenet" else []), ds
        lists[ds] = names
    assert classnames.union_classnames() == classnames.compute_union([lists[d] for d in classnames.DATASETS])
    assert "Golden Retriever" in lists["imagenet"] and "abyssinian" in lists["oxford_pets"]
    with pytest.raises(ValueError, match="unknown dataset"):
        classnames.dataset_classnames("mnist")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return folder, *tiny_clip(folder, seed=0)


def test_fit_on_real_pairs(tiny):
    """The whole path: tiny random CLIP text tower, shipped MiniLM, names of two datasets."""
    tmp_path, model, tokenizer = tiny
    names = classnames.dataset_classnames("dtd") + classnames.dataset_classnames("oxford_pets")
    x = phi_mod.clip_text_features(model, tokenizer, names)
    assert x.shape == (len(names), 32)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(len(names)))
    y = llm.class_name_embeddings(names, "minilm", cache_folder=tmp_path, device="cpu")
    phi, rep = phi_mod.fit_phi(x, y)
    assert phi.weight.shape == (384, 32) and rep.n_fit + rep.n_heldout == len(names)
    # a random text tower still separates names a little: the fit beats predicting the mean
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(0))  # fit_phi's split, seed 0
    fit = order[rep.n_heldout:]
    y_hat = torch.nn.functional.normalize(y[fit], dim=-1)
    mean_only = torch.nn.functional.cosine_similarity(y_hat.mean(0, keepdim=True), y_hat).mean()
    assert rep.cos_fit > mean_only + 0.01, (rep.summary(), float(mean_only))


def test_fit_phi_for_model_uses_both_towers(tiny, monkeypatch):
    tmp_path, model, tokenizer = tiny
    monkeypatch.setenv("DEMUL_FAST_CACHE", str(tmp_path))
    names = classnames.dataset_classnames("eurosat") + classnames.dataset_classnames("dtd")
    phi, rep = fit_phi_for_model(model, tokenizer, "minilm", names=names, heldout=0.0, ridge=0.1)
    x = phi_mod.clip_text_features(model, tokenizer, names)
    y = llm.class_name_embeddings(names, "minilm")
    direct, _ = phi_mod.fit_phi(x, y, heldout=0.0, ridge=0.1)
    torch.testing.assert_close(phi.weight, direct.weight)
    assert rep.extra["template"] == "a photo of a {}." and rep.extra["n_names"] == len(names)
