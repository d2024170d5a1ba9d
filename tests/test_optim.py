"""Parameter groups (no decay on biases/norms/tokens, layer-wise LR decay, head decay), freezing and schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslbench.core.errors import RecipeError
from sslbench.training.optim import StageSchedule, build_optimizer, frozen_names, lr_at, param_groups

from .conftest import stage_spec


class TinyBackbone(nn.Module):
    """Parameter names laid out like sslbench's Backbone (``vit.*``) with depth 2."""

    depth = 2

    def __init__(self):
        super().__init__()
        vit = nn.Module()
        vit.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        vit.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        vit.patch_embed = nn.Module()
        vit.patch_embed.proj = nn.Linear(4, 4)
        vit.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        vit.norm = nn.LayerNorm(4)
        self.vit = vit

    def layer_id(self, name: str) -> int:
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        return self.depth + 1


class TinyObjective(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = TinyBackbone()
        self.head = nn.Linear(4, 2)


def _stage(**overrides):
    return stage_spec(**{"name": "s", "layer_decay": 0.5, "batch_size": 512,
                         "optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                       "momentum": 0.9, "weight_decay": 0.05, "head_weight_decay": 1e-5,
                                       "scale_lr_by_batch": True},
                         "schedule": {"kind": "cosine", "warmup_epochs": 1.0, "final_lr": 1e-6}, **overrides})


def _group_of(groups, param):
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_groups_follow_the_layer_decay_rule_and_decay_exclusions():
    obj = TinyObjective()
    groups = param_groups(obj, obj.backbone, _stage(), frozen=set())
    vit = obj.backbone.vit
    # block k gets decay^(depth-k); the stem decay^(depth+1); the final norm and heads 1
    assert _group_of(groups, vit.blocks[0].weight)["lr_scale"] == 0.5 ** 2
    assert _group_of(groups, vit.blocks[1].weight)["lr_scale"] == 0.5 ** 1
    assert _group_of(groups, vit.patch_embed.proj.weight)["lr_scale"] == 0.5 ** 3
    assert _group_of(groups, vit.norm.weight)["lr_scale"] == 1.0
    assert _group_of(groups, obj.head.weight)["lr_scale"] == 1.0
    # no weight decay on tokens, biases and norms; heads get head_weight_decay
    for p in (vit.cls_token, vit.pos_embed, vit.blocks[0].bias, vit.norm.weight, obj.head.bias):
        assert _group_of(groups, p)["weight_decay"] == 0.0
    assert _group_of(groups, vit.blocks[0].weight)["weight_decay"] == 0.05
    assert _group_of(groups, obj.head.weight)["weight_decay"] == 1e-5


def test_freeze_patterns():
    obj = TinyObjective()
    names = lambda pats: frozen_names(obj, pats, 2, "stages[0].freeze")  # noqa: E731
    assert names(["backbone"]) == {n for n, _ in obj.named_parameters() if n.startswith("backbone.")}
    assert names(["heads"]) == {"head.weight", "head.bias"}
    assert names(["blocks[:1]"]) == {"backbone.vit.cls_token", "backbone.vit.pos_embed",
                                     "backbone.vit.patch_embed.proj.weight", "backbone.vit.patch_embed.proj.bias",
                                     "backbone.vit.blocks.0.weight", "backbone.vit.blocks.0.bias"}
    assert names(["blocks[:50%]"]) == names(["blocks[:1]"])
    assert names(["stem"]) == {"backbone.vit.cls_token", "backbone.vit.pos_embed",
                               "backbone.vit.patch_embed.proj.weight", "backbone.vit.patch_embed.proj.bias"}
    with pytest.raises(RecipeError, match=r"stages\[0\].freeze\[0\]: 'decoder' matches no parameter"):
        names(["decoder"])
    groups = param_groups(obj, obj.backbone, _stage(), frozen=names(["backbone"]))
    trained = [p for g in groups for p in g["params"]]
    assert len(trained) == 2 and not obj.backbone.vit.blocks[0].weight.requires_grad


def test_schedule_warmup_then_cosine_to_final_with_batch_scaling():
    obj = TinyObjective()
    stage = _stage()
    opt = build_optimizer(param_groups(obj, obj.backbone, stage, set()), stage)
    sched = StageSchedule(opt, stage, total_steps=100, steps_per_epoch=10)
    peak, final = 1e-3 * 2, 1e-6 * 2  # × batch/256 = 2
    assert sched.set(0) == pytest.approx(peak / 10)
    assert sched.set(9) == pytest.approx(peak)
    assert sched.set(55) == pytest.approx(final + 0.5 * (peak - final) * (1 + math.cos(math.pi * 0.5)))
    assert sched.set(99) == pytest.approx(final + 0.5 * (peak - final) * (1 + math.cos(math.pi * 89 / 90)))
    sched.set(9)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(peak * group["lr_scale"])


def test_lr_at_constant_and_linear():
    assert lr_at(50, 100, 0, 1.0, 0.0, "constant") == 1.0
    assert lr_at(50, 100, 0, 1.0, 0.0, "linear") == pytest.approx(0.5)


def test_fused_adamw_is_what_compile_asks_for_and_steps_like_the_eager_one():
    """``fused=True`` (run.compile) builds AdamW's fused kernel; after a few steps it is where the multi-tensor AdamW
    is, up to rounding, group settings included (layer decay scales, no decay on biases)."""
    stage = _stage()
    eager_obj, fused_obj = TinyObjective(), TinyObjective()
    fused_obj.load_state_dict(eager_obj.state_dict())
    eager = build_optimizer(param_groups(eager_obj, eager_obj.backbone, stage, set()), stage)
    fused = build_optimizer(param_groups(fused_obj, fused_obj.backbone, stage, set()), stage, fused=True)
    assert fused.defaults["fused"] is True and not eager.defaults.get("fused")
    initial = [p.detach().clone() for p in eager_obj.parameters()]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        for a, b in zip(eager_obj.parameters(), fused_obj.parameters()):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        for opt in (eager, fused):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * group["lr_scale"]
            opt.step()
    moved = max(float((a - b.detach()).abs().max()) for a, b in zip(initial, eager_obj.parameters()))
    assert moved > 1e-3                                               # the steps did something
    for a, b in zip(eager_obj.parameters(), fused_obj.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
