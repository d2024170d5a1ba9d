"""``run.compile``: each objective's training step eager and compiled, side by side, through sslbench's
``StageTrainer`` (the harness: ``step_bench.py``), with the CPU's fp32 matmul peak measured in the same process and
the fraction of it each step reaches.

    python benchmarks/bench_compile.py                                   # all five objectives, batch 256
    python benchmarks/bench_compile.py --objectives mae micl --ablations --steps 5 --rounds 3

Every objective trains the Fashion-MNIST ViT-Ti (recipes/fmnist/*.toml: 192 wide, 12 blocks, 28 px in 7-px
patches) on the embedded digits with its Fashion-MNIST recipe's options; MIM-Refiner is its stage 3 (everything
trained, layer decay, EMA), MAE-CT its phase 3. Per objective two trainers are built from the same recipe, one with
``run.compile = false`` and one with ``run.compile = true`` — exactly what ``sslbench run`` builds, so the compiled
one has everything the option switches on: compiled blocks and heads, the written-out attention on the CPU
(``written_out_attention``) and AdamW's fused kernel. One warm-up round each (the compiled one compiles; its time is
reported as "compile s"), then ``--rounds`` alternations of ``--steps`` steps; medians. With ``--ablations`` two
more compiled trainers take their turn in every round: one keeping PyTorch's fused attention kernel, one with the
eager multi-tensor AdamW — what each of the two choices is worth, measured side by side.

FLOPs of a step are counted on one eager round with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
attention, convolutions; forward and backward); "% peak" = counted FLOP/s over the matmul peak, the GFLOP/s of a
2048³ fp32 matmul with the same threads (median of ``--rounds`` measurements, interleaved with the objectives).
"graphs" and "graph breaks" are dynamo's counts for the objective's compiled regions (one graph per region kind and
token count; breaks should be 0).
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager, nullcontext
import statistics
import sys
import time

import torch
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from step_bench import build_trainer, digits_recipe, time_trainer

import sslbench.training.compile as compile_module
import sslbench.training.trainer as trainer_module

ADAMW = {"betas": [0.9, 0.95], "weight_decay": 0.05}


def stage(objective: str, batch_size: int, steps: int) -> dict:
    """The Fashion-MNIST recipe's (last) stage of ``objective``, for ``steps`` steps of ``batch_size``."""
    common = {"objective": objective, "steps": steps, "batch_size": batch_size, "schedule": {"warmup_epochs": 0.0}}
    stages = {
        "mae": {"optimizer": {"lr": 1e-3, **ADAMW},
                "options": {"mask_ratio": 0.75, "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4}},
        "mim_refiner": {"layer_decay": 0.65, "ema_momentum": 0.99,
                        "optimizer": {"lr": 4e-4, **ADAMW, "head_weight_decay": 1e-5},
                        "options": {"proj_hidden": 1024, "proj_out": 128, "pred_hidden": 1024, "queue_size": 8192,
                                    "topk": 20, "global_views": 2, "local_views": 4, "local_size": 14}},
        "mae_ct": {"freeze": ["blocks[:6]"], "layer_decay": 0.65, "optimizer": {"lr": 1e-4, **ADAMW},
                   "options": {"pooling": "cls", "proj_hidden": 1024, "proj_out": 128, "pred_hidden": 1024,
                               "queue_size": 8192, "temperature": 0.15, "topk": 20, "target_momentum": 0.99}},
        "conmim": {"clip_grad": 1.0, "optimizer": {"lr": 5e-4, "betas": [0.9, 0.98], "weight_decay": 0.05},
                   "options": {"mask_mode": "random_units", "mask_ratio": 0.75, "mask_unit_px": 7,
                               "temperature": 0.1, "proj_hidden": 1024, "proj_out": 256, "momentum": 0.996}},
        "micl": {"optimizer": {"lr": 5e-4, **ADAMW},
                 "options": {"mask_ratio": 0.5, "temperature": 0.07, "kappa": 0.015625}},
    }
    return {**common, **stages[objective]}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n×n fp32 matmul (best of ``repeats``) — the peak the steps are compared with."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def counted_flops(trainer, steps: int) -> float:
    """FLOPs per step, counted on one eager round."""
    with FlopCounterMode(display=False) as counter:
        time_trainer(trainer, steps)
    return counter.get_total_flops() / steps


@contextmanager
def fused_attention_kept():
    """Compiled steps around PyTorch's fused attention kernel (what ``run.compile`` did before it wrote it out)."""
    original = compile_module.written_out_attention
    compile_module.written_out_attention = lambda modules: nullcontext(0)
    try:
        yield
    finally:
        compile_module.written_out_attention = original


@contextmanager
def foreach_adamw():
    """A trainer built with the multi-tensor AdamW even though ``run.compile`` is on."""
    original = trainer_module.build_optimizer
    trainer_module.build_optimizer = lambda groups, stage, key, fused=False: original(groups, stage, key)
    try:
        yield
    finally:
        trainer_module.build_optimizer = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objectives", nargs="+", default=["mae", "mim_refiner", "mae_ct", "conmim", "micl"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the variants")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", default="default", help="torch.compile mode (run.compile_mode)")
    parser.add_argument("--ablations", action="store_true",
                        help="also time compiled steps with the fused attention kernel and with multi-tensor AdamW")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, peaks = [], []
    for name in args.objectives:
        torch._dynamo.reset()          # each objective compiles from scratch, as in its own run
        counters.clear()

        def trainer_for(compile_on: bool):
            raw = digits_recipe(f"bench_compile_{name}", 7, stage(name, args.batch_size, args.steps))
            raw["run"].update({"compile": compile_on, "compile_mode": args.mode})
            return build_trainer(raw, name, args.batch_size, args.steps)[0]

        variants = {"eager": (trainer_for(False), nullcontext), "compiled": (trainer_for(True), nullcontext)}
        if args.ablations:
            variants["fused attention kernel"] = (trainer_for(True), fused_attention_kept)
            with foreach_adamw():
                variants["foreach AdamW"] = (trainer_for(True), nullcontext)
        time_trainer(variants["eager"][0], args.steps)                      # eager warm-up
        start = time.perf_counter()
        time_trainer(variants["compiled"][0], args.steps)                   # compiles
        compile_s = time.perf_counter() - start
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        for label, (trainer, context) in variants.items():
            if label not in ("eager", "compiled"):
                with context():
                    time_trainer(trainer, args.steps)                        # warm-up (recompiles)
        flops = counted_flops(variants["eager"][0], args.steps)
        times: dict[str, list[float]] = {label: [] for label in variants}
        for _ in range(args.rounds):
            peaks.append(matmul_gflops())
            for label, (trainer, context) in variants.items():
                with context():
                    times[label].append(time_trainer(trainer, args.steps))
        rows.append((name, {k: statistics.median(v) for k, v in times.items()}, flops, compile_s, graphs, breaks))
        print(f"  {name}: done", file=sys.stderr, flush=True)

    peak = statistics.median(peaks)
    print(f"python benchmarks/bench_compile.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"Fashion-MNIST ViT-Ti (192x12, 28 px, patch 7), batch {args.batch_size}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps (medians), mode {args.mode!r}, torch {torch.__version__}")
    print(f"fp32 matmul peak (2048^3): {peak:.0f} GFLOP/s")
    extra = [label for label in rows[0][1] if label not in ("eager", "compiled")] if rows else []
    print("| objective | eager ms/step | compiled ms/step | eager/compiled | GFLOP/step | eager % peak "
          "| compiled % peak | " + "".join(f"compiled, {label}: ms/step | " for label in extra)
          + "compile s | graphs | graph breaks |")
    print("|---|" + "---:|" * (9 + len(extra)))
    for name, t, flops, compile_s, graphs, breaks in rows:
        e, c = t["eager"], t["compiled"]
        cells = "".join(f"{t[label] * 1000:.1f} | " for label in extra)
        print(f"| {name} | {e * 1000:.1f} | {c * 1000:.1f} | {e / c:.2f} | {flops / 1e9:.1f} "
              f"| {100 * flops / e / 1e9 / peak:.0f}% | {100 * flops / c / 1e9 / peak:.0f}% | {cells}{compile_s:.0f} "
              f"| {graphs} | {breaks} |")


if __name__ == "__main__":
    main()
