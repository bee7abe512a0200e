"""Text-encoder activation memory per rank of the class-sharded DeMul step, against the
world size, and what per-layer activation checkpointing (``--checkpoint-text``) saves.

    python benchmarks/distributed_memory.py [--worlds 1,2,4] [--C 256 --M 4 --n_ctx 8
        --width 256 --layers 4 --heads 4] [--out benchmarks/results/distributed-cpu.jsonl]

For each world size W, W processes are spawned (gloo on 127.0.0.1, CPU) and each runs one
``demul_fast.sharded.ShardedDeMul`` training step (forward and backward) on its share of
the classes, with and without ``checkpoint_text``. Measured per rank:

* ``act_bytes``: the bytes of the tensors that the text encoder's forward hands to autograd
  for the backward (``torch.autograd.graph.saved_tensors_hooks``; each storage counted once,
  the frozen model's weights not counted). This is the activation memory that stays
  allocated from the forward until the backward; with checkpointing it is each layer's
  input, and one layer's activations are recomputed at a time during the backward.
* ``rows``: token rows the rank's encoder runs through each layer (M*P prefix + packed suffix).
* ``peak_rss_bytes``: growth of the process's peak resident set over the whole step
  (``benchmarks.measure.peak_memory`` on the CPU; noisy, includes the head and allocator slack).
* ``step_s``: the step's wall time (noisy on a shared machine).

The model is a random open_clip text tower at a reduced width; class names are generated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SavedActivations:
    """Bytes of the tensors autograd saves for the backward inside the ``with`` block, each
    storage once, leaving out the storages of ``exclude`` (a module's parameters and buffers)."""

    def __init__(self, exclude: torch.nn.Module):
        self.skip = {t.untyped_storage().data_ptr() for t in [*exclude.parameters(), *exclude.buffers()]}
        self.storages = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(args, checkpoint: bool):
    import open_clip
    from open_clip.model import CLIP

    from demul_fast import DeMul

    torch.manual_seed(0)
    clip = CLIP(embed_dim=args.width, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16,
                                                      head_width=32),
                text_cfg=dict(context_length=77, vocab_size=49408, width=args.width, heads=args.heads,
                              layers=args.layers)).eval()
    tok = open_clip.get_tokenizer("ViT-B-16")
    names = [f"class {i} of a benchmark with {['short', 'rather long', 'long'][i % 3]} names" for i in range(args.C)]
    model = DeMul(clip, tok, names, n_prompts=args.M, n_ctx=args.n_ctx, backend="torch", checkpoint_text=checkpoint)
    return model, tok, clip


def _rank(rank, world, port, args, queue):
    sys.path.insert(0, ROOT)
    from benchmarks.measure import peak_memory
    from demul_fast.sharded import ShardedDeMul, shard_bounds

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        for checkpoint in (False, True):
            model, tok, clip = _build(args, checkpoint)
            step = ShardedDeMul(model, tok)
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(args.B, args.width, generator=gen)
            y = torch.randint(0, args.C, (args.B,), generator=gen)
            lo, hi = shard_bounds(args.B, world, rank)
            with SavedActivations(clip) as saved:
                t = step.text_features()
            del t
            rows = int(step.text_encoder._layout[1].valid_slots.numel()) + args.M * (1 + args.n_ctx)

            def one_step():
                model.zero_grad(set_to_none=True)
                out = step(x[lo:hi], y[lo:hi])
                out.loss.backward()
                step.reduce_gradients()

            one_step()  # warm-up (layouts, allocator)
            dist.barrier()
            t0 = time.perf_counter()
            peak = peak_memory(one_step, torch.device("cpu"))
            seconds = time.perf_counter() - t0
            queue.put(dict(world_size=world, rank=rank, checkpoint_text=checkpoint, classes=step.hi - step.lo,
                           rows=rows, act_bytes=saved.bytes, peak_rss_bytes=peak, step_s=round(seconds, 3)))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--C", type=int, default=256)
    p.add_argument("--M", type=int, default=4)
    p.add_argument("--n_ctx", type=int, default=8)
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "distributed-cpu.jsonl"))
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        queue = ctx.Queue()
        procs = mp.start_processes(_rank, args=(world, _free_port(), args, queue), nprocs=world, join=False,
                                   start_method="spawn")
        got = [queue.get(timeout=1800) for _ in range(2 * world)]
        procs.join()
        rows += sorted(got, key=lambda r: (r["checkpoint_text"], r["rank"]))
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    config = {k: getattr(args, k) for k in ("C", "M", "n_ctx", "B", "width", "layers", "heads")}
    print(f"{'W':>2} {'ckpt':>5} {'rank':>4} {'classes':>7} {'rows':>6} {'act MiB':>8} {'peak RSS MiB':>12} "
          f"{'step s':>7}")
    for r in rows:
        peak = "n/a" if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / 2**20:.1f}"
        print(f"{r['world_size']:>2} {str(r['checkpoint_text']):>5} {r['rank']:>4} {r['classes']:>7} {r['rows']:>6} "
              f"{r['act_bytes'] / 2**20:>8.2f} {peak:>12} {r['step_s']:>7}")
    with open(args.out, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(dict(r, config=config, date=stamp, torch=torch.__version__,
                                    load=os.getloadavg()[0])) + "\n")
    return rows


if __name__ == "__main__":
    main()
