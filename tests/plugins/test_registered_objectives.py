"""Every registered objective, with its default options, on a tiny ViT and a tiny BEiT and real digits: one training
step is sane.

Parametrised over the registry, so a new objective plugin (first-party or not) is tested here with no test written
by hand: it declares itself properly, its views are tensors of the data's size, its loss is a finite scalar whose
gradient reaches the backbone, its hooks run, and the same (seed, step, samples) give the same loss.
"""

from __future__ import annotations

import math

import pytest
import torch

from sslbench.core.backbone import build_backbone
from sslbench.core.objective import DataInfo, Objective, StageContext
from sslbench.core.options import validate_options
from sslbench.core.registry import get_registry
from sslbench.core.rng import KeyedRandom
from sslbench.core.teacher import FrozenTeacher
from sslbench.core.objective import Batch

from ..conftest import assert_declared
from .test_mim_refiner import images

REGISTRY = get_registry()
OBJECTIVES = REGISTRY.names("objective")
# 32 px in 4-px patches: 64 patch tokens, enough for every default mask ratio (MiCL keeps 10%: 3 per view).
INFO = DataInfo(image_size=32, channels=1, mean=(0.5,), std=(0.5,), num_samples=64)
# Defaults tied to 224-px images that cannot fit this 8x8 grid, scaled down (an objective refuses them with a
# recipe error rather than bending them): ConMIM's official 75 block-masked patches of 196 → 24 of 64; MimCo's
# 32-px mask units (one unit would cover this 32-px image) → 8 px.
TINY_GRID_OPTIONS = {"conmim": {"mask_patches": 24}, "mimco": {"mask_unit_px": 8}}


def tiny_teacher() -> FrozenTeacher:
    """A frozen teacher for objectives that declare ``needs_teacher``: another width than the student's (48), so a
    head that forgets to map to the teacher's width fails; weights from the torch seed, as the student's."""
    return FrozenTeacher(build_backbone("vit_tiny_patch16_224", img_size=INFO.image_size, patch_size=4, in_chans=1,
                                        embed_dim=48, depth=2, num_heads=2, pos_embed="sincos"), "test")


#: the tiny backbones every objective is run on: a plain ViT, and a BEiT with a shared relative position bias and
#: layer scale (ConMIM's official architecture), whose masked forwards look the bias up at the kept positions
BACKBONES = {
    "vit": ("vit_tiny_patch16_224", {"pos_embed": "sincos"}),
    "beit": ("beit_base_patch16_224", {"model_args": {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False,
                                                      "use_abs_pos_emb": False, "init_values": 0.1}}),
}


def build(name: str, seed: int = 0, backbone: str = "vit") -> Objective:
    factory = REGISTRY.get("objective", name).factory
    torch.manual_seed(seed)
    model, extra = BACKBONES[backbone]
    encoder = build_backbone(model, img_size=INFO.image_size, patch_size=4, in_chans=1, embed_dim=32, depth=4,
                             num_heads=2, **extra)
    options = validate_options(factory.options, TINY_GRID_OPTIONS.get(name, {}), "options")
    extra = {"teacher": tiny_teacher()} if factory.needs_teacher else {}
    return factory(encoder, options, StageContext(0, 4, 4, 1, 0, 0), **extra)


def one_step(objective: Objective, step: int = 0) -> dict:
    index = torch.arange(8)
    rng = KeyedRandom(0, step, index)
    views = [v.to(torch.get_default_dtype()) for v in objective.views(INFO)(images(8).float() / 255, rng)]
    for view in views:
        assert view.ndim == 4 and view.shape[:2] == (8, INFO.channels)
    return objective(views, Batch(index=index, rng=rng))


def test_the_seed_papers_objectives_are_registered():
    assert {"mae", "mim_refiner", "mae_ct", "micl", "conmim", "mimco"} <= set(OBJECTIVES)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_declaration(name):
    factory = assert_declared(REGISTRY, "objective", name, Objective)
    assert set(factory.fixed_options) <= set(factory.options)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("name", OBJECTIVES)
def test_one_step_trains_the_backbone_and_is_reproducible(name, backbone):
    objective = build(name, backbone=backbone)
    objective.train()
    out = one_step(objective)
    loss = out["loss"]
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert isinstance(out["logs"], dict)
    loss.backward()
    grads = {n: p.grad for n, p in objective.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(n.startswith("backbone.") and g.abs().sum() > 0 for n, g in grads.items()), \
        "no gradient reaches the backbone"
    objective.after_step(0)
    again = build(name, backbone=backbone)
    again.train()
    assert one_step(again)["loss"].item() == loss.item()
