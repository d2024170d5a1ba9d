"""The mae_ct objective: head modules and pooling, the EMA target projector, gradients in head preparation and
tuning, the queue across stages and checkpoints, two gloo processes against one, and a two-stage recipe run."""

from __future__ import annotations

import copy

import warnings

import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import sslbench
from sslbench.cli import main
from sslbench.core.diagnostics import normalized_std
from sslbench.core.losses import symmetric_nnclr_loss
from sslbench.core.objective import Batch
from sslbench.core.objective import StageContext
from sslbench.training.optim import frozen_names, param_groups
from sslbench.core.options import validate_options
from sslbench_plugins.mae_ct import MAECT
from sslbench.training.resume import load_resume_state

from .test_mim_refiner import images, step_inputs, tiny_backbone
from torch import nn
from ..conftest import layer_types, linears, stage_spec
from sslbench_plugins.mae_ct import maect_predictor, maect_projector

SMALL = {"proj_hidden": 32, "proj_out": 8, "pred_hidden": 16, "queue_size": 16}


def make(seed: int = 0, depth: int = 2, **options) -> MAECT:
    torch.manual_seed(seed)
    opts = validate_options(MAECT.options, {**SMALL, **options}, "options")
    return MAECT(tiny_backbone(depth), opts, StageContext(0, 1, 1, 1, 0, 0))


def stage(freeze: list[str], layer_decay: float = 1.0):
    return stage_spec(freeze=freeze, layer_decay=layer_decay, optimizer={"weight_decay": 0.05})


def train_step(objective, stage_cfg, step: int = 0, lr: float = 0.1):
    frozen = frozen_names(objective, stage_cfg.freeze, objective.backbone.depth, "freeze")
    groups = param_groups(objective, objective.backbone, stage_cfg, frozen)
    optimizer = torch.optim.SGD(groups, lr=lr)
    views, batch = step_inputs(objective, images(8, seed=step), torch.arange(8) + 8 * step, step)
    out = objective(views, batch)
    out["loss"].backward()
    grads = {n: p.grad for n, p in objective.named_parameters()}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    objective.after_step(step)
    return out, grads, groups


# --------------------------------------------------------------------------------------------- modules, loss

def test_target_projector_is_a_buffer_copy_of_the_projector():
    objective = make()
    assert not any(n.startswith("target_projector") for n, _ in objective.named_parameters())
    target = dict(objective.target_projector.module.named_buffers())
    for name, param in objective.projector.named_parameters():
        assert torch.equal(target[name], param)
    assert {n for n, _ in objective.named_parameters() if not n.startswith("backbone.")} == {
        f"projector.{n}" for n, _ in objective.projector.named_parameters()} | {
        f"predictor.{n}" for n, _ in objective.predictor.named_parameters()}


@pytest.mark.parametrize("pooling", ["cls", "mean_patch"])
def test_pooling_and_symmetric_nnclr_loss_with_an_empty_queue(pooling):
    objective = make(pooling=pooling, target_momentum=0.0)
    views, batch = step_inputs(objective, images(8), torch.arange(8), 0)
    tokens = objective.backbone(torch.cat(views)).tokens
    features = (tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(1)).chunk(2)
    z = [objective.projector(f) for f in features]                  # per view: its own BN statistics
    p = [objective.predictor(x) for x in z]
    # An empty queue returns the (normalised) query itself: plain NNCLR between the two views.
    want = symmetric_nnclr_loss(F.normalize(z[0]), F.normalize(z[1]), p[0], p[1], 0.15)
    out = objective(views, batch)
    assert torch.allclose(out["loss"], want, atol=1e-5)
    # the collapse measures of the encoder features and the projections, both views stacked; no labels, no nn_acc
    assert set(out["logs"]) == {"std_features", "std_projected"}
    assert out["logs"]["std_projected"] == normalized_std(torch.cat(z))
    assert out["logs"]["std_features"] == normalized_std(torch.cat(features))
    queue = objective.queue
    assert int(queue.filled) == 8 and torch.equal(queue.ids[:8], torch.arange(8))
    assert torch.allclose(queue.values[:8], F.normalize(z[0].detach()), atol=1e-5)   # L2-normalised view 0


