"""sslbench's MAE training step against a bare torch loop computing the same loss on the same model and batches.

What is compared, per optimiser step:

* **sslbench** — ``StageTrainer`` exactly as ``sslbench run`` drives it: the in-memory loader, the keyed per-sample
  random streams, the objective's view pipeline, Accelerate's ``backward``, the LR schedule, the finiteness check,
  AdamW over the recipe's parameter groups, the metrics log.
* **bare** — a plain loop over the same pre-sliced uint8 batches: the same views and the same ``MAE`` module
  forward/backward, ``torch.optim.AdamW`` over the same parameter groups, nothing else.

The two are timed interleaved (``--rounds`` alternations of ``--steps`` steps each) in one process, so machine noise
hits both alike; the reported ratio is bare time / sslbench time per step (1.0 = no overhead; target ≥ 0.97).

    python benchmarks/bench_mae_step.py                      # vit_tiny 192x12, 28 px, patch 4, batch 64
    python benchmarks/bench_mae_step.py --batch-size 256 --rounds 6
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from sslbench.plugins import get_registry
from sslbench.recipe import resolve
from sslbench.setup import build_model, data_info, load_datasets, make_accelerator
from sslbench.objective import StageContext
from sslbench.optim import frozen_names, param_groups
from sslbench.train import Progress, StageTrainer, step_rng


def bench_recipe(batch_size: int, steps: int) -> dict:
    """The Fashion-MNIST reference MAE model (recipes/fmnist/mae.toml) on the embedded digits at 28 px."""
    return {
        "run": {"name": "bench_mae_step", "seed": 0, "log_every": 10},
        "backbone": {"model": "vit_tiny_patch16_224", "img_size": 28, "patch_size": 4, "in_chans": 1,
                     "pos_embed": "sincos"},
        "data": {"train": {"source": "digits", "split": "train", "size": 28},
                 "test": {"source": "digits", "split": "test", "size": 28}},
        "stages": [{"objective": "mae", "steps": steps, "batch_size": batch_size,
                    "optimizer": {"lr": 1.5e-4, "betas": [0.9, 0.95], "weight_decay": 0.05},
                    "schedule": {"warmup_epochs": 0.0},
                    "options": {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4}}],
        "eval": [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="alternations sslbench/bare")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["SSLBENCH_PROGRESS"] = "0"  # a bar redrawn every step would be measured too

    registry = get_registry()
    recipe = resolve(bench_recipe(args.batch_size, args.steps), registry, source="bench_mae_step")
    accelerator = make_accelerator(recipe)
    backbone, _ = build_model(recipe, registry)
    datasets = load_datasets(recipe, registry, accelerator)
    info = data_info(recipe, datasets["train"], backbone)
    stage = recipe["stages"][0]
    context = StageContext(0, len(datasets["train"]) // args.batch_size, args.steps, 1, 0, 0)
    objective = registry.get("objective", "mae").factory(backbone, stage["options"], context)
    bare_objective = copy.deepcopy(objective)

    def loader(dataset, batch_size, seed, start_step):
        from sslbench.data import InMemoryLoader

        return InMemoryLoader(dataset, batch_size=batch_size, seed=seed, num_processes=1, process_index=0,
                              start_step=start_step)

    trainer = StageTrainer(accelerator, objective, stage, 0, recipe, datasets["train"], info, loader,
                           log=lambda record: None)

    # The bare loop: same batches (taken from the same loader up front), same views, same module, same groups.
    groups = param_groups(bare_objective, bare_objective.backbone, stage,
                          frozen_names(bare_objective, stage["freeze"], backbone.depth, "freeze"))
    optimizer = torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95))
    views_fn = bare_objective.views(info)
    batches = []
    it = iter(loader(datasets["train"], args.batch_size, 0, 0))
    for _ in range(args.steps):
        b = next(it)
        batches.append({"images": b["images"], "index": b["index"]})

    def bare_round() -> float:
        bare_objective.train()
        start = time.perf_counter()
        for step, batch in enumerate(batches):
            images = batch["images"].float().div_(255)
            rng = step_rng(0, step, batch["index"])
            out = bare_objective(views_fn(images, rng), {"images": batch["images"], "index": batch["index"],
                                                          "rng": rng})
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / len(batches)

    def sslbench_round() -> float:
        start = time.perf_counter()
        trainer.run(Progress(), save=lambda progress, reason: None, checkpoint_every=0, log_every=10)
        return (time.perf_counter() - start) / args.steps

    bare_round(), sslbench_round()  # warm-up: allocator, autograd graph caches
    bare_times, ours = [], []
    for _ in range(args.rounds):
        ours.append(sslbench_round())
        bare_times.append(bare_round())
    b, s = statistics.median(bare_times), statistics.median(ours)
    print(f"MAE step, vit_tiny 192x12 @28px patch 4, batch {args.batch_size}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps (medians)")
    print(f"  bare torch loop : {b * 1000:8.1f} ms/step  ({args.batch_size / b:6.1f} img/s)")
    print(f"  sslbench trainer: {s * 1000:8.1f} ms/step  ({args.batch_size / s:6.1f} img/s)")
    print(f"  ratio bare/sslbench = {b / s:.3f}  (target >= 0.97)")


if __name__ == "__main__":
    main()
