"""Process plumbing of multi-process training (``torchrun``): joining the process group,
this process's rank and device, summing numbers over ranks. The sampler that gives every
rank its share of the same global batches at any world size is
``demul_fast.data.sampling.KeyedBatchSampler``; the class-sharded training step itself
(``ShardedDeMul``) lives with the modules, in ``demul_fast.sharded``; restarts by torchrun's
elastic agent are ``elastic``'s.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

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
        _init_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(_destroy)
    return Process(dist.get_rank(), dist.get_world_size(), local, dev)


def _init_group(backend: str) -> None:
    """``init_process_group`` from the environment. Under torchrun's elastic agent the group's
    keys go below a prefix of the attempt: the agent serves one store to every attempt of the
    job, and a restarted group must not read the addresses that the previous attempt's
    (dead) processes published there (gloo then fails with "connection refused")."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend)
        return
    store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group(backend, store=dist.PrefixStore(f"demul_fast/attempt_{attempt}", store), rank=rank,
                            world_size=world)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
