"""Few-shot DeMul training and evaluation on an image folder (what ``demul-fast train/eval`` run).

Data layout (``--data``): ``root/<class>/<image>`` (K images per class are sampled for
training, the rest is the test set), or ``root/train|val|test/<class>/<image>`` (K per class
sampled from train/; val/ and test/ are used whole). Class names are the folder names
(underscores become spaces in prompts), in sorted order. With ``--dataset NAME --root DIR``
one of the 11 benchmarks is read in CoOp's layout instead (``demul_fast.datasets``). Both
produce the same split record (``data_split``), which the run saves as ``split.json``.

An output folder holds everything a run needs to be evaluated or resumed:

    run.json                   the configuration, the class names, what was resolved
    split.json                 the sampled training images and the evaluation images
    llm_embeddings.safetensors the LLM class-name embeddings used (names inside)
    phi.safetensors, phi.json  the frozen map phi and its fit report
    checkpoint.json            names the current checkpoint folder
    checkpoint-<epoch>/        the last finished epoch, replaced as one unit (checkpoint.py):
      prompts/                 the learned prompts (DeMul.save_prompts: safetensors + JSON)
      trainer_state.pt         optimizer state and the last finished epoch (for --resume)
      log.json                 per-epoch loss, accuracy, learning rate and time

A new run (also one that replaces another with --overwrite) is built in a hidden folder
beside the output folder and moved to its place once its first checkpoint exists.

The optimisation follows CoOp: SGD (momentum 0.9, weight decay 5e-4), lr 0.002, a cosine
schedule over the epochs after one warm-up epoch at constant lr 1e-5, batch size 32,
random resized crop (scale 0.08..1) + horizontal flip on top of the model's own resize and
normalisation. Bad input (an image that does not decode included) raises ``DataError`` /
``CheckpointError`` / ``OutputExistsError`` (all ``ValueError`` or ``FileExistsError``)
before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from . import checkpoint
from . import distributed
from . import llm as llm_mod
from . import mapping
from .checkpoint import CheckpointError
from .checkpoint import write_json as _write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")
RUN_FILE, SPLIT_FILE, LOG_FILE, STATE_FILE = "run.json", "split.json", "log.json", "trainer_state.pt"
RUN_FILES = (RUN_FILE, SPLIT_FILE, checkpoint.POINTER_FILE)  # what every finished run folder holds
PROMPTS_DIR, LLM_FILE, PHI_FILE = "prompts", "llm_embeddings.safetensors", "phi.safetensors"
# settings a resumed run must share with the checkpoint (epochs, lr and the like may change)
RESUME_KEYS = ("shots", "seed", "model", "pretrained", "llm", "phi", "phi_names", "prompts", "n_ctx", "ctx_init",
               "dataset", "alpha", "allow_fewer", "reference", "text_encoder", "init_seed", "batch_size")


class DataError(ValueError):
    """The dataset folder cannot be used as asked (missing, empty, too few images, unreadable)."""


class OutputExistsError(FileExistsError):
    """The output folder already holds files and neither --resume nor --overwrite was given."""


def default_workers() -> int:
    """Data loader processes by default: min(4, the CPU cores this process may run on)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        cores = os.cpu_count() or 1
    return min(4, cores)


@dataclass
class TrainConfig:
    """Everything ``train`` needs; the command line fills it (see cli.py for the help texts)."""

    data: Optional[str]
    out: str
    dataset: Optional[str] = None  # one of demul_fast.datasets.LAYOUTS, read from root instead of data
    root: Optional[str] = None
    shots: int = 16
    seed: int = 1
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    llm: str = "minilm"
    phi: Optional[str] = None
    phi_names: str = "union"
    prompts: int = 4
    n_ctx: int = 16
    ctx_init: Optional[str] = None
    alpha: float = 1.0
    epochs: int = 50
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    batch_size: int = 32
    eval_batch_size: int = 128
    workers: int = field(default_factory=default_workers)
    device: Optional[str] = None
    precision: str = "auto"
    augment: bool = True
    reference: bool = False
    text_encoder: str = "prefix"
    checkpoint_text: bool = False
    backend: Optional[str] = None
    allow_fewer: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    init_seed: int = 0
    extra: Dict = field(default_factory=dict)


