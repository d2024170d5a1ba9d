"""On paper, for GPUs we do not have: the images/s and epoch times of the paper-scale recipes on N data-centre GPUs,
from FLOPs *counted* on this CPU.

For each stage of each recipe, the script builds what ``sslbench run`` builds (the full-size backbone with random
weights, the stage's objective with its heads and queues at full size, the optimiser, the view pipeline — the same
machinery as ``--dry-run``) and takes one real training step of the real trainer on a few synthetic images under
``torch.utils.flop_counter.FlopCounterMode``. That counts the FLOPs of every matrix product, convolution and
attention of the forward and backward passes — all views, all heads, the queue lookups — which is where a ViT's
training time goes on a GPU. Divided by the number of images, it is the training cost of one image; with a stated
peak (bf16 dense) and a stated model-FLOP utilisation (MFU), it gives

    images/s = GPUs x peak x MFU / (FLOPs per image),   epoch = 1,281,167 images / (images/s).

Nothing here is timed, so the machine's load does not matter: the counts are exact for the recipe as written.
What the estimate leaves out: data loading and decoding (JPEG decoding of 12 views per image can limit a multi-crop
recipe), element-wise work (folded into the MFU), communication between GPUs, evaluation.

    python benchmarks/gpu_estimate.py                                  # both ViT-L refinements, 8 x A100, MFU 0.35
    python benchmarks/gpu_estimate.py --gpus 8 --peak-tflops 989 --mfu 0.35 recipes/maect_vitl.toml   # 8 x H100
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

IMAGENET_TRAIN = 1_281_167
DEFAULT_RECIPES = ("recipes/mimrefiner_vitl.toml", "recipes/maect_vitl.toml")


def stage_flops(recipe_path: str, images: int) -> list[dict]:
    """One dict per stage: its name, objective, epochs, the views of one image and the training FLOPs per image."""
    from sslbench.commands.dry_run import synthetic_dataset
    from sslbench.core.registry import get_registry
    from sslbench.data.dataset import InMemoryLoader
    from sslbench.training.context import RunContext
    from sslbench.training.recipe import load_recipe
    from sslbench.training.trainer import Progress, StageTrainer, step_rng

    os.environ["SSLBENCH_PROGRESS"] = "0"
    registry = get_registry()
    recipe = load_recipe(recipe_path, registry, check_files=False)
    out = []
    with tempfile.TemporaryDirectory(prefix="sslbench-gpu-estimate-") as scratch:
        recipe = recipe.replace(run={"output_dir": scratch, "cpu": True, "mixed_precision": "no", "trackers": []})
        torch.manual_seed(0)
        context = RunContext.build(recipe, registry, data="synthetic", load_weights=False,
                                   synthetic=lambda r, b: synthetic_dataset(r, b, images))
        dataset, info = context.datasets["train"], context.data

        def loader(data, batch_size, seed, start_step):
            return InMemoryLoader(data, batch_size=batch_size, seed=seed, start_step=start_step)

        objective, progress = None, Progress()
        for index, stage in enumerate(recipe.stages):
            objective, _ = context.objective(index, objective)
            one_step = dataclasses.replace(stage, steps=1, epochs=None, batch_size=images, grad_accum=1)
            trainer = StageTrainer(context.accelerator, objective, one_step, index, recipe, dataset, info, loader,
                                   lambda record: None)
            views = trainer.views(dataset.images.float() / 255, step_rng(0, 0, torch.arange(images)))
            progress = Progress(stage=index, step=0, global_step=progress.global_step)
            began = time.perf_counter()
            with FlopCounterMode(display=False) as counter:
                trainer.run(progress, lambda *_: None, checkpoint_every=0, log_every=1)
            objective = context.accelerator.unwrap_model(trainer.model)
            out.append({"recipe": recipe_path, "stage": stage.name, "objective": stage.objective,
                        "epochs": stage.epochs, "batch": stage.batch_size,
                        "views": " + ".join(f"{sum(1 for w in views if w.shape[-1] == s)}x{s}px"
                                            for s in sorted({v.shape[-1] for v in views}, reverse=True)),
                        "flops_per_image": counter.get_total_flops() / images,
                        "cpu_seconds": time.perf_counter() - began})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", default=list(DEFAULT_RECIPES))
    parser.add_argument("--images", type=int, default=2, help="synthetic images in the counted step (default 2)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=312.0,
                        help="dense bf16 peak per GPU in TFLOP/s (A100: 312, H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.35, 0.5],
                        help="model-FLOP utilisations to report (fraction of peak reached by the matmuls)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = [row for path in args.recipes for row in stage_flops(path, args.images)]
    mfus = " | ".join(f"img/s @ MFU {m:g} | epoch (min) | stage (h)" for m in args.mfu)
    print(f"{args.gpus} GPUs x {args.peak_tflops:g} TFLOP/s (bf16 dense); ImageNet-1K epoch = {IMAGENET_TRAIN:,} "
          "images; FLOPs counted on one training step (forward + backward, every view and head)\n")
    print(f"| recipe | stage | views per image | GFLOP per image | epochs | {mfus} |")
    print("|---|---|---|---:|---:|" + "---:|---:|---:|" * len(args.mfu))
    totals: dict[tuple[str, float], float] = {}
    for row in rows:
        gflop = row["flops_per_image"] / 1e9
        cells = []
        for mfu in args.mfu:
            rate = args.gpus * args.peak_tflops * 1e12 * mfu / row["flops_per_image"]
            epoch = IMAGENET_TRAIN / rate
            hours = epoch * (row["epochs"] or 0) / 3600
            totals[(row["recipe"], mfu)] = totals.get((row["recipe"], mfu), 0.0) + hours
            cells.append(f"{rate:,.0f} | {epoch / 60:.1f} | {hours:.1f}")
        print(f"| `{row['recipe']}` | {row['stage']} ({row['objective']}) | {row['views']} | {gflop:,.1f} | "
              f"{row['epochs']:g} | " + " | ".join(cells) + " |")
    print()
    for (recipe, mfu), hours in totals.items():
        print(f"{recipe}: all stages {hours:.1f} h on {args.gpus} GPUs at MFU {mfu:g} "
              f"({hours * args.gpus:.0f} GPU-hours)")
    print(f"\n(counting took {sum(r['cpu_seconds'] for r in rows):.0f} s of CPU steps)")


if __name__ == "__main__":
    main()
