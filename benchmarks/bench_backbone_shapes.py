"""MAE training throughput of candidate Fashion-MNIST backbones (ViT-Ti width 192 at 28 px), timed interleaved in one
process, so their ratios hold on a noisy machine: what a reference study can afford per epoch of 60,000 images.

    python benchmarks/bench_backbone_shapes.py                       # batch 256, 3 rounds x 5 steps
    python benchmarks/bench_backbone_shapes.py --batch-size 256 --rounds 3 --steps 5

Each candidate runs the MAE stage of ``recipes/fmnist/mae.toml`` (mask ratio 0.75, 2-block 128-wide decoder) through
sslbench's ``StageTrainer``; the rounds alternate between candidates. Reported: ms per step (median), images/s, the
minutes one epoch of 60,000 images takes, and the speed relative to the first candidate.
"""

from __future__ import annotations

import statistics

import torch

from step_bench import arguments, build_trainer, digits_recipe, time_trainer

#: (patch size, depth): the Fashion-MNIST recipes' 7-px patches (16 tokens), 4-px patches (49 tokens), and half depth.
CANDIDATES = ((7, 12), (4, 12), (7, 6), (4, 6))


def mae_recipe(patch_size: int, depth: int, batch_size: int, steps: int) -> dict:
    recipe = digits_recipe(f"shape_p{patch_size}_d{depth}", patch_size, {
        "objective": "mae", "steps": steps, "batch_size": batch_size,
        "optimizer": {"lr": 1.5e-4, "betas": [0.9, 0.95], "weight_decay": 0.05},
        "schedule": {"warmup_epochs": 0.0},
        "options": {"mask_ratio": 0.75, "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4}})
    recipe["backbone"]["depth"] = depth
    return recipe


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], batch_size=256)
    torch.set_num_threads(args.threads)
    trainers = {shape: build_trainer(mae_recipe(*shape, args.batch_size, args.steps), f"p{shape[0]} d{shape[1]}",
                                     args.batch_size, args.steps)[0] for shape in CANDIDATES}
    for trainer in trainers.values():
        time_trainer(trainer, args.steps)                                # warm-up
    times: dict[tuple[int, int], list[float]] = {shape: [] for shape in CANDIDATES}
    for _ in range(args.rounds):
        for shape, trainer in trainers.items():
            times[shape].append(time_trainer(trainer, args.steps))
    first = statistics.median(times[CANDIDATES[0]])
    print(f"MAE step by backbone shape, width 192, 28 px, batch {args.batch_size}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps interleaved (medians)")
    print(f"  {'patch':>5} {'depth':>5} {'tokens':>6} {'ms/step':>9} {'img/s':>7} {'min/epoch':>9} {'speed':>6}")
    for (patch, depth), values in times.items():
        t = statistics.median(values)
        print(f"  {patch:>5} {depth:>5} {(28 // patch) ** 2:>6} {t * 1000:>9.1f} {args.batch_size / t:>7.1f} "
              f"{60000 / (args.batch_size / t) / 60:>9.1f} {first / t:>6.2f}")


if __name__ == "__main__":
    main()