# -------------------------------------------------------------------------------------------
# data


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _class_dirs(folder: Path) -> List[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_in(folder: Path) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [str(Path(dirpath) / f) for f in sorted(filenames) if _is_image(Path(f))]
    return found


def _scan(folder: Path, what: str) -> Dict[str, List[str]]:
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} does not exist")
    classes = _class_dirs(folder)
    if not classes:
        raise DataError(f"{what} folder {folder} holds no class folders (expected {folder}/<class>/<image>)")
    images = {c.name: _images_in(c) for c in classes}
    empty = [c for c, files in images.items() if not files]
    if empty:
        raise DataError(f"{what} folder {folder}: class folder(s) without images ({', '.join(IMAGE_EXTENSIONS)}): "
                        + ", ".join(repr(c) for c in empty))
    return images


def discover(root) -> Dict[str, Dict[str, List[str]]]:
    """{split: {class: [image paths]}} for the ImageFolder or train/val/test layout."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a folder")
    subdirs = {p.name for p in _class_dirs(root)}
    if "train" in subdirs and subdirs <= set(SPLITS):
        splits = {s: _scan(root / s, f"{s} split") for s in SPLITS if s in subdirs}
        classes = list(splits["train"])
        for s, data in splits.items():
            llm_mod.check_classnames(list(data), classes, f"{root / s} (classes compared with train/)")
        return splits
    return {"all": _scan(root, "dataset")}


def _check_source(cfg: TrainConfig) -> None:
    if cfg.dataset is None and (cfg.root is not None or not cfg.data):
        raise ValueError("give --data DIR (an image folder), or --dataset NAME with --root DIR (CoOp's layout)")
    if cfg.dataset is not None and (cfg.data or not cfg.root):
        raise ValueError("--dataset reads CoOp's layout under --root DIR and excludes --data")


def data_split(cfg: TrainConfig) -> dict:
    """The run's split record, from --data (the folder layouts) or --dataset/--root (CoOp's):
    {"layout", "classes", "short": {class: count}, "train": {class: [paths]},
     "eval": {split: {class: [paths]}}}"""
    _check_source(cfg)
    if cfg.dataset is None:
        return folder_split(cfg)
    from . import datasets

    return datasets.coop_split(cfg.dataset, cfg.root, cfg.shots, cfg.seed, cfg.allow_fewer)


def folder_split(cfg: TrainConfig) -> dict:
    """``data_split`` for an image folder: K shots per class from train/ (or from the whole
    folder, whose other images are then the test set)."""
    found = discover(cfg.data)
    pool = found.get("train", found.get("all"))
    train_split, rest, short = sample_shots(pool, cfg.shots, cfg.seed, cfg.allow_fewer)
    evals = {s: found[s] for s in ("val", "test") if s in found}
    if "all" in found and any(rest.values()):
        evals["test"] = rest
    return {"layout": "splits" if "train" in found else "folder", "classes": list(pool), "short": short,
            "train": train_split, "eval": evals}


def sample_shots(images: Dict[str, List[str]], shots: int, seed: int, allow_fewer: bool) -> tuple:
    """K images per class, reproducibly: each class draws with its own RNG seeded from
    (seed, class name), so adding a class does not change the others' samples.

    returns (train {class: [paths]}, rest {class: [paths]}, short {class: count} of classes
    that had fewer than K images)."""
    if shots < 1:
        raise DataError(f"--shots must be >= 1, got {shots}")
    short = {c: len(files) for c, files in images.items() if len(files) < shots}
    if short and not allow_fewer:
        listing = ", ".join(f"{c!r} ({n})" for c, n in short.items())
        raise DataError(f"{len(short)} class(es) have fewer than --shots={shots} images: {listing}; "
                        "add images, lower --shots, or pass --allow-fewer to train with what exists")
    train, rest = {}, {}
    for c, files in images.items():
        digest = hashlib.sha256(f"{seed}\0{c}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        picked = set(rng.sample(range(len(files)), min(shots, len(files))))
        train[c] = [f for i, f in enumerate(files) if i in picked]
        rest[c] = [f for i, f in enumerate(files) if i not in picked]
    return train, rest, short


def open_rgb(path: str):
    """The image at ``path`` decoded completely, as RGB: how training and evaluation read it
    (a truncated file raises here, where ``Image.verify`` would pass it)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _decode_error(path: str) -> Optional[str]:
    try:
        open_rgb(path)
    except Exception as exc:  # noqa: BLE001 - every failure is reported with its path
        return f"{path} ({type(exc).__name__}: {' '.join(str(exc).split())})"
    return None


