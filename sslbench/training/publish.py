"""Evaluate a run's backbone (and its EMA where asked) and write the rows: ``metrics.csv`` and the leaderboard."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sslbench.evaluation.suite import evaluate_backbone
from sslbench.training.recipe import protocol_hash, recipe_hash


def metric_rows(recipe: dict, results, *, run_id: str, objective: str, stage: str, checkpoint: str) -> list[dict]:
    """One row per (evaluator, metric, variant), carrying everything needed to compare it with other runs.

    A result's ``extra`` (e.g. the configuration a linear probe chose) goes to the ``details`` column as JSON.
    """
    from sslbench.results.metrics import hardware_description, versions

    common = {"run_id": run_id, "recipe_hash": recipe_hash(recipe)[:16], "protocol_hash": protocol_hash(recipe)[:16],
              "objective": objective, "backbone": backbone_label(recipe), "dataset": dataset_label(recipe),
              "seed": recipe["run"]["seed"], "stage": stage, "hardware": hardware_description(), **versions()}
    rows = []
    for table, value in results:
        variant = value.variant + (",ema" if table.get("use_ema") else "")
        rows.append({**common, "checkpoint": checkpoint + (" (ema)" if table.get("use_ema") else ""),
                     "evaluator": table["name"], "metric": value.metric, "variant": variant,
                     "value": float(value.value), "selection_split": value.selection_split,
                     "details": json.dumps(value.extra, sort_keys=True, default=str) if value.extra else ""})
    return rows


def backbone_label(recipe: dict) -> str:
    b = recipe["backbone"]
    shape = [f"{k}={b[k]}" for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
             if b[k] is not None]
    return b["model"] + (f"({','.join(shape)})" if shape else "")


def dataset_label(recipe: dict) -> str:
    train = recipe["data"]["train"]
    return train["source"] + (f":{train['path']}" if train.get("path") else "")


def report_run(run, stage_name: str) -> list[dict]:
    """Evaluate after a stage; write metrics.csv and refresh the leaderboard beside the runs folder."""
    recipe = run.recipe
    results = []
    for use_ema in (False, True):
        evals = [e for e in recipe["eval"] if e["use_ema"] == use_ema]
        if evals:
            results += evaluate_backbone(recipe, run.registry, run.eval_backbone(use_ema), run.datasets,
                                         run.accelerator, evals=evals)
    if not run.accelerator.is_main_process:
        return []
    start = recipe["backbone"]["checkpoint"] or "scratch"
    # Seeds of one recipe share a checkpoint label, so the leaderboard averages them.
    recipe_name = re.sub(r"-seed\d+$", "", run.run_dir.name)
    rows = metric_rows(recipe, results, run_id=run.run_dir.name, objective=run.objective_chain(), stage=stage_name,
                       checkpoint=f"{start} → {recipe_name}/{stage_name}")
    publish_rows(run.run_dir, rows, Path(recipe["run"]["output_dir"]))
    return rows


def publish_rows(run_dir: Path, rows: list[dict], runs_root: Path) -> None:
    """Write a run's rows (``metrics.csv``, plus the per-block table and plot when it has per-block rows), print
    them, and refresh the leaderboard beside the runs folder. Shared by ``sslbench run`` and ``sslbench eval``."""
    from sslbench.results.plots import write_run_per_block
    from sslbench.results.metrics import refresh_leaderboard, write_metrics

    write_metrics(run_dir, rows)
    write_run_per_block(run_dir)
    for row in rows:
        print(f"{row['evaluator']:>12} {row['metric']:<10} {row['variant']:<34} {row['value']:8.2f}")
    refresh_leaderboard(runs_root, runs_root.parent / "leaderboard.csv")
