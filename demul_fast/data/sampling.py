"""Training randomness that does not depend on the world size, the rank or the loader workers.

Every random draw of a training step comes from a ``torch.Generator`` seeded by a hash of
``(seed, epoch, what, index)`` (``generator``):

* the shuffle of an epoch: ``what = "shuffle"``, one permutation of the n training images;
* the augmentation of one image in one epoch: ``what = "augment"``, ``index`` = the image's
  position in the training list (its *global* sample index, the same in every process),
  which draws the random resized crop and then the horizontal flip (``KeyedAugment``).

``KeyedBatchSampler`` cuts each epoch's permutation into global batches of B images and
yields this rank's contiguous share of each as *keys* ``(epoch, index)``; ``KeyedImages``
turns a key into (augmented image, label). The image a step trains on, and its crop and
flip, are therefore functions of (seed, epoch, index) alone: 1, 2 or 3 processes, 0 or 8
loader workers, a first run or a resumed one all draw the same. Nothing reads the global
RNG (``torch.manual_seed`` and the data loader's per-worker seeds change nothing);
the prompt learner has no dropout. A resumed epoch skips its first steps without drawing
(``KeyedBatchSampler.skip``), so a run resumed from a step checkpoint sees the same data.

Data-loader workers: a worker receives keys and builds the generator of each sample
itself, so the worker count and which worker serves which batch change nothing; the
loader's ``generator`` only fixes the base seed PyTorch gives the workers' global RNGs,
which no transform here uses.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterator, List, Sequence, Tuple

import torch

from ..sharded import shard_bounds

Key = Tuple[int, int]  # (epoch, global sample index)


def seed_of(seed: int, epoch: int, what: str, index: int = 0) -> int:
    """A 63-bit seed from (seed, epoch, what, index): a hash, so neighbouring keys give
    unrelated streams."""
    text = f"{int(seed)}\0{int(epoch)}\0{what}\0{int(index)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(seed: int, epoch: int, what: str, index: int = 0) -> torch.Generator:
    """A CPU generator seeded by ``seed_of(seed, epoch, what, index)``."""
    return torch.Generator().manual_seed(seed_of(seed, epoch, what, index))


def epoch_order(n: int, seed: int, epoch: int) -> List[int]:
    """The shuffled order of n training images in ``epoch``."""
    return torch.randperm(n, generator=generator(seed, epoch, "shuffle")).tolist()


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _randint(gen: torch.Generator, hi: int) -> int:
    """An integer in [0, hi)."""
    return int(torch.randint(hi, (), generator=gen))


def crop_box(height: int, width: int, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
    """(top, left, h, w) of a random resized crop: an area share uniform in ``scale`` and a
    log-uniform aspect ratio in ``ratio``, placed uniformly; after 10 boxes that do not fit,
    the largest centred box whose aspect ratio is clamped to ``ratio``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(gen, scale[0], scale[1])
        aspect = math.exp(_uniform(gen, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(gen, height - h + 1), _randint(gen, width - w + 1), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class KeyedAugment:
    """CoOp's training augmentation with an explicit generator: a random resized crop to
    ``size`` (area share ``scale``, aspect ``ratio``, ``interpolation``), a horizontal flip
    with probability 1/2, then ``finish`` (to tensor and normalise).

    ``augment(image, gen)``: the crop box is drawn first, then the flip, from ``gen``."""

    def __init__(self, size: Tuple[int, int], interpolation, finish: Callable, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3)):
        self.size, self.interpolation, self.finish = tuple(size), interpolation, finish
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def __call__(self, image, gen: torch.Generator):
        from torchvision.transforms import functional as F

        width, height = image.size
        top, left, h, w = crop_box(height, width, gen, self.scale, self.ratio)
        image = F.resized_crop(image, top, left, h, w, list(self.size), interpolation=self.interpolation)
        if float(torch.rand((), generator=gen, dtype=torch.float64)) < 0.5:
            image = F.hflip(image)
        return self.finish(image)


class Fixed:
    """A transform without randomness in the keyed interface: ``Fixed(t)(image, gen) = t(image)``."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image, gen):
        return self.transform(image)


class KeyedImages(torch.utils.data.Dataset):
    """``dataset[(epoch, i)]`` = (``transform(image i, generator(seed, epoch, "augment", i))``,
    label i), where ``images[i]`` gives the decoded (image, label)."""

    def __init__(self, images: Sequence, transform: Callable, seed: int):
        self.images, self.transform, self.seed = images, transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Key):
        epoch, index = key
        image, label = self.images[index]
        return self.transform(image, generator(self.seed, epoch, "augment", index)), label


class KeyedBatchSampler(torch.utils.data.Sampler):
    """This rank's share of the epoch's global batches, as keys (epoch, index).

    n images, batch_size = the global batch B. Epoch e's order is ``epoch_order(n, seed, e)``,
    cut into global batches of B (the last one smaller); with several ranks a last global
    batch smaller than the world size is merged into the one before it (every rank needs an
    image). Rank r yields its contiguous share of each global batch (``shard_bounds``): the
    union of the shares of one step is the global batch one process trains on, at any world
    size.

    ``set_epoch(e)`` picks the epoch; ``skip(s)`` makes the next pass start at step s (a run
    resumed from a checkpoint taken after s steps of the epoch), the following passes at 0.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < world_size:
            raise ValueError(f"--batch-size {batch_size} is the global batch; it must be at least the number of "
                             f"processes ({world_size})")
        if n < world_size:
            raise ValueError(f"{n} training images cannot be shared by {world_size} processes")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, steps: int) -> None:
        if not 0 <= steps <= len(self):
            raise ValueError(f"cannot skip {steps} of the epoch's {len(self)} steps")
        self.start = steps

    def global_batches(self) -> List[List[int]]:
        order = epoch_order(self.n, self.seed, self.epoch)
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < self.world_size:
            last = batches.pop()
            batches[-1] = batches[-1] + last
        return batches

    def __iter__(self) -> Iterator[List[Key]]:
        start, self.start = self.start, 0
        for batch in self.global_batches()[start:]:
            lo, hi = shard_bounds(len(batch), self.world_size, self.rank)
            yield [(self.epoch, i) for i in batch[lo:hi]]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest > 0 and (full == 0 or rest >= self.world_size))