def check_images(paths: Sequence[str], threads: int = 1) -> None:
    """Decode every image as ``open_rgb`` does (``threads`` at a time) and raise DataError
    naming all unreadable ones, on one line."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        bad = [e for e in pool.map(_decode_error, paths) if e is not None]
    if bad:
        shown = "; ".join(bad[:20]) + (f"; ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{len(bad)} image file(s) cannot be read (remove or replace them): {shown}")


class ImageList(torch.utils.data.Dataset):
    """(image tensor, label) from a list of paths; an unreadable file raises with its path."""

    def __init__(self, items: Sequence[tuple], transform):
        self.items, self.transform = list(items), transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            img = open_rgb(path)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
        return self.transform(img), label


def _items(split: Dict[str, List[str]], classes: List[str]) -> List[tuple]:
    index = {c: i for i, c in enumerate(classes)}
    return [(p, index[c]) for c in classes for p in split.get(c, [])]


def build_transforms(preprocess_cfg: dict, augment: bool):
    """(train transform, eval transform) from open_clip's preprocess config: CoOp's random
    resized crop (scale 0.08..1, bicubic) + flip for training; resize + centre crop to eval."""
    from torchvision import transforms as T

    size = preprocess_cfg.get("size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(
        preprocess_cfg.get("interpolation", "bicubic"), T.InterpolationMode.BICUBIC)
    norm = T.Normalize(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
                       preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
    evaluation = T.Compose([T.Resize(min(size), interpolation=interp), T.CenterCrop(size), T.ToTensor(), norm])
    if not augment:
        return evaluation, evaluation
    training = T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=interp),
                          T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return training, evaluation


# -------------------------------------------------------------------------------------------
# model


def load_clip(model: str, pretrained: str, device: torch.device, init_seed: int = 0):
    """(CLIP model, tokenizer, preprocess cfg, description). ``model`` is an open_clip
    name or a path to an open_clip model-config JSON (its file name is the model name);
    ``pretrained`` an open_clip tag, a local checkpoint file, or "none" (random init seeded
    by ``init_seed``, so that eval rebuilds the same model). An OpenAI checkpoint file (the
    TorchScript archives OpenAI ships) gives OpenAI's ``clip.model.CLIP`` and
    ``clip.tokenize``; ``model`` must then name the same architecture."""
    import open_clip

    from .towers import openai_clip

    name = model
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"--model config {path} does not exist")
        open_clip.add_model_config(path)
        name = path.stem
    if name not in open_clip.list_models():
        raise ValueError(f"--model {model!r} is not an open_clip model name or config file "
                         f"(e.g. ViT-B-16; see open_clip.list_models())")
    random_init = pretrained.lower() == "none"
    looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if not random_init and looks_like_path and not Path(pretrained).is_file():
        raise FileNotFoundError(f"--pretrained checkpoint {pretrained} does not exist")
    if not random_init and looks_like_path and openai_clip.is_checkpoint(pretrained):
        clip, tokenizer, pre_cfg = openai_clip.load_checkpoint(pretrained, device)
        cfg = open_clip.get_model_config(name)
        found = openai_clip.architecture(clip)
        size = cfg["vision_cfg"]["image_size"]
        expected = (cfg["embed_dim"], cfg["text_cfg"]["width"], size[0] if isinstance(size, (list, tuple)) else size)
        if found != expected:
            raise ValueError(f"--pretrained {pretrained} is an OpenAI CLIP checkpoint with (embed dim, text width, "
                             f"image size) {found}, but --model {model} has {expected}")
        info = {"model_name": name, "random_init": False, "family": "openai_clip", "fingerprint": _fingerprint(clip)}
        return clip, tokenizer, pre_cfg, info
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            clip = open_clip.create_model(name, pretrained=None if random_init else pretrained)
        except RuntimeError as exc:
            raise ValueError(f"could not load --pretrained {pretrained!r} for {name}: {exc}. Pass a local "
                               "checkpoint file, or --pretrained none for a randomly initialised model") from exc
    clip = clip.to(device).eval().requires_grad_(False)
    info = {"model_name": name, "random_init": random_init, "fingerprint": _fingerprint(clip)}
    return clip, open_clip.get_tokenizer(name), open_clip.get_model_preprocess_cfg(clip), info


def _fingerprint(model: nn.Module) -> str:
    """A short hash of the model's weights: eval refuses a model other than the trained one."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().float().cpu()
        h.update(name.encode())
        h.update(f"{tuple(t.shape)}:{float(t.sum()):.6e}:{float(t.abs().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def _device(name: Optional[str]) -> torch.device:
    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _amp_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"--precision {precision} needs a CUDA device")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def build_module(cfg: TrainConfig, clip, tokenizer, classnames, llm_embeddings, phi):
    from . import DeMul
    from .reference import DeMulReference

    cls = DeMulReference if cfg.reference else DeMul
    kwargs = dict(llm_embeddings=llm_embeddings, phi=phi, n_prompts=cfg.prompts, n_ctx=cfg.n_ctx,
                  ctx_init=cfg.ctx_init, alpha=cfg.alpha, backend=cfg.backend)
    if not cfg.reference:
        kwargs.update(text_encoder=cfg.text_encoder, checkpoint_text=cfg.checkpoint_text)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the context initialisation
        return cls(clip, tokenizer, classnames, **kwargs)