def test_neighbour_label_agreement_counts_both_views():
    """Step 1 enqueues 8 samples of class 1; step 2's labels make half of the samples class 1, so each view's
    neighbour (always class 1) agrees for half of the rows."""
    objective = make(target_momentum=0.0)
    views, batch = step_inputs(objective, images(8), torch.arange(8), 0)
    objective(views, Batch(index=batch.index, rng=batch.rng, labels=torch.ones(8, dtype=torch.long)))
    assert objective.queue.labels[:8].tolist() == [1] * 8
    views, batch = step_inputs(objective, images(8), torch.arange(8, 16), 1)
    labels = torch.tensor([1, 0] * 4)
    out = objective(views, Batch(index=batch.index, rng=batch.rng, labels=labels))
    assert out["logs"]["nn_acc"].item() == 0.5
    assert objective.queue.labels[8:16].tolist() == labels.tolist()


# ------------------------------------------------------------------------------------------------- stages

def test_head_preparation_trains_the_head_and_the_target_follows_it():
    objective = make(target_momentum=0.0)
    out, grads, _ = train_step(objective, stage(["backbone"]))
    assert torch.isfinite(out["loss"])
    assert all(g is None for n, g in grads.items() if n.startswith("backbone."))
    assert all(g is not None for n, g in grads.items() if n.startswith(("projector.", "predictor.")))
    target = dict(objective.target_projector.module.named_buffers())
    assert all(torch.equal(target[n], p) for n, p in objective.projector.named_parameters())


def test_tuning_freezes_the_first_half_and_the_stem_with_layer_decay_and_ema_target():
    objective = make(depth=4, target_momentum=0.9)
    before = {n: b.clone() for n, b in objective.target_projector.module.named_buffers()}
    _, grads, groups = train_step(objective, stage(["blocks[:50%]"], layer_decay=0.65))
    trained = {n for n, g in grads.items() if g is not None}
    backbone = {n for n in trained if n.startswith("backbone.")}
    assert backbone and all(n.startswith(("backbone.vit.blocks.2.", "backbone.vit.blocks.3.", "backbone.vit.norm."))
                            for n in backbone)
    assert not any(n.startswith("backbone.vit." + s) for n in trained for s in ("patch_embed", "cls_token"))
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx([0.65 ** 2, 0.65, 1.0])  # blocks 2, 3; norm+heads
    target = dict(objective.target_projector.module.named_buffers())
    for name, param in objective.projector.named_parameters():     # θ_t ← 0.9 θ_t + 0.1 θ
        assert torch.allclose(target[name], 0.9 * before[name] + 0.1 * param, atol=1e-6), name


def test_queue_and_target_carry_over_stages_and_round_trip_state_dict():
    objective = make(target_momentum=0.0, topk=1)
    for step in range(3):
        train_step(objective, stage(["backbone"]), step)
    assert int(objective.queue.filled) == 16 and int(objective.queue.ptr) == 8
    kept = {k: v.clone() for k, v in objective.state_dict().items() if k.startswith(("queue.", "target_projector."))}
    assert {k.split(".")[0] for k in kept} == {"queue", "target_projector"}
    objective.start_stage({**objective.opts, "target_momentum": 0.99, "topk": 2}, StageContext(1, 1, 1, 1, 0, 0))
    assert all(torch.equal(objective.state_dict()[k], v) for k, v in kept.items())
    with pytest.raises(sslbench.RecipeError, match="proj_out"):
        objective.start_stage({**objective.opts, "proj_out": 4}, StageContext(1, 1, 1, 1, 0, 0))
    restored = make(seed=4, target_momentum=0.99, topk=2)
    restored.load_state_dict(objective.state_dict())
    losses = [m.eval()(*step_inputs(m, images(8, seed=5), torch.arange(8), 3))["loss"] for m in (objective, restored)]
    assert torch.equal(*losses)


