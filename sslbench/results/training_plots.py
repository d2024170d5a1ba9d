"""A run's training signals from its ``log.jsonl``: the table and the figure (``training.png``) that tell a working run
from a broken one before any evaluation.

Panels, each drawn only when the run logged it, against the epoch counted over the whole run (a later stage
continues the count, as in the leaderboard's learning curves):

* **loss** — the total loss of every logged step;
* **neighbour agreement** — ``nn_acc`` and ``<head>_nn_acc``: how often the neighbour an NNCLR-style objective
  retrieves from its queue has the sample's class (:mod:`sslbench.core.diagnostics`); a positive that is the wrong
  class half of the time teaches the encoder little;
* **collapse** — ``std_<name>`` and ``<head>_std_<name>``: the per-dimension std of L2-normalised features × √d,
  about 1 when spread over the sphere, falling to 0 when the features collapse;
* **online k-NN** — the ``[monitor]`` lines (:mod:`sslbench.training.monitor`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from sslbench.results.budget import read_log, run_epochs

__all__ = ["signals_table", "write_run_training"]

#: Logged keys of each panel (beyond ``loss`` and the monitor's ``knn_top1``).
AGREEMENT = re.compile(r"^(?:.+_)?nn_acc$")
COLLAPSE = re.compile(r"^(?:.+_)?std_.+$")


def signals_table(lines: list[dict]) -> pd.DataFrame:
    """One row per logged training step (``kind`` train) or monitor line, with ``run_epoch``, ``stage_name`` and
    every numeric value logged; empty when nothing was logged."""
    offsets = run_epochs(lines)
    rows = []
    for record in lines:
        epoch = record.get("epoch")
        if not isinstance(epoch, (int, float)):
            continue
        stage = int(record.get("stage", 0))
        row = {"kind": record.get("kind", "train"), "stage": stage, "stage_name": record.get("stage_name", ""),
               "run_epoch": offsets.get(stage, 0.0) + float(epoch)}
        row.update({k: float(v) for k, v in record.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in row})
        rows.append(row)
    return pd.DataFrame(rows)


def _panels(table: pd.DataFrame) -> list[tuple[str, str, list[str]]]:
    """``[(title, y label, columns), ...]`` for the signals the run logged, in reading order."""
    train = table[table["kind"] == "train"]
    logged = [c for c in train.columns if train[c].notna().any()]
    panels = []
    if "loss" in logged:
        panels.append(("loss", "loss", ["loss"]))
    agreement = [c for c in logged if AGREEMENT.match(c)]
    if agreement:
        panels.append(("neighbour has the sample's class", "fraction of lookups", agreement))
    collapse = [c for c in logged if COLLAPSE.match(c)]
    if collapse:
        panels.append(("collapse measure (1: spread, 0: collapsed)", "std of normalised features × √d", collapse))
    monitor = table[table["kind"] == "monitor"]
    if "knn_top1" in monitor.columns and monitor["knn_top1"].notna().any():
        panels.append(("online k-NN ([monitor] subset)", "top-1 (%)", ["knn_top1"]))
    return panels


def write_run_training(run_dir: str | os.PathLike) -> Path | None:
    """``training.png`` beside ``run_dir/log.jsonl``: a panel per logged signal; ``None`` (nothing written) for a
    run without training lines (``sslbench eval``) or without any signal to draw."""
    from sslbench.results.plots import pyplot, save_figure

    run_dir = Path(run_dir)
    lines = read_log(run_dir) or []
    table = signals_table(lines)
    if table.empty or not (table["kind"] == "train").any():
        return None
    panels = _panels(table)
    if not panels:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    try:
        for ax, (title, ylabel, columns) in zip(axes[0], panels):
            kind = "monitor" if columns == ["knn_top1"] else "train"
            rows = table[table["kind"] == kind]
            for column in columns:
                points = rows[["run_epoch", column]].dropna()
                ax.plot(points["run_epoch"], points[column], marker="o" if kind == "monitor" else None,
                        markersize=3, linewidth=1, label=column if len(columns) > 1 else None)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch (a later stage continues the count)", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
            if len(columns) > 1:
                ax.legend(fontsize=6, frameon=False)
        for start in sorted(set(run_epochs(lines).values()) - {0.0}):
            for ax in axes[0]:
                ax.axvline(start, color="grey", linewidth=0.6, linestyle=":")      # where a stage begins
        figure.suptitle(f"{run_dir.name}: training signals (log.jsonl)", fontsize=10)
        figure.tight_layout()
        return save_figure(figure, run_dir / "training.png")
    finally:
        plt.close(figure)
