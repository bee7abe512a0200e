"""Process plumbing of multi-process training (``torchrun``): joining the process group,
this process's rank and device, summing numbers over ranks, and the sampler that gives every
rank its share of the same global batches at any world size. The class-sharded training
step itself (``ShardedDeMul``) lives with the modules, in ``demul_fast.sharded``.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..sharded import collective_device, shard_bounds


def is_main() -> bool:
    """True on rank 0 of an initialised process group, and in a single process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class Process:
    """Where this process runs: rank, world size, local rank, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_sums(self, sums: Dict[str, float]) -> Dict[str, float]:
        """{name: number} summed over ranks (one float64 all-reduce)."""
        if self.world_size == 1:
            return dict(sums)
        keys = sorted(sums)
        t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=collective_device())
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def share(self, items: Sequence) -> list:
        """This rank's contiguous share of a list (e.g. the evaluation images)."""
        lo, hi = shard_bounds(len(items), self.world_size, self.rank)
        return list(items[lo:hi])


def init_from_env(device: Optional[str]) -> Process:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE, RANK, LOCAL_RANK, the
    rendezvous address), once; a single process (no WORLD_SIZE, or 1) joins nothing.

    device: None (CUDA device LOCAL_RANK when CUDA is available, else the CPU), "cuda" (device
            LOCAL_RANK) or "cpu"; an explicit CUDA index is refused with several processes.
    The backend is NCCL on CUDA, gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if world <= 1:
        return Process(0, 1, 0, dev)
    if dev.type == "cuda":
        if dev.index is not None:
            raise ValueError(f"--device {device}: under torchrun each process uses the CUDA device of its "
                             "LOCAL_RANK; pass --device cuda (or none)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: distributed training runs on cuda (NCCL) or cpu (gloo)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(_destroy)
    return Process(dist.get_rank(), dist.get_world_size(), local, dev)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's share of shuffled global batches, identical for every world size.

    n images, batch_size = the global batch B. Each epoch (``set_seed``) permutes the n
    images with its own seeded generator, cuts global batches of B (the last one smaller),
    and yields rank r's contiguous share of each (``shard_bounds``). With several ranks a
    last global batch smaller than the world size is merged into the one before it (every
    rank needs an image; with one rank nothing is merged). The union of the shares of one
    step is the global batch a single process would train on, whatever the world size.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size < world_size:
            raise ValueError(f"--batch-size {batch_size} is the global batch; it must be at least the number of "
                             f"processes ({world_size})")
        if n < world_size:
            raise ValueError(f"{n} training images cannot be shared by {world_size} processes")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed = 0

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def global_batches(self) -> List[List[int]]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        batches = [perm[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < self.world_size:
            last = batches.pop()
            batches[-1] = batches[-1] + last
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.global_batches():
            lo, hi = shard_bounds(len(batch), self.world_size, self.rank)
            yield batch[lo:hi]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest > 0 and (full == 0 or rest >= self.world_size))