# ------------------------------------------------------------------------------------ 2 processes = 1 process

WORLD, GLOBAL_BATCH = 2, 8


def _one_step(objective, model, rank: int, world: int) -> dict:
    """One tuning step (EMA target, keyed top-3 pick from a pre-filled queue) on this process's slice."""
    generator = torch.Generator().manual_seed(3)
    objective.queue.enqueue(torch.randn(12, objective.queue.dim, generator=generator), torch.arange(12) * 2)
    optimizer = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    local = GLOBAL_BATCH // world
    mine = slice(rank * local, (rank + 1) * local)
    index = torch.arange(GLOBAL_BATCH) * 7 % 23
    views, batch = step_inputs(objective, images(GLOBAL_BATCH)[mine], index[mine], 0)
    loss = model(views, batch)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    optimizer.step()
    objective.after_step(0)
    loss = loss.detach()
    if world > 1:
        dist.all_reduce(loss)
    return {"loss": loss.item() / world, "grads": grads,
            "state": {k: v.clone() for k, v in objective.state_dict().items()}}


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    # The synchronised BatchNorm once read its row count from a tensor that requires grad, warning every step.
    warnings.filterwarnings("error", message="Converting a tensor with requires_grad")
    try:
        torch.set_num_threads(1)
        objective = make(topk=3, target_momentum=0.9)
        model = DistributedDataParallel(objective, find_unused_parameters=False)
        result = _one_step(objective, model, rank, WORLD)
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    out_file = str(tmp_path / "two.pt")
    try:
        mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), out_file), nprocs=WORLD, join=True)
    except mp.ProcessRaisedException as error:
        pytest.fail(str(error))
    objective = make(topk=3, target_momentum=0.9)
    want = _one_step(objective, objective, 0, 1)
    got = torch.load(out_file)
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert int(want["state"]["queue.filled"]) == 16 and int(want["state"]["queue.ptr"]) == 4
    for key, value in want["state"].items():                  # queue, target projector, BN statistics, weights
        assert torch.allclose(got["state"][key].float(), value.float(), atol=1e-5), key
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        assert (got["grads"][name] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-5, name


# ------------------------------------------------------------------------------------------------ end to end

def test_two_stage_recipe_runs_and_carries_the_queue(tmp_path, tiny_recipe, write_recipe):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["run"]["name"] = "maect"
    head = {**SMALL, "queue_size": 64}
    recipe["stages"] = [
        {"name": "prepare", "objective": "mae_ct", "steps": 2, "batch_size": 16, "freeze": ["backbone"],
         "optimizer": {"lr": 1e-3, "betas": [0.9, 0.95]}, "options": {**head, "target_momentum": 0.0}},
        {"name": "tune", "steps": 2, "freeze": ["blocks[:50%]"], "layer_decay": 0.65,
         "options": {**head, "target_momentum": 0.99, "topk": 2}},
    ]
    assert main(["run", str(write_recipe(recipe)), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "maect"
    state = load_resume_state(run_dir / "checkpoints" / "last.pt")
    assert state["meta"]["objective_name"] == "mae_ct" and state["meta"]["progress"]["finished"]
    assert int(state["objective"]["queue.filled"]) == 4 * 16            # both stages' view-0 projections
    assert "target_projector.module.0.weight" in state["objective"]
    assert "knn" in (run_dir / "metrics.csv").read_text()


def test_maect_heads_structure():
    bn, relu = nn.BatchNorm1d, nn.ReLU
    assert layer_types(maect_projector(8, 16, 4)) == [nn.Linear, bn, relu, nn.Linear, bn, relu, nn.Linear, bn]
    predictor = maect_predictor(4, 12)
    assert layer_types(predictor) == [nn.Linear, bn, relu, nn.Linear]
    # No BN after the last Linear, so it keeps its bias (initialised to zero).
    assert predictor[-1].bias is not None and torch.all(predictor[-1].bias == 0)
