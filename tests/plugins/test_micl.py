"""The micl objective: two disjoint patch subsets per image, the loss on their CLS outputs, recipe errors."""

from __future__ import annotations

import pytest
import torch

import sslbench
from sslbench.core.backbone import build_backbone
from sslbench.core.losses import micl_loss
from sslbench.core.masks import DropMask, split_mask_from_noise
from sslbench.core.objective import StageContext
from sslbench.core.options import validate_options
from sslbench.core.rng import KeyedRandom
from sslbench_plugins.micl import MiCL
from sslbench.core.objective import Batch

from .test_registered_objectives import INFO, images


def make(**options) -> MiCL:
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                              num_heads=2, pos_embed="sincos")
    return MiCL(backbone, validate_options(MiCL.options, options, "options"), StageContext(0, 1, 1, 1, 0, 0))


def inputs(objective: MiCL, step: int = 0):
    """Views and batch of one step; the batch's ``rng`` has drawn the views' streams, as in training."""
    index = torch.arange(6)
    rng = KeyedRandom(0, step, index)
    views = objective.views(INFO)(images(6).float() / 255, rng)
    return views, Batch(index=index, rng=rng)


@pytest.mark.parametrize("ratio, per_view", [(0.9, 3), (0.8, 6), (0.5, 16)])
def test_views_are_disjoint_subsets_of_the_papers_size(ratio, per_view):
    noise = KeyedRandom(0, 0, torch.arange(5)).rand(64)
    groups = split_mask_from_noise(noise, ratio, 2).groups                 # (B, 2, K)
    assert groups.shape == (5, 2, per_view)                                # int(64·(1−r)) // 2
    for first, second in groups:
        assert not set(first.tolist()) & set(second.tolist())
        assert set(first.tolist()) | set(second.tolist()) <= set(range(64))


def test_loss_is_micl_loss_of_each_subset_encoded_on_its_own():
    """Independent path: each view through the backbone as a plain token-dropping (MAE-style) forward."""
    objective = make(mask_ratio=0.75)
    views, batch = inputs(objective)
    loss = objective(views, batch)["loss"]
    replay = inputs(objective)[1].rng          # the same streams, drawn in the same order: views, then noise
    groups = split_mask_from_noise(replay.rand(64), 0.75, 2).groups
    with torch.no_grad():
        first = objective.backbone(views[0], mask=DropMask(groups[:, 0])).cls
        second = objective.backbone(views[0], mask=DropMask(groups[:, 1])).cls
    expected = micl_loss(first, second, 0.07, 1 / 64)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)


def test_a_ratio_leaving_no_patch_per_view_is_a_recipe_error():
    with pytest.raises(sslbench.RecipeError, match="options.mask_ratio"):
        make(mask_ratio=0.99)
    with pytest.raises(sslbench.RecipeError, match="options.mask_ratio"):
        make(mask_ratio=1.0)
