"""Divergence: a non-finite loss, gradient or weight stops the run at that step, nothing of it is saved, and the
run continues from its last finite checkpoint with changed optimiser settings through an explicit flag that the
run's history records. And the fixed sin-cos position table stays fixed, whatever a stage unfreezes."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch

import sslbench
import sslbench.core.registry
from sslbench.core.backbone import build_backbone
from sslbench.cli import main
from sslbench.core.registry import build_registry
from sslbench.training.resume import load_resume_state
from sslbench.training.trainer import all_finite


def _all_finite_state(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def test_all_finite():
    assert bool(all_finite([torch.ones(3), None, torch.zeros(2, 2)]))
    assert not bool(all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])]))
    assert not bool(all_finite([torch.tensor([float("-inf")])]))
    assert bool(all_finite([torch.full((4,), 1e30)]))          # huge but finite: a 2-norm would overflow here
    assert bool(all_finite([]))


def _diverging_recipe(tiny_recipe, lr: float) -> dict:
    recipe = copy.deepcopy(tiny_recipe)
    recipe["run"].update(name="diverge", checkpoint_every=2)
    recipe["stages"][0].update(steps=30, batch_size=32)
    recipe["stages"][0]["optimizer"]["lr"] = lr
    return recipe


def test_exploding_mae_is_caught_and_nothing_non_finite_is_saved(tiny_recipe, tmp_path, write_recipe, refused):
    """lr = 1e2 on MAE: the loss stays finite while the weights blow up (the old loss-only guard let this through
    and checkpointed non-finite weights). The run stops naming the step and its last finite checkpoint."""
    path = write_recipe(_diverging_recipe(tiny_recipe, 1e2))
    line = refused(["run", path, "--no-progress"], "non-finite", "--allow-optimizer-change")
    run_dir = tmp_path / "runs" / "diverge"
    state = load_resume_state(run_dir / "checkpoints" / "last.pt")
    step = state["meta"]["progress"]["global_step"]
    assert f"last finite checkpoint is {run_dir / 'checkpoints' / 'last.pt'} (global step {step})" in line
    assert _all_finite_state(state["backbone"]) and _all_finite_state(state["objective"])
    assert _all_finite_state(state["trainer"]["optimizer"]["state"][0])
    assert not (run_dir / "metrics.csv").exists()


class ToyLoss(sslbench.Objective):
    """An objective whose loss is a function of its own weight ``w`` only (the backbone joins with weight 0)."""

    initial = 1.0

    def __init__(self, backbone, opts, context):
        super().__init__(backbone, opts, context)
        self.w = torch.nn.Parameter(torch.full((4,), self.initial))

    def views(self, data):
        from sslbench.data.views import Compose, IndependentCrops, Normalize

        return IndependentCrops(1, Compose([Normalize(data.mean, data.std)]))

    def forward(self, views, batch):
        tokens = self.backbone(views[0]).tokens
        return {"loss": self.loss(self.w) + 0 * tokens.sum(), "logs": {}}


class Quadratic(ToyLoss):
    """loss = ½‖w‖²: plain SGD multiplies w by (1 − lr) per step, so lr = 100 overflows in about 20 steps while
    every checkpoint before holds finite weights, and lr = 0.5 shrinks them again."""

    name = "quadratic"

    @staticmethod
    def loss(w):
        return 0.5 * (w * w).sum()


def _with_objective(monkeypatch, name, cls):
    plugin = types.SimpleNamespace()

    @sslbench.hookimpl
    def register_objectives(register):
        register(name, cls)

    plugin.register_objectives = register_objectives
    monkeypatch.setattr(sslbench.core.registry, "_REGISTRY", build_registry(extra_modules={f"{name}_plugin": plugin}))


def test_resume_after_divergence_with_a_lower_lr(tiny_recipe, tmp_path, write_recipe, refused, monkeypatch):
    _with_objective(monkeypatch, "quadratic", Quadratic)
    recipe = copy.deepcopy(tiny_recipe)
    recipe["run"].update(name="diverge", checkpoint_every=4)
    recipe["stages"] = [{"objective": "quadratic", "steps": 30, "batch_size": 32,
                         "optimizer": {"name": "sgd", "lr": 100.0, "momentum": 0.0, "weight_decay": 0.0},
                         "schedule": {"kind": "constant"}}]
    line = refused(["run", write_recipe(recipe), "--no-progress"], "non-finite")
    run_dir = tmp_path / "runs" / "diverge"
    state = load_resume_state(run_dir / "checkpoints" / "last.pt")
    step = state["meta"]["progress"]["global_step"]
    assert 8 <= step < 30 and step % 4 == 0 and f"(global step {step})" in line
    assert torch.isfinite(state["objective"]["w"]).all() and state["objective"]["w"].abs().min() > 1e10

    calm = copy.deepcopy(recipe)
    calm["stages"][0]["optimizer"]["lr"] = 0.5
    calm_path = write_recipe(calm, "calm.toml")
    refused(["run", calm_path, "--resume", "--no-progress"], "stages[0].optimizer.lr", "--allow-optimizer-change")
    assert main(["run", str(calm_path), "--resume", "--allow-optimizer-change", "--no-progress"]) == 0
    meta = json.loads((run_dir / "recipe.json").read_text())
    assert meta["recipe"]["stages"][0]["optimizer"]["lr"] == 0.5
    (change,) = meta["history"]
    assert change["changes"] == [{"key": "stages[0].optimizer.lr", "old": 100.0, "new": 0.5}]
    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in log] == list(range(1, 31))
    assert all(r["lr"] == 0.5 for r in log if r["global_step"] > step)
    final = load_resume_state(run_dir / "checkpoints" / "last.pt")["objective"]["w"]
    torch.testing.assert_close(final, state["objective"]["w"] * 0.5 ** (30 - step))


def test_changing_more_than_the_optimiser_is_still_refused(tiny_recipe, tmp_path, write_recipe, refused):
    recipe = _diverging_recipe(tiny_recipe, 1e-3)
    recipe["stages"][0]["steps"] = 4
    assert main(["run", str(write_recipe(recipe)), "--no-progress"]) == 0
    other = copy.deepcopy(recipe)
    other["stages"][0]["options"]["mask_ratio"] = 0.5
    refused(["run", write_recipe(other, "other.toml"), "--resume", "--allow-optimizer-change", "--no-progress"],
            "stages[0].options.mask_ratio", "--force")


class InfiniteGradient(ToyLoss):
    """A finite loss (0) whose gradient is infinite: d/dw sqrt(w) at w = 0."""

    name = "infinite_gradient"
    initial = 0.0

    @staticmethod
    def loss(w):
        return torch.sqrt(w).sum()


def test_non_finite_gradient_with_finite_loss(tiny_recipe, write_recipe, refused, monkeypatch):
    _with_objective(monkeypatch, "infinite_gradient", InfiniteGradient)
    recipe = copy.deepcopy(tiny_recipe)
    recipe["stages"] = [{"objective": "infinite_gradient", "steps": 3, "batch_size": 32, "optimizer": {"lr": 1e-3}}]
    refused(["run", write_recipe(recipe), "--no-progress"], "the gradients became non-finite", "step 1",
            "no checkpoint was saved")


@pytest.mark.parametrize("freeze_first", [False, True])
def test_fixed_sincos_position_table_stays_fixed(freeze_first, tiny_recipe, tmp_path, write_recipe):
    """MAE, MiCL and refinements of MAE checkpoints keep the 2-D sin-cos table fixed, also in a stage that trains
    the whole backbone after one that froze it (the parameter groups once switched it back to trainable)."""
    recipe = copy.deepcopy(tiny_recipe)
    stage = recipe["stages"][0]
    stage.update(steps=5, batch_size=32)
    stage["optimizer"]["lr"] = 1e-2
    if freeze_first:
        recipe["stages"] = [{**stage, "freeze": ["backbone"]}, {**stage, "freeze": []}]
    assert main(["run", str(write_recipe(recipe)), "--no-progress"]) == 0
    exported = torch.load(tmp_path / "runs" / "tiny" / "checkpoints" / "backbone.pt", weights_only=True)
    kwargs = {k: v for k, v in recipe["backbone"].items() if k != "model"}
    table = build_backbone(recipe["backbone"]["model"], **kwargs).vit.pos_embed
    assert torch.equal(exported["backbone"]["pos_embed"], table.detach())
    assert not torch.equal(exported["backbone"]["blocks.0.attn.qkv.weight"],
                           build_backbone(recipe["backbone"]["model"], **kwargs).vit.blocks[0].attn.qkv.weight)
