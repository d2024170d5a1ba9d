"""sslbench's MAE training step against a bare torch loop computing the same loss on the same model and batches
(the harness and what each side does: ``step_bench.py``).

    python benchmarks/bench_mae_step.py                      # vit_tiny 192x12, 28 px, patch 4, batch 64
    python benchmarks/bench_mae_step.py --batch-size 256 --rounds 6
"""

from __future__ import annotations

from step_bench import arguments, compare, digits_recipe


def bench_recipe(batch_size: int, steps: int) -> dict:
    """The Fashion-MNIST MAE's ViT-Ti (recipes/fmnist/mae.toml) at 4-px patches instead of its 7, on the embedded
    digits at 28 px."""
    return digits_recipe("bench_mae_step", 4, {
        "objective": "mae", "steps": steps, "batch_size": batch_size,
        "optimizer": {"lr": 1.5e-4, "betas": [0.9, 0.95], "weight_decay": 0.05},
        "schedule": {"warmup_epochs": 0.0},
        "options": {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4}})


if __name__ == "__main__":
    args = arguments(__doc__.split("\n\n")[0], batch_size=64)
    compare(bench_recipe(args.batch_size, args.steps), "MAE step, vit_tiny 192x12 @28px patch 4", args)
