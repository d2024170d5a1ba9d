"""Publishing results: metric rows with everything that identifies them, ``metrics.csv``, the per-block table and
plot, and the refreshed leaderboard. Used by ``sslbench run`` (:meth:`sslbench.training.run.Run.report`) and
``sslbench eval``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from sslbench.core.evaluator import format_variant
from sslbench.training.spec import Recipe


def metric_rows(recipe: Recipe, results, *, run_id: str, objective: str, stage: str, checkpoint: str) -> list[dict]:
    """One row per (evaluator, metric, variant), carrying everything needed to compare it with other runs.

    A result's ``extra`` (e.g. the configuration a linear probe chose) goes to the ``details`` column as JSON.
    """
    from sslbench.results.metrics import hardware_description, versions

    common = {"run_id": run_id, "recipe_hash": recipe.recipe_hash[:16], "protocol_hash": recipe.protocol_hash[:16],
              "objective": objective, "backbone": backbone_label(recipe), "dataset": dataset_label(recipe),
              "seed": recipe.run.seed, "stage": stage, "hardware": hardware_description(), **versions()}
    rows = []
    for table, value in results:
        # The EMA is one more variant field; the text form (the ``variant`` column) follows from the fields.
        fields = {**value.fields, **({"ema": True} if table.use_ema else {})}
        rows.append({**common, "checkpoint": checkpoint + (" (ema)" if table.use_ema else ""),
                     "evaluator": table.name, "metric": value.metric, "variant": format_variant(fields),
                     "fields": fields, "value": float(value.value), "selection_split": value.selection_split,
                     "details": json.dumps(value.extra, sort_keys=True, default=str) if value.extra else ""})
    return rows


def backbone_label(recipe: Recipe) -> str:
    b = recipe.backbone
    shape = [f"{k}={getattr(b, k)}" for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
             if getattr(b, k) is not None]
    return b.model + (f"({','.join(shape)})" if shape else "")


def dataset_label(recipe: Recipe) -> str:
    train = recipe.data.train
    return train["source"] + (f":{train['path']}" if train.get("path") else "")


def publish_rows(run_dir: Path, rows: list[dict], runs_root: Path, results=(), test_labels=None) -> None:
    """Write a run's rows (``metrics.csv``; ``predictions.npz`` with the per-sample records of ``results`` — the
    ``(EvalSpec, MetricValue)`` pairs the rows were made from, in order — on ``test_labels``; the per-block table
    and plot when it has per-block rows; the training-signals figure when it trained), refresh the leaderboard of the runs folder (``<runs_root>/leaderboard.md``)
    and tell the user, in words, what the run measured and where everything is. Shared by ``sslbench run`` and
    ``sslbench eval``."""
    from sslbench.results.leaderboard import refresh
    from sslbench.results.plots import write_run_per_block
    from sslbench.results.metrics import write_metrics
    from sslbench.results.predictions import write_predictions
    from sslbench.results.summary import run_summary
    from sslbench.results.training_plots import write_run_training

    records = [(row, value.per_sample) for row, (_, value) in zip(rows, results) if value.per_sample is not None]
    if records and test_labels is not None:
        write_predictions(run_dir, records, test_labels)
    write_run_per_block(run_dir, write_metrics(run_dir, rows))      # the run's rows in memory, not read back
    try:
        write_run_training(run_dir)
    except Exception as exc:            # a figure must never cost the user the end of a finished run
        warnings.warn(f"{run_dir}/training.png was not drawn: {exc}", stacklevel=2)
    print(run_summary(run_dir, rows, leaderboard=refresh(runs_root)))
