"""``demul-fast`` command line: ``train``, ``eval``, ``sweep``, ``zeroshot`` and ``fit-phi``.

    demul-fast train --data DIR --out RUN [--shots 16 --seed 1 --model ViT-B-16
                     --pretrained openai|FILE|none --llm minilm|FILE|DIR ...]
    demul-fast train --dataset NAME --root DIR --out RUN [...]     (CoOp's layout, data/coop_layouts.py)
    demul-fast sweep --root DIR --datasets all --shots 1,2,4,8,16 --seeds 1,2,3 --out DIR [train options]
    demul-fast zeroshot --dataset NAME --root DIR [--model --pretrained --json FILE]
    demul-fast eval --checkpoint RUN [--data DIR --split test|val|train|all]
    demul-fast fit-phi --out phi.safetensors [--model --pretrained --llm --names --method]

Also runnable as ``python -m demul_fast.cli``; ``torchrun --nproc_per_node N -m demul_fast.cli
train ...`` trains on N processes (classes sharded, batches split; see demul_fast.sharded and
demul_fast.app.processes). Each subcommand's module is imported only when it runs.
Errors in the input (dataset, checkpoint, output folder) are printed as one
``demul-fast: error: ...`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Optional, Sequence

from ..data import DataError
from ..data.classnames import ClassNameMismatch
from ..data.coop_layouts import LAYOUTS, ClassNamesDiffer
from .checkpoint import CheckpointError
from .config import TrainConfig
from .run_folder import OutputExistsError
from .runtime import MissingExtra

DEFAULTS = TrainConfig(data="", out="")
# the sweep sets these for each of its runs
SWEEP_OWNED = ("--data", "--dataset", "--root", "--shots", "--seed", "--out", "--resume", "--overwrite")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="few-shot training on an image folder",
                       description="Few-shot DeMul training. Data: DIR/<class>/<image> (K shots per class are "
                                   "sampled, the other images are the test set) or DIR/train|val|test/<class>/<image>; "
                                   "or --dataset NAME --root DIR for one of the 11 benchmarks in CoOp's layout.")
    d = DEFAULTS
    p.add_argument("--data", default=None, help="dataset folder (or --dataset and --root)")
    p.add_argument("--dataset", default=None, choices=list(LAYOUTS), metavar="NAME",
                   help="a benchmark in CoOp's layout under --root: " + ", ".join(LAYOUTS))
    p.add_argument("--root", default=None, help="the folder holding CoOp's dataset folders (or the dataset's)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists and is not empty, "
                                                "unless --resume or --overwrite)")
    p.add_argument("--shots", type=int, default=d.shots, help="training images per class (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the shot sampling, the context "
                                                           "initialisation and the shuffling (default %(default)s)")
    p.add_argument("--allow-fewer", action="store_true", help="train classes with fewer than --shots images on "
                                                              "what they have (reported) instead of failing")
    p.add_argument("--model", default=d.model, help="open_clip model name, or an open_clip model-config JSON "
                                                    "file (default %(default)s)")
    p.add_argument("--pretrained", default=d.pretrained, help="open_clip pretrained tag, a local checkpoint "
                                                              "file, or 'none' for random weights (default %(default)s)")
    p.add_argument("--llm", default=d.llm, help="class-name embeddings: 'minilm' (shipped all-MiniLM-L6-v2), a "
                                                "file (.pt/.safetensors/.npy with names, see demul_fast.app.llm) or a "
                                                "local model folder (default %(default)s)")
    p.add_argument("--phi", default=None, help="a saved phi (phi.safetensors + phi.json); default: fit it now")
    p.add_argument("--phi-names", default=d.phi_names, help="names to fit phi on: 'union' (the 11 datasets' "
                                                            "names + yours), 'task' (yours) or a text file "
                                                            "(default %(default)s)")
    p.add_argument("--prompts", type=int, default=d.prompts, help="M prompts (default %(default)s)")
    p.add_argument("--n-ctx", type=int, default=d.n_ctx, help="context tokens per prompt (default %(default)s)")
    p.add_argument("--ctx-init", default=None, help="initial phrase of n-ctx tokens, e.g. 'a photo of a'")
    p.add_argument("--alpha", type=float, default=d.alpha, help="distillation weight; 0 = no LLM "
                                                                "(default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate, cosine schedule (default %(default)s)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="(default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default %(default)s)")
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help="epochs at --warmup-lr "
                                                                              "(default %(default)s)")
    p.add_argument("--warmup-lr", type=float, default=d.warmup_lr, help="(default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="the global batch, split over the "
                                                                        "processes under torchrun (default %(default)s)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="(default %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="data loader processes, also the threads that "
                                                                  "decode every image before training (default: "
                                                                  "min(4, available cores) = %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random resized crop / flip (the evaluation transform for training too)")
    p.add_argument("--reference", action="store_true", help="train demul_fast.model.DeMulReference "
                                                            "(the plain PyTorch specification) instead of DeMul")
    p.add_argument("--text-encoder", default=d.text_encoder, choices=["prefix", "auto", "full"],
                   help="DeMul's text encoder (default %(default)s)")
    p.add_argument("--checkpoint-text", action="store_true",
                   help="activation checkpointing per layer of the prefix-shared text encoder: less memory, "
                        "one more forward of the encoder (exact)")
    p.add_argument("--backend", default=None, choices=["cuda", "triton", "torch"], help="head backend "
                                                                                        "(default: automatic)")
    p.add_argument("--compile", default=None, choices=["none", "default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the training step (forward fullgraph, its backward, the optimizer update) "
                        "and the evaluation; reduce-overhead replays CUDA graphs (default: reduce-overhead on "
                        "CUDA, none on CPU; docs/step.md)")
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help="read the loss back from the device every N steps for the progress bar (default "
                        "%(default)s; also at every epoch's end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                                                         "(automatic in a group restarted by torchrun)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="STEPS",
                   help="also checkpoint after every STEPS optimizer steps within an epoch; 0 = at the end of "
                        "each epoch only (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out; the new run is built "
                                                            "beside it and replaces it at its first checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="top-1 accuracy of a trained run",
                       description="Top-1 accuracy of the prompts saved by 'demul-fast train'.")
    p.add_argument("--checkpoint", required=True, help="the --out folder of a training run")
    p.add_argument("--data", default=None, help="another dataset folder with the same classes "
                                                "(default: the run's own evaluation split)")
    p.add_argument("--split", default=None, help="test, val, train (the run's sampled shots) or all "
                                                 "(a plain --data folder); default test, else val")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _fit_phi_parser(sub) -> None:
    p = sub.add_parser("fit-phi", help="fit the map phi (CLIP text space -> LLM space) and save it",
                       description="Fit phi on pairs (CLIP text feature of 'a photo of a {name}.', LLM embedding "
                                   "of the name) and save phi.safetensors + phi.json for 'train --phi'.")
    p.add_argument("--out", required=True, help="file to write (.safetensors; a .json is written beside it)")
    p.add_argument("--model", default=DEFAULTS.model)
    p.add_argument("--pretrained", default=DEFAULTS.pretrained)
    p.add_argument("--llm", default=DEFAULTS.llm, help="minilm, a model folder, or an embeddings file (then its "
                                                       "own names are used unless --names is given)")
    p.add_argument("--names", default=None, help="'union' (the 11 datasets' class names, default for models) "
                                                 "or a text file with one name per line")
    p.add_argument("--method", default="ridge", choices=["ridge", "mlp"])
    p.add_argument("--heldout", type=float, default=0.1, help="share of names kept out for the report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--init-seed", type=int, default=0, help="seed of the random weights with --pretrained none")


def fit_phi_command(args) -> dict:
    """``demul-fast fit-phi``: returns the fit report as a dict."""
    from pathlib import Path

    from .. import phi as phi_mod
    from ..data.classnames import union_classnames
    from . import llm
    from .models import load_clip
    from .runtime import choose_device

    source = args.llm
    is_file = source.lower() != "minilm" and Path(source).is_file()
    if args.names is None or args.names == "union":
        names = None if is_file and args.names is None else union_classnames()
    else:
        path = Path(args.names)
        if not path.is_file():
            raise FileNotFoundError(f"--names file {path} does not exist")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if names is None:
        names, y = llm.read_embeddings_file(source)
    else:
        y = llm.class_name_embeddings(names, source)
    device = choose_device(args.device)
    clip, tokenizer, _, info = load_clip(args.model, args.pretrained, device, args.init_seed)
    x = phi_mod.clip_text_features(clip, tokenizer, names, device=device)
    phi, rep = phi_mod.fit_phi(x, y, method=args.method, heldout=args.heldout, seed=args.seed)
    rep.extra.update({"template": phi_mod.DEFAULT_TEMPLATE, "n_names": len(names)})
    phi_mod.save_phi(args.out, phi, rep, meta={"llm": source, "model": args.model, "pretrained": args.pretrained,
                                                   "clip_fingerprint": info["fingerprint"]})
    print(rep.summary())
    return {"report": vars(rep), "out": str(Path(args.out).with_suffix(".safetensors"))}


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="the paper's grid: datasets x shots x seeds, then the table and plot",
                       description="Train DeMul on each dataset (CoOp's layout under --root), shot count and seed; "
                                   "one run folder each under --out (finished runs are skipped, interrupted ones "
                                   "resumed), zero-shot CLIP beside them, then results.md, results.csv and "
                                   "accuracy_vs_shots.png in --out. Any other option is a 'demul-fast train' "
                                   "option applied to every run (e.g. --epochs 50 --model ViT-B-16).")
    p.add_argument("--root", required=True, help="the folder holding CoOp's dataset folders")
    p.add_argument("--datasets", default="all", help="'all' or names, e.g. dtd,eurosat (default %(default)s)")
    p.add_argument("--shots", default="1,2,4,8,16", help="(default %(default)s)")
    p.add_argument("--seeds", default="1,2,3", help="(default %(default)s)")
    p.add_argument("--out", required=True, help="the sweep's folder (reused: a second call resumes)")
    p.add_argument("--no-zeroshot", dest="zeroshot", action="store_false", help="skip the zero-shot CLIP baseline")


def _zeroshot_parser(sub) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot CLIP top-1 on a benchmark's test split",
                       description="Zero-shot CLIP with CoOp's per-dataset prompt (e.g. 'a photo of a {}, a type "
                                   "of pet.') on the test split of a dataset in CoOp's layout.")
    p.add_argument("--dataset", required=True, choices=list(LAYOUTS), metavar="NAME", help=", ".join(LAYOUTS))
    p.add_argument("--root", required=True, help="the folder holding CoOp's dataset folders (or the dataset's)")
    p.add_argument("--model", default=DEFAULTS.model)
    p.add_argument("--pretrained", default=DEFAULTS.pretrained)
    p.add_argument("--init-seed", type=int, default=0, help="seed of the random weights with --pretrained none")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default=DEFAULTS.precision, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS.eval_batch_size)
    p.add_argument("--workers", type=int, default=DEFAULTS.workers)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def sweep_command(args, train_options: Sequence[str]) -> dict:
    """``demul-fast sweep``: the train options are parsed as 'demul-fast train' parses them."""
    from ..data import coop_layouts
    from . import sweep

    owned = [a for a in train_options if a.split("=")[0] in SWEEP_OWNED]
    if owned:
        raise ValueError(f"the sweep sets {owned[0]} itself (use --root, --datasets, --shots, --seeds, --out)")
    names = coop_layouts.parse_names(args.datasets)
    shots = sweep.parse_ints(args.shots, "--shots")
    seeds = sweep.parse_ints(args.seeds, "--seeds")
    targs = build_parser().parse_args(["train", "--dataset", names[0], "--root", args.root, "--out", args.out,
                                       *train_options])
    base = TrainConfig(**{k: v for k, v in vars(targs).items() if k != "command"})
    return sweep.sweep(base, names, shots, seeds, args.out, with_zeroshot=args.zeroshot)


def zeroshot_command(args) -> dict:
    from .zeroshot import zeroshot

    result = zeroshot(args.dataset, args.root, model=args.model, pretrained=args.pretrained, device=args.device,
                      precision=args.precision, batch_size=args.batch_size, workers=args.workers,
                      init_seed=args.init_seed, progress=args.progress)
    print(f"zero-shot CLIP top-1 on {result['dataset']} test ({result['n']} images, prompt "
          f"{result['template']!r}): {result['top1']:.2f}%")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demul-fast", description="Few-shot DeMul prompt learning on CLIP.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _fit_phi_parser(sub)
    _sweep_parser(sub)
    _zeroshot_parser(sub)
    return parser


USER_ERRORS = (DataError, CheckpointError, OutputExistsError, ClassNameMismatch, FileNotFoundError, ValueError,
               MissingExtra)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, ClassNamesDiffer):
        return f"demul-fast: warning: {message}\n"
    return _PLAIN_FORMAT(message, category, filename, lineno, line)


_PLAIN_FORMAT = warnings.formatwarning


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "sweep":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    warnings.formatwarning = _format_warning
    try:
        if args.command == "sweep":
            sweep_command(args, extra)
        elif args.command == "zeroshot":
            zeroshot_command(args)
        elif args.command == "train":
            from .elastic import terminate_as_exit
            from .processes import is_main
            from .train import train

            terminate_as_exit()  # torchrun stops the survivors of a failure with SIGTERM
            fields = {k: v for k, v in vars(args).items() if k != "command"}
            result = train(TrainConfig(**fields))
            if is_main():
                print(json.dumps({"final": result}))
        elif args.command == "fit-phi":
            fit_phi_command(args)
        else:
            from .evaluate import evaluate

            result = evaluate(args.checkpoint, data=args.data, split=args.split, device=args.device,
                              batch_size=args.batch_size, workers=args.workers, progress=args.progress)
            print(f"top-1 on {result['split']} ({result['n']} images): {result['top1']:.2f}%")
            if args.json:
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(result, f, indent=2)
    except USER_ERRORS as exc:
        print(f"demul-fast: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
