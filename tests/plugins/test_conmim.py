"""The conmim objective: the loss against a by-hand pipeline, the EMA teacher (buffers, momentum, train mode),
the official mask modes drawn per sample, gradients, recipe errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sslbench
from sslbench.core.backbone import build_backbone
from sslbench.core.modules import cosine_momentum
from sslbench.core.objective import StageContext
from sslbench.core.options import validate_options
from sslbench.core.rng import KeyedRandom
from sslbench_plugins.conmim import ConMIM
from sslbench.core.objective import Batch

from .test_registered_objectives import INFO, images
from torch import nn
from ..conftest import layer_types, linears
from sslbench_plugins.conmim import conmim_projector

# 32 px in 4-px patches: an 8x8 grid; 24 of 64 patches is the official block count's fraction (75 of 196)
SMALL = {"proj_hidden": 32, "proj_out": 16, "mask_patches": 24}
UNITS = {"mask_mode": "random_units", "mask_unit_px": 8}      # 2x2-patch units, a 4x4 unit grid


def make(total_steps: int = 10, **options) -> ConMIM:
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                              num_heads=2, pos_embed="sincos")
    opts = validate_options(ConMIM.options, {**SMALL, **options}, "options")
    return ConMIM(backbone, opts, StageContext(0, total_steps, total_steps, 1, 0, 0))


def inputs(objective: ConMIM, step: int = 0):
    index = torch.arange(6)
    rng = KeyedRandom(0, step, index)
    views = objective.views(INFO)(images(6).float() / 255, rng)
    return views, Batch(index=index, rng=rng)


@pytest.mark.parametrize("options", [{}, UNITS], ids=["block", "random_units"])
def test_loss_equals_the_pipeline_written_by_hand(options):
    objective = make(**options)
    views, batch = inputs(objective)
    loss = objective(views, batch)["loss"]
    replay = inputs(objective)[1]                     # the same streams, drawn in the same order
    masked = objective.mask(replay)
    backbone, teacher = objective.backbone, objective.teacher.module
    with torch.no_grad():
        x = backbone.embed(views[0]).clone()
        x[masked] = objective.mask_token.reshape(-1)                   # replace, then add positions
        s_tokens = backbone.forward_tokens(backbone.add_pos_embed(x)).tokens
        s = objective.projector(s_tokens.reshape(-1, 32)).view(6, 65, -1)[:, 1:]
        t_tokens = teacher["backbone"](views[1]).tokens
        t = teacher["projector"](t_tokens.reshape(-1, 32)).view(6, 65, -1)[:, 1:]
    s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    terms = [-torch.log_softmax(s[b, i] @ t[b].T / 0.1, dim=0)[i] for b in range(6) for i in range(64)
             if masked[b, i]]
    torch.testing.assert_close(loss.detach(), torch.stack(terms).mean(), rtol=1e-4, atol=1e-5)


def test_block_masks_by_default_at_most_the_count_and_reproducible():
    objective = make()
    first = objective.mask(inputs(objective)[1])
    assert first.shape == (6, 64) and (first.sum(1) <= 24).all() and (first.sum(1) >= 16).all()
    assert torch.equal(first, objective.mask(inputs(objective)[1]))
    assert not torch.equal(first, objective.mask(inputs(objective, step=1)[1]))


def test_random_units_mask_whole_units_exactly():
    objective = make(**UNITS, mask_ratio=0.75)
    masked = objective.mask(inputs(objective)[1])
    assert (masked.sum(1) == 48).all()                                 # ceil(0.75 · 16) = 12 units of 4 patches
    per_unit = masked.view(6, 4, 2, 4, 2).sum(dim=(2, 4))
    assert ((per_unit == 0) | (per_unit == 4)).all()


@pytest.mark.parametrize("options", [{}, UNITS], ids=["block", "random_units"])
def test_masks_are_the_same_for_1_or_2_processes_and_any_accumulation(options):
    """A batch of 8, as 2 processes of 4 and as 4 micro-batches of 2: each sample gets the same mask, because
    each is drawn from that sample's own keyed stream after the views (as in a training step)."""
    objective = make(**options)

    def masks(index: torch.Tensor) -> torch.Tensor:
        rng = KeyedRandom(0, 5, index)
        objective.views(INFO)(images(len(index)).float() / 255, rng)
        return objective.mask(Batch(index=index, rng=rng))

    index = torch.arange(20, 28)
    whole = masks(index)
    assert torch.equal(whole, torch.cat([masks(part) for part in index.chunk(2)]))
    assert torch.equal(whole, torch.cat([masks(part) for part in index.chunk(4)]))
    assert len({tuple(row.tolist()) for row in whole}) == 8