# -------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def image_features(clip, loader, device, amp_dtype, progress: bool, desc: str) -> tuple:
    """Frozen image features [N, D] (float32) and labels [N] of a whole loader."""
    from tqdm.auto import tqdm

    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with _autocast(device, amp_dtype):
            f = clip.encode_image(images.to(device, non_blocking=True))
        feats.append(f.float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def accuracy(module, feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 (%) of cached class features u^ [C, D] against image features [N, D]."""
    module.eval()
    u = module.class_features().float()
    pred = (nn.functional.normalize(feats, dim=-1) @ u.T).argmax(-1)
    return 100.0 * float((pred == labels).sum()) / max(1, labels.numel())


# -------------------------------------------------------------------------------------------
# files


def _save_checkpoint(work: Path, out: Path, module, optimizer, scaler, epoch: int, history: List[dict]) -> Path:
    """Write the checkpoint of ``epoch`` (0-based): prompts, trainer state and log, as one unit
    (checkpoint.write), into the run folder ``work``. A new run's first checkpoint then moves
    it from its staging folder to ``out`` (replacing an --overwrite'd run only now).
    Returns the run's folder. All writes during training go through here."""

    def write_files(folder: Path) -> None:
        module.save_prompts(str(folder / PROMPTS_DIR))
        torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, folder / STATE_FILE)
        _write_json(folder / LOG_FILE, {"epochs": history})

    checkpoint.write(work, epoch + 1, write_files)
    if work != out:
        checkpoint.swap_in(work, out)
    return out


def _checkpoint_folder(out: Path) -> Path:
    folder = checkpoint.current(out)
    if folder is None:
        raise CheckpointError(f"{out} holds no checkpoint ({checkpoint.POINTER_FILE} is missing)")
    return folder


def run_log(out: Path) -> Optional[List[dict]]:
    """The per-epoch log records of the run in ``out``; None when no epoch has finished."""
    folder = checkpoint.current(out)
    return None if folder is None else json.loads((folder / LOG_FILE).read_text(encoding="utf-8"))["epochs"]


def _prepare_output(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a folder")
    if cfg.resume:
        missing = [f for f in RUN_FILES if not (out / f).exists()]
        if missing:
            raise CheckpointError(f"--resume: {out} is not a resumable run folder (missing {', '.join(missing)})")
        _checkpoint_folder(out)
        return out
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise OutputExistsError(f"output folder {out} already exists and is not empty; pass --resume to "
                                    "continue that run or --overwrite to replace it")
        if not (out / RUN_FILE).is_file():
            raise OutputExistsError(f"--overwrite replaces a run folder written by demul-fast train, and {out} "
                                    f"is not one (no {RUN_FILE}); choose another --out or empty it")
    return out


def _check_resume(out: Path, cfg: TrainConfig, classnames: List[str]) -> dict:
    saved = json.loads((out / RUN_FILE).read_text())
    try:
        llm_mod.check_classnames(classnames, saved.get("classnames", []),
                                 f"--resume: the dataset {cfg.data or cfg.dataset}")
    except llm_mod.ClassNameMismatch as exc:
        raise CheckpointError(str(exc)) from exc
    for key in RESUME_KEYS:
        if saved["config"].get(key) != getattr(cfg, key):
            raise CheckpointError(f"--resume: {key} is {getattr(cfg, key)!r} but the checkpoint in {out} was "
                                  f"trained with {saved['config'].get(key)!r}")
    return saved


def _load_prompts(module, folder: Path) -> None:
    from .prompt_learner import read_prompt_config

    try:
        saved = read_prompt_config(str(folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the prompts in {folder}: {exc}") from exc
    try:
        llm_mod.check_classnames(saved.get("classnames", []), module.config["classnames"], f"checkpoint {folder}")
    except llm_mod.ClassNameMismatch as exc:
        raise CheckpointError(str(exc)) from exc
    try:
        module.load_prompts(str(folder))
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {folder} does not fit this model: {exc}") from exc


# -------------------------------------------------------------------------------------------
# training


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    """CoOp's schedule: constant warm-up lr, then cosine over all epochs (0-based epoch)."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * epoch / cfg.epochs))


def _log(msg: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg) if progress else print(msg, flush=True)


def _phi_names(cfg: TrainConfig, classnames: List[str]) -> List[str]:
    if cfg.phi_names == "union":
        return mapping.compute_union([mapping.union_classnames(), classnames])
    if cfg.phi_names == "task":
        return list(classnames)
    path = Path(cfg.phi_names)
    if not path.is_file():
        raise FileNotFoundError(f"--phi-names must be union, task or a file of names; {path} does not exist")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return mapping.compute_union([names, classnames])


def _source_identity(source: str) -> str:
    path = Path(source)
    if source.lower() != "minilm" and path.exists():
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return source


def _llm_and_phi(cfg: TrainConfig, clip, tokenizer, classnames, device, clip_fingerprint: str) -> tuple:
    """(E [C, K], phi, fit report) for the distillation, or (None, None, None) when alpha is 0.

    phi is loaded from --phi, or fitted on the --phi-names names; with a file of embeddings
    as --llm, only the file's own names have LLM vectors, so phi is fitted on those. Fits are
    cached beside the LLM embeddings, keyed by the CLIP weights, the LLM, the names and the
    seed (encoding a few thousand prompts with a large CLIP on a CPU takes minutes).
    """
    if cfg.alpha == 0:
        return None, None, None
    emb = llm_mod.class_name_embeddings(classnames, cfg.llm)
    if cfg.phi:
        phi, info = mapping.load_phi(cfg.phi)
        d = mapping.clip_text_features(clip, tokenizer, classnames[:1], device=device).shape[1]
        if info["arch"]["out_dim"] != emb.shape[1] or info["arch"]["in_dim"] != d:
            raise ValueError(f"--phi maps D={info['arch']['in_dim']} to K={info['arch']['out_dim']}, but this "
                             f"CLIP model has D={d} and the LLM embeddings K={emb.shape[1]}")
        return emb, phi, info.get("report")
    if cfg.llm.lower() != "minilm" and Path(cfg.llm).is_file():
        names, y = list(classnames), emb
    else:
        names = _phi_names(cfg, classnames)
        y = llm_mod.class_name_embeddings(names, cfg.llm)
    key = json.dumps([clip_fingerprint, _source_identity(cfg.llm), names, mapping.DEFAULT_TEMPLATE, cfg.seed])
    cached = llm_mod.cache_dir().parent / "phi" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")
    if cached.exists():
        try:
            phi, info = mapping.load_phi(cached)
            _log(f"phi loaded from the cache {cached}", cfg.progress)
            return emb, phi, info.get("report")
        except (OSError, ValueError, KeyError, RuntimeError):
            pass  # a damaged cache entry is refitted
    x = mapping.clip_text_features(clip, tokenizer, names, device=device)
    phi, rep = mapping.fit_phi(x, y, seed=cfg.seed)
    _log(rep.summary(), cfg.progress)
    try:
        if distributed.is_main():  # one writer of the shared cache
            mapping.save_phi(cached, phi, rep)
    except OSError:
        pass  # the cache is an optimisation
    return emb, phi, asdict(rep)


def _save_llm_and_phi(out: Path, cfg: TrainConfig, classnames, emb, phi, report) -> None:
    if emb is None:
        return
    llm_mod.save_embeddings(out / LLM_FILE, classnames, emb)
    mapping.save_phi(out / PHI_FILE, phi, meta={"llm": cfg.llm, "model": cfg.model, "pretrained": cfg.pretrained,
                                                "template": mapping.DEFAULT_TEMPLATE, "source": cfg.phi})
    if report is not None:
        info = json.loads((out / "phi.json").read_text())
        info["report"] = report
        _write_json(out / "phi.json", info)


def train(cfg: TrainConfig) -> dict:
    """Run few-shot training; returns the final log record (see ``log.json``). A new run that
    stops before its first checkpoint leaves nothing behind (a run it was to replace intact)."""
    staged: List[Path] = []
    try:
        return _train(cfg, staged)
    except BaseException:
        for folder in staged:  # gone already once swapped in
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, staged: List[Path]) -> dict:
    from tqdm.auto import tqdm

    for name in ("epochs", "batch_size", "prompts", "n_ctx"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and math.isfinite(cfg.alpha) and cfg.alpha >= 0):
        raise ValueError(f"--lr must be > 0 and --alpha >= 0, got {cfg.lr} and {cfg.alpha}")
    proc = distributed.init_from_env(cfg.device)  # torchrun: join the process group; else one process
    device = proc.device
    if not proc.is_main:  # rank 0 alone shows progress and writes files
        cfg = TrainConfig(**{**asdict(cfg), "progress": False})
    amp_dtype = _amp_dtype(cfg.precision, device)
    out = _prepare_output(cfg)
    proc.barrier()  # every rank has checked the output folder before rank 0 writes to it

    # data: everything is checked before the output folder is touched
    if cfg.resume:
        split = json.loads((out / SPLIT_FILE).read_text())
        classnames = split["classes"]
        _check_resume(out, cfg, _dataset_classes(cfg))
        short = split.get("short", {})
    else:
        split = data_split(cfg)
        classnames, short = split["classes"], split["short"]
    check_images([p for part in [split["train"], *split["eval"].values()] for files in part.values() for p in files],
                 threads=cfg.workers)
    if short:
        _log(f"--allow-fewer: {len(short)} class(es) have fewer than {cfg.shots} images and train with all they "
             "have: " + ", ".join(f"{c} ({n})" for c, n in short.items()), cfg.progress)

    clip, tokenizer, pre_cfg, clip_info = load_clip(cfg.model, cfg.pretrained, device, cfg.init_seed)
    if cfg.resume:
        saved = json.loads((out / RUN_FILE).read_text())
        if saved["clip"]["fingerprint"] != clip_info["fingerprint"]:
            raise CheckpointError(f"--resume: the CLIP model differs from the one the checkpoint in {out} was "
                                  "trained with (weights fingerprint)")
        emb = phi = None
        if cfg.alpha != 0:
            emb = llm_mod.load_embeddings(out / LLM_FILE, classnames)
            phi, _ = mapping.load_phi(out / PHI_FILE)
        module = build_module(cfg, clip, tokenizer, classnames, emb, phi).to(device)
        work = out
    else:
        # everything that can fail on bad input runs before the output folder is written
        emb, phi, report = _llm_and_phi(cfg, clip, tokenizer, classnames, device, clip_info["fingerprint"])
        module = build_module(cfg, clip, tokenizer, classnames, emb, phi).to(device)
        work = out  # the other ranks of a torchrun job write nothing
        if proc.is_main:
            work = checkpoint.staging_folder(out)  # moved to out (over an --overwrite'd run) at the first checkpoint
            staged.append(work)
            _write_json(work / SPLIT_FILE, split)
            _save_llm_and_phi(work, cfg, classnames, emb, phi, report)

    train_tf, eval_tf = build_transforms(pre_cfg, cfg.augment)
    train_ds = ImageList(_items(split["train"], classnames), train_tf)
    sharded = None
    if proc.world_size > 1:
        sharded = distributed.ShardedDeMul(module, tokenizer)
        sharded.broadcast_parameters()
    # no persistent workers: each epoch's shuffle and augmentation are seeded afresh (resume
    # reproduces them)
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    start, history = 0, []
    if cfg.resume:
        last = _checkpoint_folder(out)
        _load_prompts(module, last / PROMPTS_DIR)
        state = torch.load(last / STATE_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = state["epoch"] + 1
        history = json.loads((last / LOG_FILE).read_text())["epochs"]
    run = {"config": asdict(cfg), "classnames": classnames, "clip": clip_info,
           "device": str(device), "amp": str(amp_dtype), "module": type(module).__name__,
           "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in pre_cfg.items()},
           "n_train": len(train_ds), "world_size": proc.world_size}
    if proc.is_main:
        _write_json(work / RUN_FILE, run)

    eval_sets = {}
    for s, data in split["eval"].items():
        loader = torch.utils.data.DataLoader(ImageList(proc.share(_items(data, classnames)), eval_tf),
                                             batch_size=cfg.eval_batch_size, shuffle=False, **loader_kw)
        eval_sets[s] = image_features(clip, loader, device, amp_dtype, cfg.progress, f"{s} features")

    _log(f"training {type(module).__name__} on {len(classnames)} classes, {len(train_ds)} images "
         f"({cfg.shots} shots), {cfg.epochs} epochs, device {device}, world size {proc.world_size}, output {out}",
         cfg.progress)
    gen = torch.Generator()
    # global batches of cfg.batch_size, each split over the processes: the same steps at any world size
    sampler = distributed.GlobalBatchSampler(len(train_ds), cfg.batch_size, proc.rank, proc.world_size)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, generator=gen, **loader_kw)
    record = history[-1] if history else {}
    for epoch in range(start, cfg.epochs):
        lr = _lr_at(cfg, epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        gen.manual_seed(cfg.seed * 100003 + epoch)  # worker seeds of this epoch
        sampler.set_seed(cfg.seed * 100003 + epoch)  # the shuffle of this epoch
        torch.manual_seed(cfg.seed * 100003 + epoch)  # augmentation without workers
        module.train()
        tot = {"loss": 0.0, "ce_loss": 0.0, "distill_loss": 0.0, "correct": 0, "n": 0}
        t0 = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                with torch.no_grad():  # the image tower is frozen
                    feats = clip.encode_image(images)
                o = module(image_features=feats, labels=labels) if sharded is None else sharded(feats, labels)
            optimizer.zero_grad(set_to_none=True)
            (o.loss if scaler is None else scaler.scale(o.loss)).backward()
            if sharded is not None:
                sharded.reduce_gradients()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            n = labels.numel()
            tot["n"] += n
            for k in ("loss", "ce_loss", "distill_loss"):
                tot[k] += float(getattr(o, k).detach()) * n
            tot["correct"] += int((o.logits.argmax(-1) == labels).sum())
            bar.set_postfix(loss=f"{tot['loss'] / tot['n']:.4f}", acc=f"{100.0 * tot['correct'] / tot['n']:.1f}")
        tot = proc.all_reduce_sums(tot)
        record = {"epoch": epoch + 1, "lr": lr, "seconds": round(time.time() - t0, 3), "world_size": proc.world_size,
                  **{k: tot[k] / tot["n"] for k in ("loss", "ce_loss", "distill_loss")},
                  "train_acc": 100.0 * tot["correct"] / tot["n"]}
        for s, (f, y) in eval_sets.items():
            record[f"{s}_acc"] = accuracy(module, f, y) if sharded is None else sharded.accuracy(f, y)
        history.append(record)
        if proc.is_main:
            work = _save_checkpoint(work, out, module, optimizer, scaler, epoch, history)
        _log(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} (ce {record['ce_loss']:.4f}, "
             f"distill {record['distill_loss']:.4f}), train acc {record['train_acc']:.2f}%"
             + "".join(f", {s} acc {record[s + '_acc']:.2f}%" for s in eval_sets)
             + f", lr {lr:.2e}, {record['seconds']:.1f}s", cfg.progress)
    return record


def _dataset_classes(cfg: TrainConfig) -> List[str]:
    _check_source(cfg)
    if cfg.dataset is not None:
        from . import datasets

        return datasets.read(cfg.dataset, cfg.root).classes
    found = discover(cfg.data)
    return list(found.get("train", found.get("all")))


# -------------------------------------------------------------------------------------------
# evaluation of a saved run


def evaluate(checkpoint, data: Optional[str] = None, split: Optional[str] = None, device: Optional[str] = None,
             batch_size: Optional[int] = None, workers: int = 0, progress: bool = True) -> dict:
    """Top-1 of a saved run on one split: ``test`` (default when present), ``val`` or ``train``.

    data: another dataset folder with the same classes (default: the run's own split). Its
          ``test``/``val`` folder, or for a plain folder all its images, are evaluated.
    """
    out = Path(checkpoint)
    missing = [f for f in RUN_FILES if not (out / f).exists()]
    if missing:
        raise CheckpointError(f"{out} is not a run folder written by demul-fast train (missing {', '.join(missing)})")
    run = json.loads((out / RUN_FILE).read_text())
    saved_split = json.loads((out / SPLIT_FILE).read_text())
    cfg = TrainConfig(**{k: v for k, v in run["config"].items()})
    classnames = run["classnames"]
    dev = _device(device)
    amp_dtype = _amp_dtype(cfg.precision if dev.type == "cuda" else "fp32", dev)

    if data is None:
        available = dict(saved_split["eval"], train=saved_split["train"])
        split = split or ("test" if "test" in available else "val" if "val" in available else "train")
        if split not in available:
            raise DataError(f"the run has no {split!r} split (it has {', '.join(available)})")
        images = available[split]
    else:
        found = discover(data)
        split = split or ("test" if "test" in found else "val" if "val" in found else "all")
        if split not in found:
            raise DataError(f"{data} has no {split!r} split (it has {', '.join(found)})")
        images = found[split]
        try:
            llm_mod.check_classnames(list(images), classnames, f"dataset {data}")
        except llm_mod.ClassNameMismatch as exc:
            raise CheckpointError(f"the checkpoint's classes differ from the data: {exc}") from exc
    check_images([p for files in images.values() for p in files], threads=workers)

    clip, tokenizer, pre_cfg, info = load_clip(cfg.model, cfg.pretrained, dev, cfg.init_seed)
    if info["fingerprint"] != run["clip"]["fingerprint"]:
        raise CheckpointError(f"the CLIP model built from {cfg.model!r} / {cfg.pretrained!r} differs from the one "
                              f"the prompts in {out} were trained with (weights fingerprint)")
    cfg.alpha = 0.0  # accuracy needs no LLM embeddings
    module = build_module(cfg, clip, tokenizer, classnames, None, None).to(dev)
    _load_prompts(module, _checkpoint_folder(out) / PROMPTS_DIR)
    _, eval_tf = build_transforms(run.get("preprocess", pre_cfg), False)
    loader = torch.utils.data.DataLoader(ImageList(_items(images, classnames), eval_tf),
                                         batch_size=batch_size or cfg.eval_batch_size, shuffle=False,
                                         num_workers=workers)
    feats, labels = image_features(clip, loader, dev, amp_dtype, progress, f"{split} features")
    acc = accuracy(module, feats, labels)
    return {"split": split, "top1": acc, "n": int(labels.numel()), "checkpoint": str(out),
            "data": data or cfg.data or f"{cfg.dataset} in {cfg.root}"}
