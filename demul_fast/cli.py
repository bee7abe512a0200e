"""``demul-fast`` command line: ``train`` (few-shot DeMul on an image folder) and ``eval``.

    demul-fast train --data DIR --out RUN [--shots 16 --seed 1 --model ViT-B-16
                     --pretrained openai|FILE|none --llm minilm|FILE|DIR ...]
    demul-fast eval --checkpoint RUN [--data DIR --split test|val|train|all]

Also runnable as ``python -m demul_fast.cli``. Errors in the input (dataset, checkpoint,
output folder) are printed as one ``demul-fast: error: ...`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .llm import ClassNameMismatch
from .train import CheckpointError, DataError, OutputExistsError, TrainConfig, evaluate, train

DEFAULTS = TrainConfig(data="", out="")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="few-shot training on an image folder",
                       description="Few-shot DeMul training. Data: DIR/<class>/<image> (K shots per class are "
                                   "sampled, the other images are the test set) or DIR/train|val|test/<class>/<image>.")
    d = DEFAULTS
    p.add_argument("--data", required=True, help="dataset folder")
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
                                                "file (.pt/.safetensors/.npy with names, see demul_fast.llm) or a "
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
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default %(default)s)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="(default %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="data loader processes (default %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random resized crop / flip (the evaluation transform for training too)")
    p.add_argument("--reference", action="store_true", help="train demul_fast.reference.DeMulReference "
                                                            "(the plain PyTorch specification) instead of DeMul")
    p.add_argument("--text-encoder", default=d.text_encoder, choices=["prefix", "auto", "full"],
                   help="DeMul's text encoder (default %(default)s)")
    p.add_argument("--backend", default=None, choices=["cuda", "triton", "torch"], help="head backend "
                                                                                        "(default: automatic)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demul-fast", description="Few-shot DeMul prompt learning on CLIP.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    return parser


USER_ERRORS = (DataError, CheckpointError, OutputExistsError, ClassNameMismatch, FileNotFoundError, ValueError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            fields = {k: v for k, v in vars(args).items() if k != "command"}
            result = train(TrainConfig(**fields))
            print(json.dumps({"final": result}))
        else:
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
