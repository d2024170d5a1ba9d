"""One MIM-Refiner training step (stage 3: the whole encoder trained with layer decay 0.65 and an EMA, 5 NNA heads
on the output and blocks 8..11, 2 global + 4 local views, top-20 neighbour from the queues) through sslbench's trainer
against a bare torch loop computing the same heads and losses on the same batches (the harness and what each side
does: ``step_bench.py``). The model and heads are recipes/fmnist/mimrefiner.toml's, on the embedded digits at 28 px.

    python benchmarks/bench_mimrefiner_step.py               # batch 64, 2 threads, 5 rounds x 10 steps
    python benchmarks/bench_mimrefiner_step.py --threads 1 --steps 5 --rounds 3
"""

from __future__ import annotations

from step_bench import arguments, compare, digits_recipe


def bench_recipe(batch_size: int, steps: int) -> dict:
    return digits_recipe("bench_mimrefiner_step", 7, {
        "objective": "mim_refiner", "steps": steps, "batch_size": batch_size, "layer_decay": 0.65,
        "ema_momentum": 0.99,
        "optimizer": {"lr": 4e-4, "betas": [0.9, 0.95], "weight_decay": 0.05, "head_weight_decay": 1e-5},
        "schedule": {"warmup_epochs": 0.0},
        "options": {"proj_hidden": 1024, "proj_out": 128, "pred_hidden": 1024, "queue_size": 1024,
                    "topk": 20, "global_views": 2, "local_views": 4, "local_size": 14}})


if __name__ == "__main__":
    args = arguments(__doc__.split("\n\n")[0], batch_size=64)
    compare(bench_recipe(args.batch_size, args.steps), "MIM-Refiner step, vit_tiny 192x12 @28px patch 7", args)