def test_mask_options_that_do_not_fit_the_grid_are_recipe_errors():
    with pytest.raises(sslbench.RecipeError, match=r"options.mask_patches: 64 masks every patch of the 8x8 patch "
                                                   r"grid; expected fewer than 64"):
        make(mask_patches=64)
    with pytest.raises(sslbench.RecipeError, match=r"options.mask_unit_px: a mask unit of 12 px is 3 patches of "
                                                   r"4 px a side, which does not tile the 8x8 patch grid"):
        make(**{**UNITS, "mask_unit_px": 12})
    make(mask_unit_px=12)                              # block mode does not use the unit
    with pytest.raises(sslbench.RecipeError, match="options.mask_mode"):
        validate_options(ConMIM.options, {"mask_mode": "random_mps32"}, "options")


def test_a_following_stage_may_switch_the_mask_mode():
    objective = make()
    opts = validate_options(ConMIM.options, {**SMALL, **UNITS}, "options")
    objective.start_stage(opts, StageContext(1, 10, 10, 1, 0, 0))
    masked = objective.mask(inputs(objective)[1])
    assert (masked.view(6, 4, 2, 4, 2).sum(dim=(2, 4)) % 4 == 0).all()


def test_teacher_is_an_ema_of_backbone_and_projector_kept_in_train_mode():
    objective = make(total_steps=10)
    assert not any(n.startswith("teacher.") for n, _ in objective.named_parameters())
    teacher = dict(objective.teacher.module.named_buffers())
    student = dict(objective.student().named_parameters())
    assert all(torch.equal(teacher[n], p) for n, p in student.items())
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.5)
    views, batch = inputs(objective)
    objective(views, batch)["loss"].backward()
    assert objective.mask_token.grad.abs().sum() > 0                    # the mask token learns
    before = {n: b.clone() for n, b in teacher.items()}
    optimizer.step()
    objective.after_step(3)
    m = cosine_momentum(3, 10, 0.996)
    for name, param in objective.student().named_parameters():
        torch.testing.assert_close(teacher[name], m * before[name] + (1 - m) * param.detach())
    running = "projector.1.running_mean"                               # the teacher's own BN statistics:
    assert torch.equal(teacher[running], before[running])              # the update does not copy the student's
    assert not torch.equal(teacher[running], dict(objective.student().named_buffers())[running])
    objective.eval()
    assert objective.teacher.training and not objective.projector.training


def test_a_ratio_that_masks_nothing_or_everything_is_a_recipe_error():
    for ratio in (0.0, 1.0):
        with pytest.raises(sslbench.RecipeError, match="options.mask_ratio"):
            make(**UNITS, mask_ratio=ratio)
    with pytest.raises(sslbench.RecipeError, match="options.mask_ratio: 0.95 masks 16 of the 16 units"):
        make(**UNITS, mask_ratio=0.95)                                  # rounded up: ceil(15.2) = 16


def test_conmim_projector_structure():
    projector = conmim_projector(8, 16, 4)
    bn, relu = nn.BatchNorm1d, nn.ReLU
    assert layer_types(projector) == [nn.Linear, bn, relu, nn.Linear, bn, relu, nn.Linear, bn]
    assert all(lin.bias is None for lin in linears(projector))
    norms = [layer for layer in projector if isinstance(layer, bn)]
    assert [n.affine for n in norms] == [True, True, False]
    assert projector(torch.randn(5, 8)).shape == (5, 4)
