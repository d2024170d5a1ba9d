"""The mim_refiner objective: view pairing, head placement, gradients per stage, the queue across stages and
checkpoints, two gloo processes against one, and a two-stage recipe through `sslbench run`."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import sslbench
from sslbench.core.backbone import build_backbone
from sslbench.cli import main
from sslbench.core.objective import DataInfo, StageContext
from sslbench.training.optim import frozen_names, param_groups
from sslbench.core.options import validate_options
from sslbench.core.rng import KeyedRandom
from sslbench_plugins.mim_refiner import (MIMRefiner, proportional_blocks,
                                          view_pairs)
from sslbench.training.resume import load_resume_state
from sslbench.core.objective import Batch
from torch import nn
from ..conftest import layer_types, linears, stage_spec
from sslbench_plugins.mim_refiner import mimrefiner_predictor, mimrefiner_projector

SMALL = {"proj_hidden": 32, "proj_out": 8, "pred_hidden": 16, "queue_size": 12, "local_views": 2}
INFO = DataInfo(image_size=16, channels=1, mean=(0.5,), std=(0.5,), num_samples=64)


def tiny_backbone(depth: int = 2):
    return build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=depth,
                          num_heads=2, pos_embed="sincos")


def make(seed: int = 0, depth: int = 2, **options) -> MIMRefiner:
    torch.manual_seed(seed)
    opts = validate_options(MIMRefiner.options, {**SMALL, **options}, "options")
    return MIMRefiner(tiny_backbone(depth), opts, StageContext(0, 1, 1, 1, 0, 0))


@functools.lru_cache
def _digits() -> torch.Tensor:
    from sslbench.data.sources import load_digits

    return load_digits("train", size=16, limit=64).images


def images(n: int = 8, seed: int = 1) -> torch.Tensor:
    """``n`` distinct real images (digits, 16 px): random noise would make every queue entry a near-tie."""
    return _digits()[8 * seed:8 * seed + n]


def step_inputs(objective, imgs, index, step):
    rng = KeyedRandom(0, step, index)
    views = objective.views(INFO)(imgs.float() / 255, rng)
    return [v.to(torch.get_default_dtype()) for v in views], Batch(index=index, rng=rng)


def stage(freeze: list[str], layer_decay: float = 1.0):
    """A stage with the keys that freezing and parameter groups read."""
    return stage_spec(freeze=freeze, layer_decay=layer_decay, optimizer={"weight_decay": 0.05})


# ------------------------------------------------------------------------------------------- pairing, placement

@pytest.mark.parametrize("g, l", [(2, 10), (2, 0), (3, 4), (1, 3)])
def test_intended_pairing_is_every_global_with_every_other_view(g, l):
    pairs = view_pairs(g, l)
    assert len(pairs) == g * (g - 1) + g * l == len(set(pairs))
    assert all(i < g and j != i and j < g + l for i, j in pairs)
    assert {j for _, j in pairs} == set(range(g + l)) - ({0} if g == 1 else set())


def test_official_pairing_indexes_locals_from_view_zero():
    pairs = view_pairs(2, 10, "official")
    assert len(pairs) == 22                                   # same count …
    local_terms = pairs[2:]
    assert [j for i, j in local_terms if i == 0] == list(range(10))   # … but global0, global1, local0..7
    assert (0, 0) in pairs and (1, 1) in pairs                # a global view paired with itself
    assert not {10, 11} & {j for _, j in pairs}               # local8 and local9 never used
    with pytest.raises(ValueError, match="pairing"):
        view_pairs(2, 2, "nope")


def test_proportional_and_explicit_head_placement():
    assert proportional_blocks(24, 16 / 24, 22 / 24) == list(range(16, 23))   # ViT-L/16 of the paper
    assert proportional_blocks(12, 16 / 24, 22 / 24) == [8, 9, 10, 11]
    assert proportional_blocks(2, 16 / 24, 22 / 24) == [1]
    assert list(make(depth=4).heads) == ["out", "block3"]
    assert list(make(depth=4, head_blocks=[-1, 1, 1]).heads) == ["out", "block1", "block3"]
    assert list(make(depth=4, head_blocks=[2], output_head=False).heads) == ["block2"]
    with pytest.raises(sslbench.RecipeError, match="head_blocks"):
        make(head_blocks=[5])
    with pytest.raises(sslbench.RecipeError, match="head_weights"):
        make(head_weights=[1.0])


def test_heads_see_the_raw_cls_of_their_block_and_the_normed_output():
    objective = make(depth=3, head_blocks=[0, 1]).eval()
    views, _ = step_inputs(objective, images(4), torch.arange(4), 0)
    inputs = objective.head_inputs(views)
    out = objective.backbone(torch.cat(views[:2]), blocks=[0, 1], out="both")
    assert torch.allclose(inputs["out"][:8], out.tokens[:, 0], atol=1e-6)
    assert torch.allclose(inputs["block0"][:8], out.raw[0][:, 0], atol=1e-6)
    assert not torch.allclose(inputs["block1"][:8], out.normed[1][:, 0], atol=1e-3)
    assert inputs["out"].shape == (4 * 4, 32)                 # all 2 global + 2 local views, view-major


def test_local_views_use_the_position_embedding_resized_to_their_grid():
    backbone = tiny_backbone()
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(backbone.patch_tokens(x), backbone.add_pos_embed(backbone.embed(x)))
    small = backbone.patch_tokens(torch.zeros(2, 1, 8, 8))        # conv of zeros = bias
    assert small.shape == (2, 4, 32)
    bias = backbone.vit.patch_embed.proj.bias
    table = backbone.vit.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(table, size=(2, 2), mode="bicubic", align_corners=False)
    assert torch.allclose(small - bias, resized.permute(0, 2, 3, 1).reshape(1, 4, 32).expand_as(small), atol=1e-6)
    out = backbone(torch.randn(2, 1, 8, 8), blocks=[0], out="raw")        # the whole forward at that size
    assert out.tokens.shape == (2, 5, 32)
    assert make().local_size(28) == 12 and make().local_size(16) == 8


# ------------------------------------------------------------------------------------------------- gradients

def _train_step(objective, stage_cfg, step=0):
    frozen = frozen_names(objective, stage_cfg.freeze, objective.backbone.depth, "freeze")
    param_groups(objective, objective.backbone, stage_cfg, frozen)          # sets requires_grad as the trainer does
    objective.zero_grad(set_to_none=True)
    views, batch = step_inputs(objective, images(8), torch.arange(8), step)
    out = objective(views, batch)
    out["loss"].backward()
    return out


def test_frozen_encoder_stage_trains_heads_only():
    objective = make(depth=2, head_blocks=[0])
    out = _train_step(objective, stage(freeze=["backbone"]))
    # no labels in the batch: the per-head losses and collapse measures, no neighbour agreement
    assert set(out["logs"]) == {"loss_out", "loss_block0", "out_std_projected", "block0_std_projected"}
    assert all(p.grad is None for p in objective.backbone.parameters())
    for name, p in objective.heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(b.requires_grad for b in objective.buffers())


def test_a_block_head_trains_only_the_blocks_below_it():
    objective = make(depth=3, head_blocks=[0], output_head=False)
    _train_step(objective, stage(freeze=[]))
    grads = {n: p.grad for n, p in objective.backbone.named_parameters() if p.requires_grad}
    assert all(g is not None for n, g in grads.items() if n.startswith(("vit.blocks.0.", "vit.patch_embed")))
    assert all(g is None for n, g in grads.items() if n.startswith(("vit.blocks.1.", "vit.blocks.2.", "vit.norm.")))


def test_weighted_sum_over_heads():
    a, b = make(), make(head_weights=[2.0, 0.5])
    views, batch = step_inputs(a, images(8), torch.arange(8), 0)
    out_a, out_b = a(views, batch), b(views, batch)
    assert torch.allclose(out_a["loss"], out_a["logs"]["loss_out"] + out_a["logs"]["loss_block1"])
    assert torch.allclose(out_b["loss"], 2 * out_b["logs"]["loss_out"] + 0.5 * out_b["logs"]["loss_block1"])


# --------------------------------------------------------------------------------------------------- queue

def test_queue_fills_with_view0_carries_over_stages_and_round_trips_state_dict():
    objective = make()
    for step in range(2):
        views, batch = step_inputs(objective, images(8, seed=step), torch.arange(8) + 8 * step, step)
        objective(views, batch)
    queue = objective.heads["out"].queue
    assert int(queue.filled) == 12 and int(queue.ptr) == 4
    assert sorted(queue.ids.tolist()) == list(range(4, 16))
    before = {k: v.clone() for k, v in objective.state_dict().items() if ".queue." in k}
    assert len(before) == 2 * 5                               # values, ids, labels, ptr, filled for both heads

    objective.start_stage({**objective.opts, "topk": 20}, StageContext(1, 1, 1, 1, 0, 0))
    assert all(torch.equal(objective.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(sslbench.RecipeError, match="stages\\[1\\].options.queue_size"):
        objective.start_stage({**objective.opts, "queue_size": 99}, StageContext(1, 1, 1, 1, 0, 0))

    restored = make(seed=5)
    restored.start_stage(objective.opts, StageContext(1, 1, 1, 1, 0, 0))
    restored.load_state_dict(objective.state_dict())
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in before.items())
    losses = [model.eval()(*step_inputs(model, images(8, seed=5), torch.arange(8) + 16, 2))["loss"]
              for model in (objective, restored)]
    assert torch.equal(*losses)


# ------------------------------------------------------------------------------------ 2 processes = 1 process

WORLD, GLOBAL_BATCH = 2, 8


def _one_step(objective, model, rank: int, world: int) -> dict:
    """One refinement step on a fixed global batch; this process takes its contiguous slice (as the loader does).

    The queues start with the same 12 entries on every process (ids overlapping the batch's, so the self-id
    exclusion acts) and the neighbour is a keyed pick among the top 3. One step only: this random-init ViT's raw
    CLS tokens barely differ between images, so the heads' BatchNorm amplifies float32 rounding (summation orders
    differ between one and two processes) more with every update.
    """
    generator = torch.Generator().manual_seed(3)
    for head in objective.heads.values():
        head.queue.enqueue(torch.randn(12, head.queue.dim, generator=generator), torch.arange(12) * 2)
    objective.opts["topk"] = 3
    optimizer = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    local = GLOBAL_BATCH // world
    mine = slice(rank * local, (rank + 1) * local)
    index = torch.arange(GLOBAL_BATCH) * 7 % 23                               # 0, 7, 14, 21, 5, 12, 19, 3
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
        objective = make(local_views=2, queue_size=16)
        model = DistributedDataParallel(objective, find_unused_parameters=False)   # as Accelerate wraps it
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
    objective = make(local_views=2, queue_size=16)
    want = _one_step(objective, objective, 0, 1)
    got = torch.load(out_file)
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    state = want["state"]
    assert int(state["heads.out.queue.filled"]) == 16 and int(state["heads.out.queue.ptr"]) == 4
    for key, value in state.items():                          # queues (values, ids, pointers), BN statistics, weights
        assert torch.allclose(got["state"][key].float(), value.float(), atol=1e-5), key
    assert got["grads"].keys() == want["grads"].keys()        # DDP-averaged gradients = global-batch gradients
    for name, grad in want["grads"].items():
        assert (got["grads"][name] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-5, name


# ------------------------------------------------------------------------------------------------ end to end

def test_two_stage_recipe_runs_carries_the_queue_and_evaluates_the_ema(tmp_path, tiny_recipe, write_recipe):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["run"]["name"] = "refine"
    heads = {**SMALL, "queue_size": 64}
    recipe["stages"] = [
        {"name": "heads", "objective": "mim_refiner", "steps": 2, "batch_size": 16, "freeze": ["backbone"],
         "optimizer": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 1e-5}, "options": heads},
        {"name": "refine", "steps": 2, "freeze": [], "layer_decay": 0.65, "ema_momentum": 0.99,
         "optimizer": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.05, "head_weight_decay": 1e-5},
         "options": {**heads, "topk": 2}},
    ]
    recipe["eval"] = [{"name": "knn", "k": [5], "use_ema": True}]
    assert main(["run", str(write_recipe(recipe)), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "refine"
    state = load_resume_state(run_dir / "checkpoints" / "last.pt")
    assert state["meta"]["objective_name"] == "mim_refiner" and state["meta"]["progress"]["finished"]
    for head in ("out", "block1"):                              # both stages' view-0 vectors, queue carried over
        assert int(state["objective"][f"heads.{head}.queue.filled"]) == 4 * 16
    assert state["ema"] is not None
    log = (run_dir / "log.jsonl").read_text()
    assert "loss_block1" in log and '"stage": 1' in log
    assert "knn" in (run_dir / "metrics.csv").read_text()


def test_mimrefiner_heads_structure():
    projector = mimrefiner_projector(8, hidden=16, out=4)
    bn, gelu = nn.BatchNorm1d, nn.GELU
    assert layer_types(projector) == [nn.Linear, bn, gelu, nn.Linear, bn, gelu, nn.Linear, bn]
    assert [(lin.in_features, lin.out_features) for lin in linears(projector)] == [(8, 16), (16, 16), (16, 4)]
    assert linears(projector)[0].bias is None
    assert all(layer.affine for layer in projector if isinstance(layer, bn))
    predictor = mimrefiner_predictor(4, hidden=12)
    assert layer_types(predictor) == [nn.Linear, bn, gelu, nn.Linear, bn]
    assert [(lin.in_features, lin.out_features) for lin in linears(predictor)] == [(4, 12), (12, 4)]


@pytest.mark.parametrize("second_label, expected", [(3, 1.0), (5, 0.0)])
def test_neighbour_label_agreement_is_logged_per_head(second_label, expected):
    """Step 1 fills every head's queue with class 3; step 2's neighbours are all of class 3, so the agreement is
    1 for a batch of class 3 and 0 for one of class 5. The loss does not depend on the labels."""
    objective = make(depth=2, head_blocks=[0])
    index = torch.arange(8)
    views, batch = step_inputs(objective, images(8), index, 0)
    objective(views, Batch(index=index, rng=batch.rng, labels=torch.full((8,), 3)))
    assert all(h.queue.labels[:8].tolist() == [3] * 8 for h in objective.heads.values())
    views, batch = step_inputs(objective, images(8), index + 8, 1)
    state = copy.deepcopy(objective.state_dict())
    out = objective(views, Batch(index=index + 8, rng=batch.rng, labels=torch.full((8,), second_label)))
    assert out["logs"]["out_nn_acc"].item() == expected and out["logs"]["block0_nn_acc"].item() == expected
    objective.load_state_dict(state)
    unlabelled = objective(views, batch)
    assert torch.equal(unlabelled["loss"], out["loss"]) and "out_nn_acc" not in unlabelled["logs"]
