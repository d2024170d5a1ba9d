"""sslbench's MAE training step against a bare torch loop computing the same loss on the same model and batches
(the harness and what each side does: ``step_bench.py``).

    python benchmarks/bench_mae_step.py                      # vit_tiny 192x12, 28 px, patch 4, batch 64
    python benchmarks/bench_mae_step.py --batch-size 256 --rounds 6
"""

from __future__ import annotations

from step_bench import arguments, compare


def bench_recipe(batch_size: int, steps: int) -> dict:
    """The Fashion-MNIST reference MAE model (recipes/fmnist/mae.toml, patch 4) on the embedded digits at 28 px."""
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


if __name__ == "__main__":
    args = arguments(__doc__.split("\n\n")[0], batch_size=64)
    compare(bench_recipe(args.batch_size, args.steps), "MAE step, vit_tiny 192x12 @28px patch 4", args)
