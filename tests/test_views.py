"""View pipelines (independent crops, shared crop, multi-crop), the evaluation view and the papers' recipes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslbench.core.rng import KeyedRandom
from sslbench.data.views import (
    CenterCrop, Compose, EvalTransform, HorizontalFlip, IndependentCrops, MultiCrop, Normalize, RandomResizedCrop,
    Resize, SharedCrop, Solarize, crop_flip, strong_photometric,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 8, c: int = 3, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=gen(seed))


def test_resize_center_crop_and_eval_transform():
    x = images(b=2, c=3, h=20, w=30)
    assert Resize(10)(x).shape[-2:] == (10, 15)  # shorter side, aspect kept
    assert torch.equal(CenterCrop(4)(x), x[..., 8:12, 13:17])
    u8 = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=gen())
    ev = EvalTransform(28)
    assert torch.allclose(ev(u8), (u8.float() / 255 - 0.5) / 0.5)  # same size: only normalisation
    resized = F.interpolate(u8.float() / 255, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(EvalTransform(16)(u8), (resized.clamp(0, 1) - 0.5) / 0.5, atol=1e-6)
    assert EvalTransform(24, crop_fraction=0.875)(u8).shape == (2, 1, 24, 24)
    assert torch.equal(ev(u8), ev(u8))


# -------------------------------------------------------------------------------------------------- pipelines

def multi_crop(global_size: int, local_size: int, global_n: int, local_n: int) -> MultiCrop:
    """A DINO-style multi-crop pipeline with every kind of random transform, built from the public blocks."""
    global_views = Compose([*crop_flip(global_size, (0.25, 1.0)), *strong_photometric(1.0, 0.2), Normalize()])
    local = Compose([*crop_flip(local_size, (0.05, 0.25)), *strong_photometric(0.5, 0.0), Normalize()])
    return MultiCrop(global_n, global_views, local_n, local)


def test_same_seed_same_views_and_uint8_equals_float_input():
    u8 = torch.randint(0, 256, (16, 3, 28, 28), dtype=torch.uint8, generator=gen())
    pipeline = multi_crop(32, 16, 2, 3)
    a, b, c = pipeline(u8, gen(7)), pipeline(u8.float() / 255, gen(7)), pipeline(u8, gen(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_keyed_random_gives_each_sample_its_views_whatever_the_batch():
    # The trainer's per-sample streams: a sample's views depend on its index, not on its batch-mates.
    x = images(b=6, c=3, h=28, w=28)
    keys = torch.arange(100, 106)
    pipeline = multi_crop(24, 12, 2, 2)
    full = pipeline(x, KeyedRandom(0, 3, keys))
    half = pipeline(x[3:], KeyedRandom(0, 3, keys[3:]))
    assert all(torch.allclose(f[3:], h, atol=1e-6) for f, h in zip(full, half))


def test_shared_crop_shares_geometry():
    x = images(b=5, c=3, h=24, w=24)
    crop = Compose([RandomResizedCrop(16, (0.1, 0.5)), HorizontalFlip(0.5)])
    same = SharedCrop(crop, [Compose([]), Compose([])])(x, gen(1))
    assert torch.equal(same[0], same[1])
    plain, solarised = SharedCrop(crop, [Compose([]), Solarize(p=1.0)])(x, gen(1))
    assert torch.equal(solarised, torch.where(plain >= 0.5, 1 - plain, plain))
    independent = IndependentCrops(2, crop)(x, gen(1))
    assert not torch.equal(independent[0], independent[1])




def test_views_are_normalised_with_given_stats():
    x = torch.full((2, 1, 8, 8), 0.75)
    pipeline = IndependentCrops(1, Compose([Resize((8, 8)), Normalize([0.25], [0.5])]))
    assert torch.allclose(pipeline(x, gen())[0], torch.ones(2, 1, 8, 8))
