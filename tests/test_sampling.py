"""demul_fast.sampling: every draw of a training step is a function of (seed, epoch, global
sample index), whatever the world size, the rank, the loader workers or a resume."""

import numpy as np
import pytest
import torch
from PIL import Image

from demul_fast.data import sampling
from demul_fast.data.sampling import KeyedAugment, KeyedBatchSampler, KeyedImages, crop_box, generator


def test_keys_give_reproducible_unrelated_streams():
    a = torch.rand(4, generator=generator(1, 2, "augment", 3))
    assert torch.equal(a, torch.rand(4, generator=generator(1, 2, "augment", 3)))
    seeds = {sampling.seed_of(s, e, w, i) for s in (1, 2) for e in range(3) for w in ("shuffle", "augment")
             for i in range(20)}
    assert len(seeds) == 2 * 3 * 2 * 20  # no two keys share a stream
    assert all(0 <= s < 2 ** 63 for s in seeds)


@pytest.mark.parametrize("height,width", [(40, 40), (37, 90), (200, 3), (1, 1)])
def test_crop_boxes_lie_inside_the_image(height, width):
    areas = []
    for i in range(300):
        top, left, h, w = crop_box(height, width, generator(0, 0, "augment", i))
        assert 0 < h and 0 < w and 0 <= top and 0 <= left and top + h <= height and left + w <= width
        areas.append(h * w / (height * width))
    if height == width == 40:  # the area share spans CoOp's range (0.08..1) rather than one value
        assert min(areas) < 0.2 and max(areas) > 0.8


def test_crop_falls_back_to_a_centred_box_of_clamped_aspect():
    # an impossible area share: every try fails, so the box is the centred fallback
    assert crop_box(100, 10, generator(0, 0, "x"), scale=(2.0, 3.0)) == ((100 - 13) // 2, 0, 13, 10)
    assert crop_box(10, 100, generator(0, 0, "x"), scale=(2.0, 3.0)) == (0, (100 - 13) // 2, 10, 13)
    assert crop_box(30, 31, generator(0, 0, "x"), scale=(2.0, 3.0)) == (0, 0, 30, 31)


def _augment():
    from torchvision import transforms as T

    return KeyedAugment((16, 16), T.InterpolationMode.BICUBIC, T.ToTensor())


def _pictures(n, size=24, seed=0):
    rng = np.random.default_rng(seed)
    return [(Image.fromarray(rng.integers(0, 256, (size, size + 5, 3), dtype=np.uint8)), i % 3) for i in range(n)]


def test_augmentation_depends_on_the_key_only():
    images = KeyedImages(_pictures(6), _augment(), seed=5)
    first = images[(1, 4)][0]
    for key in [(0, 4), (1, 3), (2, 4)]:  # other draws in between change nothing
        images[key]
    assert torch.equal(images[(1, 4)][0], first)
    assert not torch.equal(images[(2, 4)][0], first)  # another epoch, another crop
    assert not torch.equal(KeyedImages(_pictures(6), _augment(), seed=6)[(1, 4)][0], first)  # another seed
    torch.manual_seed(123)  # the global RNG is not read
    assert torch.equal(images[(1, 4)][0], first)


def test_flip_is_drawn_with_probability_one_half():
    picture = Image.fromarray(np.tile(np.arange(20, dtype=np.uint8)[None, :, None] * 12, (20, 1, 3)))
    from torchvision.transforms import InterpolationMode

    aug = KeyedAugment((20, 20), InterpolationMode.NEAREST, np.asarray, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # crop = whole image
    flips = 0
    for i in range(400):
        out = aug(picture, generator(0, 0, "augment", i))
        assert np.array_equal(out, np.asarray(picture)) or np.array_equal(out, np.asarray(picture)[:, ::-1])
        flips += not np.array_equal(out, np.asarray(picture))
    assert 150 < flips < 250  # 400 fair coins: mean 200, sd 10


def _steps(n, batch, world, epoch=0, seed=3, skip=0):
    """The global batches (as lists of keys) that ``world`` ranks train on, step by step."""
    samplers = [KeyedBatchSampler(n, batch, seed, r, world) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
        s.skip(skip)
    shares = [list(s) for s in samplers]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == len(samplers[0]) - skip
    assert all(part for share in shares for part in share), "a rank got an empty share"
    return [sum(step, []) for step in zip(*shares)]


@pytest.mark.parametrize("n,batch", [(13, 4), (12, 4), (9, 8), (5, 16), (12, 5)])
def test_every_world_size_trains_on_the_same_global_batches(n, batch):
    one = _steps(n, batch, 1)
    assert sorted(k[1] for step in one for k in step) == list(range(n))
    for world in (2, 3):
        if batch < world:
            continue
        steps = _steps(n, batch, world)
        assert sorted(k[1] for step in steps for k in step) == list(range(n))
        if n % batch == 0 or n % batch >= world:  # no merged last batch
            assert steps == one
        skip = min(2, len(steps))
        assert _steps(n, batch, world, skip=skip) == steps[skip:]  # a resumed epoch starts at its step
    assert _steps(n, batch, 1, epoch=1)[0][0][0] == 1  # keys carry their epoch
    assert _steps(n, batch, 1, epoch=1) != [[(1, i) for _, i in step] for step in one]  # a new shuffle


def test_skip_applies_to_one_pass_only():
    s = KeyedBatchSampler(10, 3, 0)
    full = list(s)
    s.skip(3)
    assert list(s) == full[3:] and list(s) == full
    with pytest.raises(ValueError, match="cannot skip 5"):
        s.skip(5)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least the number of processes"):
        KeyedBatchSampler(10, 2, 0, 0, 3)
    with pytest.raises(ValueError, match="cannot be shared by 3"):
        KeyedBatchSampler(2, 4, 0, 0, 3)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_loader_workers_and_ranks_draw_the_same_images(world):
    """Augmented batches through a DataLoader: 0 or 2 workers and any world size give, key for
    key, the images of the single-process loader without workers."""
    images = KeyedImages(_pictures(7), _augment(), seed=1)

    def batches(rank, workers):
        sampler = KeyedBatchSampler(len(images), 4, 1, rank, world)
        sampler.set_epoch(2)
        keys = list(sampler)
        loader = torch.utils.data.DataLoader(images, batch_sampler=sampler, num_workers=workers,
                                             generator=torch.Generator().manual_seed(rank))
        return [(k, x) for ks, (xs, _) in zip(keys, loader) for k, x in zip(ks, xs)]

    reference = dict(batches(0, 0)) if world == 1 else dict((k, x) for k, x in _one_process(images))
    got = [kx for rank in range(world) for kx in batches(rank, 2 if rank == world - 1 else 0)]
    assert len(got) == len(images)
    for key, x in got:
        assert torch.equal(x, reference[key]), key


def _one_process(images):
    sampler = KeyedBatchSampler(len(images), 4, 1)
    sampler.set_epoch(2)
    return [(k, images[k][0]) for ks in sampler for k in ks]
