"""View pipelines (independent crops, shared crop, multi-crop), the evaluation view and the papers' recipes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslbench.core.rng import KeyedRandom
from sslbench.data.views import (
    CenterCrop, Compose, EvalTransform, HorizontalFlip, IndependentCrops, MultiCrop, Normalize, RandomResizedCrop,
    Resize, SharedCrop, Solarize, conmim_views, mae_views, maect_views, micl_views, mimrefiner_views,
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

def test_same_seed_same_views_and_uint8_equals_float_input():
    u8 = torch.randint(0, 256, (16, 3, 28, 28), dtype=torch.uint8, generator=gen())
    pipeline = mimrefiner_views(32, 16, 2, 3)
    a, b, c = pipeline(u8, gen(7)), pipeline(u8.float() / 255, gen(7)), pipeline(u8, gen(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_keyed_random_gives_each_sample_its_views_whatever_the_batch():
    # The trainer's per-sample streams: a sample's views depend on its index, not on its batch-mates.
    x = images(b=6, c=3, h=28, w=28)
    keys = torch.arange(100, 106)
    pipeline = mimrefiner_views(24, 12, 2, 2)
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


def test_paper_pipelines_shapes_and_structure():
    u8 = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=gen())
    views = mimrefiner_views(32, 16, 2, 4)(u8, gen())
    assert [tuple(v.shape) for v in views] == [(4, 1, 32, 32)] * 2 + [(4, 1, 16, 16)] * 4
    assert [tuple(v.shape) for v in mae_views(28)(u8, gen())] == [(4, 1, 28, 28)]
    assert len(maect_views(28)(u8, gen())) == 2 and len(micl_views(28)(u8, gen())) == 1
    student, teacher = conmim_views(28)(u8, gen())
    assert student.shape == teacher.shape == (4, 1, 28, 28)

    refiner = mimrefiner_views(224, 96, 2, 10)
    assert isinstance(refiner, MultiCrop) and (refiner.num_global, refiner.num_local, refiner.num_views) == (2, 10, 12)
    steps = [{type(t).__name__: t for t in g.transforms} for g in refiner.global_transforms]
    crop = steps[0]["RandomResizedCrop"]
    assert (crop.size, crop.scale, crop.interpolation) == (224, (0.25, 1.0), "bicubic")
    assert [s["GaussianBlur"].p for s in steps] == [1.0, 0.1]
    assert "Solarize" not in steps[0] and steps[1]["Solarize"].p == 0.2
    jitter = steps[0]["ColorJitter"]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue, jitter.p) == (0.4, 0.4, 0.2, 0.1, 0.8)
    local = {type(t).__name__: t for t in refiner.local_transform.transforms}
    assert local["RandomResizedCrop"].scale == (0.05, 0.25) and local["RandomResizedCrop"].size == 96
    assert local["GaussianBlur"].p == 0.5 and local["Grayscale"].p == 0.2
    assert mae_views(224).transforms[0].transforms[0].scale == (0.2, 1.0)
    assert maect_views(224).transforms[0].transforms[0].scale == (0.08, 1.0)


def test_views_are_normalised_with_given_stats():
    x = torch.full((2, 1, 8, 8), 0.75)
    pipeline = IndependentCrops(1, Compose([Resize((8, 8)), Normalize([0.25], [0.5])]))
    assert torch.allclose(pipeline(x, gen())[0], torch.ones(2, 1, 8, 8))
    assert torch.allclose(mae_views(8, mean=[0.25], std=[0.5])(x, gen())[0], torch.ones(2, 1, 8, 8), atol=1e-5)
