"""Each paper's view pipeline, as its plugin declares it: shapes, and the augmentation settings the paper states."""

from __future__ import annotations

import torch

from sslbench.data.views import MultiCrop
from sslbench_plugins.conmim import conmim_views
from sslbench_plugins.mae import mae_views
from sslbench_plugins.mae_ct import maect_views
from sslbench_plugins.micl import micl_views
from sslbench_plugins.mim_refiner import mimrefiner_views

from ..test_views import gen


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


def test_mae_views_are_normalised_with_given_stats():
    x = torch.full((2, 1, 8, 8), 0.75)
    assert torch.allclose(mae_views(8, mean=[0.25], std=[0.5])(x, gen())[0], torch.ones(2, 1, 8, 8), atol=1e-5)
