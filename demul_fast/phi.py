"""Fitting, saving and loading the frozen map phi: CLIP text space (D) -> LLM embedding space (K),
docs/SPEC.md section 4.

DeMul's distillation compares phi(t^[c, m]) with the LLM embedding e[c] of class c's name,
so phi must first be fitted, once, from pairs over a list of names:

    x_n = normalize(CLIP text feature of the prompt "a photo of a {name}.")   [N, D]
    y_n = normalize(LLM embedding of the name)                               [N, K]

The CLIP text features come from the frozen CLIP text tower (the family's own
``encode_text`` / ``get_text_features``, ``demul_fast.towers``, on
the tokenised prompt ``template.format(name)``, default ``"a photo of a {}."``); the LLM
embeddings from ``demul_fast.app.llm``; ``demul_fast.app.phi_cache`` computes both sides for
a list of names (by default the union of the class names of the 11 standard few-shot
datasets, ``demul_fast.data.classnames.union_classnames``) and caches the fit.

Two fits:

* ``"ridge"`` (default): closed-form ridge regression with a bias, computed in float64,
  y ~ W x + b with W = (Xc^T Xc + lambda I)^-1 Xc^T Yc on centred data. lambda is
  chosen by 5-fold cross-validation (mean cosine) over a fixed grid unless given.
  Deterministic; returns ``nn.Linear(D, K)``.
* ``"mlp"``: ``nn.Sequential(Linear(D, H), GELU, Linear(H, K))`` trained with Adam on the
  mean (1 - cos) loss, seeded; its last layer is linear as SPEC 4 requires.

A share of the names (``heldout``, default 10%) is kept out of the fit and the mean cosine
between phi(x) and y on those names is reported (``PhiReport``) beside the training cosine.
The returned phi is the one fitted without them, so the held-out number describes it.
``save_phi`` / ``load_phi`` store phi as safetensors + JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import towers
from .prompts import tokenize

DEFAULT_TEMPLATE = "a photo of a {}."
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)

# -------------------------------------------------------------------------------------------
# the training pairs


@torch.no_grad()
def clip_text_features(clip_model: nn.Module, tokenizer, names: Sequence[str], template: str = DEFAULT_TEMPLATE,
                       batch_size: int = 256, device=None) -> torch.Tensor:
    """Normalised CLIP text features [N, D] (float32, CPU) of ``template.format(name)``.

    clip_model: a CLIP model of any family in ``demul_fast.towers`` (its own
    ``encode_text`` / ``get_text_features``); tokenizer: its tokenizer (open_clip's,
    ``clip.tokenize`` or a Hugging Face one). Underscores in names become spaces.
    """
    family = towers.family(clip_model)
    if device is None:
        device = next(clip_model.parameters()).device
    prompts = [template.format(" ".join(n.replace("_", " ").split())) for n in names]
    was_training = clip_model.training
    clip_model.eval()
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            tokens = tokenize(tokenizer, prompts[i:i + batch_size], family.context_length(clip_model))
            feats = family.encode_text(clip_model, tokens.to(device)).float()
            out.append(nn.functional.normalize(feats, dim=-1).cpu())
    finally:
        clip_model.train(was_training)
    return torch.cat(out)


# -------------------------------------------------------------------------------------------
# fitting


@dataclass
class PhiReport:
    """How well phi fits: mean cosine between phi(x) and the LLM embedding y."""

    method: str
    in_dim: int
    out_dim: int
    n_fit: int
    n_heldout: int
    cos_fit: float
    cos_heldout: Optional[float]
    ridge: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        held = "n/a" if self.cos_heldout is None else f"{self.cos_heldout:.4f}"
        lam = "" if self.ridge is None else f", lambda={self.ridge:g}"
        return (f"phi ({self.method}{lam}, {self.in_dim}->{self.out_dim}): mean cosine {self.cos_fit:.4f} on "
                f"{self.n_fit} fitted names, {held} on {self.n_heldout} held-out names")


def _mean_cos(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(pred.double(), y.double(), dim=-1, eps=1e-12).mean())


def _ridge_solve(x: torch.Tensor, y: torch.Tensor, lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """W [K, D], b [K] minimising ||Y - X W^T - b||^2 + lam ||W||^2 (float64)."""
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    gram = xc.T @ xc
    gram.diagonal().add_(lam)
    w = torch.linalg.solve(gram, xc.T @ yc).T  # [K, D]
    return w, ym - w @ xm


def _choose_ridge(x: torch.Tensor, y: torch.Tensor, grid: Sequence[float], folds: int, seed: int) -> float:
    """The grid lambda with the best mean held-out cosine over ``folds`` folds. One
    eigendecomposition of the fold's Gram matrix serves every lambda of the grid."""
    n = x.shape[0]
    folds = min(folds, n)
    if folds < 2:
        return float(grid[len(grid) // 2])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    parts = order.chunk(folds)
    scores = torch.zeros(len(grid), dtype=torch.float64)
    for k in range(folds):
        val = parts[k]
        fit = torch.cat([parts[j] for j in range(folds) if j != k])
        xm, ym = x[fit].mean(0), y[fit].mean(0)
        xc, yc = x[fit] - xm, y[fit] - ym
        evals, evecs = torch.linalg.eigh(xc.T @ xc)  # [D], [D, D]
        proj = evecs.T @ (xc.T @ yc)  # [D, K]
        for i, lam in enumerate(grid):
            wt = evecs @ (proj / (evals.clamp_min(0) + lam).unsqueeze(1))  # W^T [D, K]
            scores[i] += _mean_cos((x[val] - xm) @ wt + ym, y[val]) * len(val)
    return float(grid[int(scores.argmax())])


def _fit_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int, epochs: int, lr: float, weight_decay: float,
             seed: int, batch_size: int) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Linear(hidden, y.shape[1]))
    opt = torch.optim.AdamW(mlp.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            loss = (1 - nn.functional.cosine_similarity(mlp(x[idx]), y[idx], dim=-1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return mlp.eval().requires_grad_(False)


def fit_phi(clip_features: torch.Tensor, llm_embeddings: torch.Tensor, method: str = "ridge",
            ridge: Optional[float] = None, heldout: float = 0.1, seed: int = 0, hidden: int = 512,
            epochs: int = 200, lr: float = 1e-3, weight_decay: float = 1e-4,
            batch_size: int = 512) -> Tuple[nn.Module, PhiReport]:
    """Fit phi from pairs; returns (phi, report).

    clip_features:  [N, D] CLIP text features of the names (normalised here)
    llm_embeddings: [N, K] LLM embeddings of the same names (normalised here)
    method:  "ridge" -> nn.Linear(D, K); "mlp" -> nn.Sequential(Linear, GELU, Linear)
    ridge:   the ridge lambda; None chooses it by 5-fold cross-validation over RIDGE_GRID
    heldout: share of the names kept out of the fit for the report (0 = none)
    seed:    picks the held-out names (and the MLP's initialisation and batches)
    """
    if method not in ("ridge", "mlp"):
        raise ValueError(f"method must be 'ridge' or 'mlp', got {method!r}")
    if clip_features.dim() != 2 or llm_embeddings.dim() != 2 or clip_features.shape[0] != llm_embeddings.shape[0]:
        raise ValueError(f"clip_features [N, D] and llm_embeddings [N, K] must have the same N; got "
                         f"{tuple(clip_features.shape)} and {tuple(llm_embeddings.shape)}")
    if not 0.0 <= heldout < 1.0:
        raise ValueError(f"heldout must be in [0, 1), got {heldout}")
    n, d = clip_features.shape
    k = llm_embeddings.shape[1]
    n_held = int(round(n * heldout))
    if n - n_held < 2:
        raise ValueError(f"need at least 2 names to fit phi after holding out {n_held}, got {n}")
    x = nn.functional.normalize(clip_features.detach().cpu().double(), dim=-1)
    y = nn.functional.normalize(llm_embeddings.detach().cpu().double(), dim=-1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, fit = order[:n_held], order[n_held:]

    if method == "ridge":
        lam = float(ridge) if ridge is not None else _choose_ridge(x[fit], y[fit], RIDGE_GRID, 5, seed)
        w, b = _ridge_solve(x[fit], y[fit], lam)
        phi = nn.Linear(d, k)
        with torch.no_grad():
            phi.weight.copy_(w.float())
            phi.bias.copy_(b.float())
        phi.requires_grad_(False)
        extra = {}
    else:
        lam = None
        phi = _fit_mlp(x[fit].float(), y[fit].float(), hidden, epochs, lr, weight_decay, seed, batch_size)
        extra = {"hidden": hidden, "epochs": epochs, "lr": lr, "weight_decay": weight_decay}

    with torch.no_grad():
        def cos(idx):
            return _mean_cos(phi(x[idx].float()), y[idx]) if len(idx) else None
        report = PhiReport(method, d, k, len(fit), n_held, cos(fit), cos(held), lam, extra)
    return phi, report


# -------------------------------------------------------------------------------------------
# save / load


def _json_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_phi(path: Union[str, os.PathLike], phi: nn.Module, report: Optional[PhiReport] = None,
             meta: Optional[dict] = None) -> Path:
    """Write phi as ``<path>.safetensors`` (weights) + ``<path>.json`` (architecture, report, meta)."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    if isinstance(phi, nn.Linear):
        arch = {"kind": "linear", "in_dim": phi.in_features, "out_dim": phi.out_features, "bias": phi.bias is not None}
    elif (isinstance(phi, nn.Sequential) and len(phi) == 3 and isinstance(phi[0], nn.Linear)
          and isinstance(phi[1], nn.GELU) and isinstance(phi[2], nn.Linear)):
        arch = {"kind": "mlp", "in_dim": phi[0].in_features, "hidden": phi[0].out_features,
                "out_dim": phi[2].out_features}
    else:
        raise TypeError("save_phi stores nn.Linear or the MLP made by fit_phi "
                        f"(Linear, GELU, Linear), got {type(phi).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in phi.state_dict().items()}
    save_file(tensors, str(path))
    info = {"format": "demul_fast.phi/1", "arch": arch,
            "report": asdict(report) if report is not None else None, "meta": meta or {}}
    _json_path(path).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return path


def load_phi(path: Union[str, os.PathLike]) -> Tuple[nn.Module, dict]:
    """Read phi written by ``save_phi``; returns (frozen module, info dict with arch/report/meta)."""
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    info_file = _json_path(path)
    if not path.is_file() or not info_file.is_file():
        raise FileNotFoundError(f"phi needs both {path} and {info_file}")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    arch = info.get("arch", {})
    if arch.get("kind") == "linear":
        phi = nn.Linear(arch["in_dim"], arch["out_dim"], bias=arch.get("bias", True))
    elif arch.get("kind") == "mlp":
        phi = nn.Sequential(nn.Linear(arch["in_dim"], arch["hidden"]), nn.GELU(),
                            nn.Linear(arch["hidden"], arch["out_dim"]))
    else:
        raise ValueError(f"{info_file}: unknown phi architecture {arch!r}")
    phi.load_state_dict(load_file(str(path)))
    return phi.eval().requires_grad_(False), info
