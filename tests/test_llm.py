"""demul_fast.app.llm: class-name embeddings from files, local models and callables."""

import numpy as np
import pytest
import torch

from demul_fast.app import llm

NAMES = ["golden_retriever", "tabby cat", "Boeing 707-320", "apple pie"]


@pytest.fixture(scope="module")
def minilm_vectors():
    return llm.sentence_transformer_embeddings([llm.display_name(n) for n in NAMES], device="cpu")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npy"])
def test_file_round_trip(tmp_path, suffix, gen):
    emb = torch.randn(len(NAMES), 3072, generator=gen)
    path = llm.save_embeddings(tmp_path / f"emb{suffix}", NAMES, emb)
    if suffix == ".npy":
        assert (tmp_path / "emb.txt").read_text().splitlines() == NAMES
    got = llm.class_name_embeddings(NAMES, str(path))
    torch.testing.assert_close(got, emb, rtol=0, atol=0)
    # underscores and spaces are the same name
    got = llm.class_name_embeddings(["golden retriever", "tabby_cat", "Boeing 707-320", "apple pie"], path)
    torch.testing.assert_close(got, emb, rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npy"])
def test_file_with_other_names_is_refused(tmp_path, suffix, gen):
    path = llm.save_embeddings(tmp_path / f"emb{suffix}", NAMES, torch.randn(len(NAMES), 8, generator=gen))
    wrong = ["golden_retriever", "tabby cat", "Airbus A380", "apple pie"]
    with pytest.raises(llm.ClassNameMismatch, match=r"class 2 is 'Boeing 707-320'.*'Airbus A380'"):
        llm.class_name_embeddings(wrong, path)
    with pytest.raises(llm.ClassNameMismatch, match=r"first differing class is 4: 'pizza' \(missing from the file\)"):
        llm.class_name_embeddings(NAMES + ["pizza"], path)
    with pytest.raises(llm.ClassNameMismatch, match=r"first differing class is 3: 'apple pie' \(only in the file\)"):
        llm.class_name_embeddings(NAMES[:3], path)
    swapped = [NAMES[1], NAMES[0]] + NAMES[2:]
    with pytest.raises(llm.ClassNameMismatch, match="class 0 is 'golden_retriever'"):
        llm.class_name_embeddings(swapped, path)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not 'minilm'"):
        llm.class_name_embeddings(NAMES, tmp_path / "missing.pt")
    np.save(tmp_path / "lonely.npy", np.zeros((4, 8), np.float32))
    with pytest.raises(FileNotFoundError, match="lonely.txt"):
        llm.class_name_embeddings(NAMES, tmp_path / "lonely.npy")
    torch.save({"embeddings": torch.zeros(4, 8)}, tmp_path / "nonames.pt")
    with pytest.raises(ValueError, match="classnames"):
        llm.class_name_embeddings(NAMES, tmp_path / "nonames.pt")
    torch.save({"classnames": NAMES, "embeddings": torch.zeros(3, 8)}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="one row per name"):
        llm.class_name_embeddings(NAMES, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="empty"):
        llm.class_name_embeddings([], "minilm")


def test_minilm_is_normalised_and_matches_sentence_transformers(minilm_vectors):
    assert minilm_vectors.shape == (len(NAMES), 384)
    torch.testing.assert_close(minilm_vectors.norm(dim=-1), torch.ones(len(NAMES)))
    import sentence_transformers as st  # noqa: PLC0415 - the test extra (checked by conftest)

    ref = st.SentenceTransformer(str(llm.minilm_path()), device="cpu").encode(
        [llm.display_name(n) for n in NAMES], convert_to_tensor=True)
    torch.testing.assert_close(minilm_vectors, ref.float().cpu(), rtol=1e-4, atol=1e-5)


def test_minilm_semantics(minilm_vectors):
    more = llm.sentence_transformer_embeddings(["labrador retriever", "jet airliner"], device="cpu")
    sims = more @ minilm_vectors.T  # [2, 4]
    assert sims[0].argmax() == 0  # labrador is closest to golden retriever
    assert sims[1].argmax() == 2  # jet airliner is closest to the Boeing


def test_cache_and_sources(tmp_path, minilm_vectors):
    calls = []

    def fake(texts):
        calls.append(list(texts))
        return torch.arange(len(texts) * 3, dtype=torch.float32).reshape(len(texts), 3)

    a = llm.class_name_embeddings(NAMES, fake, cache_key="fake-v1", cache_folder=tmp_path)
    b = llm.class_name_embeddings(NAMES, fake, cache_key="fake-v1", cache_folder=tmp_path)
    torch.testing.assert_close(a, b)
    assert calls == [[llm.display_name(n) for n in NAMES]]  # second call read the cache
    llm.class_name_embeddings(NAMES, fake, cache_folder=tmp_path)  # no key: not cached
    assert len(calls) == 2
    with pytest.raises(ValueError, match=r"\[C, K\]"):
        llm.class_name_embeddings(NAMES, lambda t: torch.zeros(2, 3))

    e1 = llm.class_name_embeddings(NAMES, "minilm", cache_folder=tmp_path, device="cpu")
    torch.testing.assert_close(e1, minilm_vectors)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # fake-v1 and minilm entries
    e2 = llm.class_name_embeddings(NAMES, "minilm", cache_folder=tmp_path, device="cpu")
    torch.testing.assert_close(e2, e1, rtol=0, atol=0)

    # (c) a plain transformers encoder folder: mean pooling + normalisation; MiniLM's own
    # pipeline is exactly that, so the two must agree
    hf = tmp_path / "hf_encoder"
    hf.mkdir()
    for f in llm.minilm_path().iterdir():
        if f.is_file() and f.name not in ("modules.json", "sentence_bert_config.json"):
            (hf / f.name).symlink_to(f)
    e3 = llm.class_name_embeddings(NAMES, hf, cache_folder=tmp_path, device="cpu")
    torch.testing.assert_close(e3, minilm_vectors, rtol=1e-5, atol=1e-6)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="neither modules.json"):
        llm.class_name_embeddings(NAMES, tmp_path / "empty_dir")
