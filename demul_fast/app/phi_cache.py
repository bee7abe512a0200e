"""The distillation's inputs: ``fit_phi_for_model`` (both sides of phi's fit for a list of
names, then the fit) and, for a run, the LLM embeddings of the class names and the map phi,
loaded from --phi or fitted (on the --phi-names names) and cached beside the LLM embeddings;
and their copies in the run folder."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from torch import nn

from .. import phi as phi_mod
from ..data.classnames import compute_union, union_classnames
from . import checkpoint, llm, processes, runtime
from .config import TrainConfig
from .run_folder import LLM_FILE, PHI_FILE

def phi_names(cfg: TrainConfig, classnames: List[str]) -> List[str]:
    if cfg.phi_names == "union":
        return compute_union([union_classnames(), classnames])
    if cfg.phi_names == "task":
        return list(classnames)
    path = Path(cfg.phi_names)
    if not path.is_file():
        raise FileNotFoundError(f"--phi-names must be union, task or a file of names; {path} does not exist")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return compute_union([names, classnames])


def source_identity(source: str) -> str:
    path = Path(source)
    if source.lower() != "minilm" and path.exists():
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return source


def llm_and_phi(cfg: TrainConfig, clip, tokenizer, classnames, device, clip_fingerprint: str) -> tuple:
    """(E [C, K], phi, fit report) for the distillation, or (None, None, None) when alpha is 0.

    phi is loaded from --phi, or fitted on the --phi-names names; with a file of embeddings
    as --llm, only the file's own names have LLM vectors, so phi is fitted on those. Fits are
    cached beside the LLM embeddings, keyed by the CLIP weights, the LLM, the names and the
    seed (encoding a few thousand prompts with a large CLIP on a CPU takes minutes).
    """
    if cfg.alpha == 0:
        return None, None, None
    emb = llm.class_name_embeddings(classnames, cfg.llm)
    if cfg.phi:
        phi, info = phi_mod.load_phi(cfg.phi)
        d = phi_mod.clip_text_features(clip, tokenizer, classnames[:1], device=device).shape[1]
        if info["arch"]["out_dim"] != emb.shape[1] or info["arch"]["in_dim"] != d:
            raise ValueError(f"--phi maps D={info['arch']['in_dim']} to K={info['arch']['out_dim']}, but this "
                             f"CLIP model has D={d} and the LLM embeddings K={emb.shape[1]}")
        return emb, phi, info.get("report")
    if cfg.llm.lower() != "minilm" and Path(cfg.llm).is_file():
        names, y = list(classnames), emb
    else:
        names = phi_names(cfg, classnames)
        y = llm.class_name_embeddings(names, cfg.llm)
    key = json.dumps([clip_fingerprint, source_identity(cfg.llm), names, phi_mod.DEFAULT_TEMPLATE, cfg.seed])
    cached = llm.cache_dir().parent / "phi" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")
    if cached.exists():
        try:
            phi, info = phi_mod.load_phi(cached)
            runtime.log(f"phi loaded from the cache {cached}", cfg.progress)
            return emb, phi, info.get("report")
        except (OSError, ValueError, KeyError, RuntimeError):
            pass  # a damaged cache entry is refitted
    x = phi_mod.clip_text_features(clip, tokenizer, names, device=device)
    phi, rep = phi_mod.fit_phi(x, y, seed=cfg.seed)
    runtime.log(rep.summary(), cfg.progress)
    try:
        if processes.is_main():  # one writer of the shared cache
            phi_mod.save_phi(cached, phi, rep)
    except OSError:
        pass  # the cache is an optimisation
    return emb, phi, asdict(rep)


def save_llm_and_phi(out: Path, cfg: TrainConfig, classnames, emb, phi, report) -> None:
    if emb is None:
        return
    llm.save_embeddings(out / LLM_FILE, classnames, emb)
    phi_mod.save_phi(out / PHI_FILE, phi, meta={"llm": cfg.llm, "model": cfg.model, "pretrained": cfg.pretrained,
                                                    "template": phi_mod.DEFAULT_TEMPLATE, "source": cfg.phi})
    if report is not None:
        info = json.loads((out / "phi.json").read_text())
        info["report"] = report
        checkpoint.write_json(out / "phi.json", info)


def fit_phi_for_model(clip_model: nn.Module, tokenizer, llm_source="minilm", names: Optional[Sequence[str]] = None,
                      template: str = phi_mod.DEFAULT_TEMPLATE, device=None, llm_device=None,
                      **fit_kwargs) -> Tuple[nn.Module, phi_mod.PhiReport]:
    """Compute both sides for ``names`` (default: ``union_classnames()``) and fit phi.

    llm_source: anything ``llm.class_name_embeddings`` accepts.
    """
    names = list(names) if names is not None else union_classnames()
    x = phi_mod.clip_text_features(clip_model, tokenizer, names, template, device=device)
    y = llm.class_name_embeddings(names, llm_source, device=llm_device)
    fitted, report = phi_mod.fit_phi(x, y, **fit_kwargs)
    report.extra.update({"template": template, "n_names": len(names)})
    return fitted, report
