"""The mimco objective: per-sample keyed masks, the loss against a by-hand pipeline, the frozen teacher inside an
objective (no gradient, eval mode, outside parameters and state), the heads' widths, option and recipe errors."""

from __future__ import annotations

import pytest
import torch

import sslbench
from sslbench.core.backbone import build_backbone
from sslbench.core.losses import mimco_image_loss, mimco_patch_loss
from sslbench.core.masks import ReplaceMask
from sslbench.core.objective import Batch, StageContext
from sslbench.core.options import validate_options
from sslbench.core.rng import KeyedRandom
from sslbench.core.teacher import FrozenTeacher
from sslbench_plugins.mimco import MimCo

from .test_registered_objectives import INFO, images


def make(teacher_patch: int = 4, teacher_dim: int = 48, **options) -> MimCo:
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                              num_heads=2, pos_embed="sincos")
    teacher = FrozenTeacher(build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=teacher_patch,
                                           in_chans=1, embed_dim=teacher_dim, depth=2, num_heads=2))
    opts = validate_options(MimCo.options, {"mask_unit_px": 8, **options}, "options")
    return MimCo(backbone, opts, StageContext(0, 4, 4, 1, 0, 0), teacher=teacher)


def inputs(objective: MimCo, index=None, step: int = 0):
    index = torch.arange(6) if index is None else index
    rng = KeyedRandom(0, step, index)
    views = objective.views(INFO)(images(len(index)).float() / 255, rng)
    return views, Batch(index=index, rng=rng)


@pytest.mark.parametrize("mode", ["random_units", "block"])
def test_masks_are_conmims_per_sample_and_keyed(mode):
    """A sample's mask depends only on (seed, step, its index): the same in any batch it is part of."""
    objective = make(mask_mode=mode, mask_min_block=4)

    def masks(index, step=5):
        return objective.mask(Batch(index=index, rng=KeyedRandom(3, step, index)))

    whole = masks(torch.arange(6))
    assert whole.shape == (6, 64)
    assert torch.equal(masks(torch.tensor([4, 1])), whole[[4, 1]])
    assert not torch.equal(whole[0], whole[1]) and not torch.equal(masks(torch.arange(6), step=6), whole)
    if mode == "random_units":      # 8 px = 2x2-patch units: ceil(0.75 · 16) = 12 whole units, 48 patches
        assert (whole.sum(1) == 48).all()
        units = whole.reshape(6, 4, 2, 4, 2).sum((2, 4))
        assert ((units == 4) | (units == 0)).all()
    else:                           # BEiT blocks: at most round(0.75 · 64) = 48 patches, rectangles of >= 4
        assert (whole.sum(1) <= 48).all() and (whole.sum(1) >= 4).all()


def test_loss_equals_a_by_hand_pipeline():
    objective = make()
    views, batch = inputs(objective)
    out = objective(views, batch)
    (view,) = views
    _, fresh = inputs(objective)                                # the streams as the views leave them
    masked = objective.mask(fresh)
    tokens = objective.backbone(view, mask=ReplaceMask(masked, objective.mask_token)).tokens
    target = objective.teacher.network(view).tokens
    patch = mimco_patch_loss(objective.patch_head(tokens[:, 1:]), target[:, 1:], masked, 0.2)
    image = mimco_image_loss(objective.cls_head(tokens[:, 0]), target[:, 0], 0.2)
    torch.testing.assert_close(out["loss"], patch + image)
    assert out["logs"]["patch_loss"].item() == pytest.approx(patch.item())
    weighted = make(patch_weight=0.5, image_weight=2.0)(*inputs(make()))
    torch.testing.assert_close(weighted["loss"], 0.5 * patch + 2.0 * image)
    only_image = make(patch_weight=0.0)(*inputs(make()))
    assert "patch_loss" not in only_image["logs"]
    torch.testing.assert_close(only_image["loss"], image)


def test_teacher_is_frozen_outside_parameters_and_state_and_stays_in_eval_mode():
    objective = make(patch_negatives="image")
    teacher = objective.teacher
    assert objective.patch_head[-1].out_features == objective.cls_head[-1].out_features == 48
    assert not any(name.startswith("teacher") for name, _ in objective.named_parameters())
    assert not any(key.startswith("teacher") for key in objective.state_dict())
    assert all(not p.requires_grad for p in teacher.network.parameters())
    before = {k: v.clone() for k, v in teacher.network.state_dict().items()}
    objective.train()
    assert objective.training and not teacher.training and not teacher.network.training
    assert not any(m.training for m in teacher.network.modules())
    optimizer = torch.optim.AdamW(objective.parameters(), lr=0.1)
    for step in range(2):
        out = objective(*inputs(objective, step=step))
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in teacher.network.parameters())
    after = teacher.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    objective.to(torch.float64)                                 # the hidden network follows the objective
    assert teacher.network.vit.patch_embed.proj.weight.dtype == torch.float64


def test_bad_teacher_and_options_are_refused_naming_the_key():
    with pytest.raises(sslbench.RecipeError, match=r"stages\[0\]\.teacher\.patch_size"):
        make(teacher_patch=8)
    with pytest.raises(sslbench.RecipeError, match=r"stages\[0\]\.options\.mask_ratio"):
        make(mask_ratio=1.0)
    with pytest.raises(sslbench.RecipeError, match=r"stages\[0\]\.options\.mask_unit_px: .*does not tile"):
        make(mask_unit_px=12)
    with pytest.raises(sslbench.RecipeError, match=r"stages\[0\]\.options\.mask_min_block"):
        make(mask_mode="block", mask_ratio=0.1, mask_min_block=16)
    with pytest.raises(sslbench.RecipeError, match=r"stages\[0\]\.options\.image_weight"):
        make(patch_weight=0.0, image_weight=0.0)
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=1,
                              num_heads=2)
    opts = validate_options(MimCo.options, {}, "options")
    with pytest.raises(sslbench.RecipeError, match=r"stages\[2\]\.teacher: .*none was given"):
        MimCo(backbone, opts, StageContext(2, 4, 4, 1, 0, 0))
