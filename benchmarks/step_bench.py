"""The harness behind ``bench_*_step.py``: one objective's training step through sslbench's ``StageTrainer`` against
a bare torch loop over the same model, batches, views and parameter groups, timed interleaved in one process.

What is compared, per optimiser step:

* **sslbench** — ``StageTrainer`` exactly as ``sslbench run`` drives it: the in-memory loader, the keyed per-sample
  random streams, the objective's view pipeline, Accelerate's ``backward``, the LR schedule, the finiteness check,
  AdamW over the recipe's parameter groups (layer decay, frozen parts), EMA when the stage has one, the metrics log.
* **bare** — a plain loop over the same pre-sliced uint8 batches: the same views and a copy of the same objective
  module (its heads, losses and queues), ``torch.optim.AdamW`` over the same parameter groups, nothing else.

The ratio is bare time / sslbench time per step (median over ``--rounds``; 1.0 = no overhead; target ≥ 0.97).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from sslbench.data.dataset import InMemoryLoader
from sslbench.core.objective import StageContext
from sslbench.training.optim import frozen_names, param_groups
from sslbench.core.registry import get_registry
from sslbench.training.recipe import resolve
from sslbench.training.assembly import build_model, data_info, load_datasets, make_accelerator
from sslbench.training.trainer import Progress, StageTrainer, step_rng
from sslbench.core.objective import Batch


def arguments(description: str, batch_size: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="alternations sslbench/bare")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def digits_recipe(name: str, patch_size: int, stage: dict) -> dict:
    """A one-stage recipe on the embedded digits at 28 px with the Fashion-MNIST ViT-Ti (recipes/fmnist/*.toml):
    the benchmarks need no data download, and the model is the one the Fashion-MNIST recipes train."""
    return {
        "run": {"name": name, "seed": 0, "log_every": 10},
        "backbone": {"model": "vit_tiny_patch16_224", "img_size": 28, "patch_size": patch_size, "in_chans": 1,
                     "pos_embed": "sincos"},
        "data": {"train": {"source": "digits", "split": "train", "size": 28},
                 "test": {"source": "digits", "split": "test", "size": 28}},
        "stages": [stage],
        "eval": [],
    }


def loader(dataset, batch_size, seed, start_step):
    return InMemoryLoader(dataset, batch_size=batch_size, seed=seed, num_processes=1, process_index=0,
                          start_step=start_step)


def build_trainer(raw_recipe: dict, title: str, batch_size: int, steps: int):
    """The recipe's only stage as ``sslbench run`` builds it: (trainer, objective, recipe, datasets, data info)."""
    os.environ["SSLBENCH_PROGRESS"] = "0"  # a bar redrawn every step would be measured too
    registry = get_registry()
    recipe = resolve(raw_recipe, registry, source=title)
    accelerator = make_accelerator(recipe)
    backbone, _ = build_model(recipe, registry)
    datasets = load_datasets(recipe, registry, accelerator)
    info = data_info(recipe, datasets["train"], backbone)
    stage = recipe.stages[0]
    context = StageContext(0, len(datasets["train"]) // batch_size, steps, 1, 0, 0)
    objective = registry.get("objective", stage.objective).factory(backbone, dict(stage.options), context)
    trainer = StageTrainer(accelerator, objective, stage, 0, recipe, datasets["train"], info, loader,
                           log=lambda record: None)
    return trainer, objective, recipe, datasets, info


def time_trainer(trainer, steps: int) -> float:
    """Seconds per step of ``steps`` steps of ``trainer``, as ``sslbench run`` drives it (no checkpoints)."""
    start = time.perf_counter()
    trainer.run(Progress(), save=lambda progress, reason: None, checkpoint_every=0, log_every=10)
    return (time.perf_counter() - start) / steps


def compare(raw_recipe: dict, title: str, args: argparse.Namespace) -> float:
    """Time the recipe's only stage both ways; print the table and return the ratio bare/sslbench."""
    torch.set_num_threads(args.threads)
    trainer, objective, recipe, datasets, info = build_trainer(raw_recipe, title, args.batch_size, args.steps)
    stage = recipe.stages[0]
    backbone = objective.backbone
    bare_objective = copy.deepcopy(objective)

    frozen = frozen_names(bare_objective, stage.freeze, backbone.depth, "freeze")
    for name, param in bare_objective.named_parameters():
        param.requires_grad_(name not in frozen)
    groups = param_groups(bare_objective, bare_objective.backbone, stage, frozen)
    optimizer = torch.optim.AdamW(groups, lr=stage.optimizer.lr, betas=tuple(stage.optimizer.betas))
    views_fn = bare_objective.views(info)
    it = iter(loader(datasets["train"], args.batch_size, 0, 0))
    batches = [{k: b[k] for k in ("images", "index")} for b in (next(it) for _ in range(args.steps))]

    def bare_round() -> float:
        bare_objective.train()
        start = time.perf_counter()
        for step, batch in enumerate(batches):
            rng = step_rng(0, step, batch["index"])
            views = views_fn(batch["images"].float().div_(255), rng)
            out = bare_objective(views, Batch(index=batch["index"], rng=rng))
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bare_objective.after_step(step)
        return (time.perf_counter() - start) / len(batches)

    def sslbench_round() -> float:
        return time_trainer(trainer, args.steps)

    bare_round(), sslbench_round()  # warm-up: allocator, autograd graph caches
    bare_times, ours = [], []
    for _ in range(args.rounds):
        ours.append(sslbench_round())
        bare_times.append(bare_round())
    b, s = statistics.median(bare_times), statistics.median(ours)
    print(f"{title}, batch {args.batch_size}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps "
          f"(medians)")
    print(f"  bare torch loop : {b * 1000:8.1f} ms/step  ({args.batch_size / b:6.1f} img/s)")
    print(f"  sslbench trainer: {s * 1000:8.1f} ms/step  ({args.batch_size / s:6.1f} img/s)")
    print(f"  ratio bare/sslbench = {b / s:.3f}  (target >= 0.97)")
    return b / s
