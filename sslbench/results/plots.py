"""Tables and plots drawn from recorded metric rows — never from live results — so a figure always shows exactly
the numbers in ``metrics.csv`` and the leaderboard.

* :func:`write_run_per_block`: a run's per-block k-NN table (``per_block.csv``) and curve (``per_block.png``),
  written beside its ``metrics.csv`` whenever its rows are written (``sslbench run`` and ``sslbench eval``).
* :func:`write_leaderboard_plots` (``sslbench leaderboard --plots``): the per-block curve of every run that has
  per-block rows, and per evaluation protocol a bar chart of the main metrics of every leaderboard row (bars of
  different protocols are never drawn side by side, as their numbers are not comparable).

Per-block rows are those of the ``per_block`` evaluator: metric ``top1``/``top5``, variant
``k=<k>,block=<i>,<raw|normed>[,std][,ema]``. The curves show top-1 at the largest k, one line per token stream
(and per stage when a run evaluated several).

Plots use matplotlib's Agg backend (no display) and are written atomically.
"""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path

import pandas as pd

from sslbench.core.io import atomic_write_bytes

PER_BLOCK_VARIANT = re.compile(r"^k=(?P<k>\d+),block=(?P<block>\d+),(?P<stream>(?:raw|normed)(?:,[^,]+)*)$")
#: The headline (evaluator, metric, variant prefix) of each evaluator, drawn in the leaderboard's bar chart.
MAIN_METRICS = (("knn", "top1", ""), ("linear_probe", "top1", "best"), ("low_shot", "top1", ""),
                ("clustering", "acc", ""), ("clustering", "nmi", ""))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's first import
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")   # keeps a legend placed outside
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def per_block_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The per-block rows of ``rows`` as a table: one line per (stage, block), one column per
    ``<metric>@k=<k>,<stream>`` (e.g. ``top1@k=20,raw``). Empty when there are no per-block rows."""
    if rows.empty or "evaluator" not in rows:
        return pd.DataFrame()
    from sslbench.core.evaluator import format_variant
    from sslbench.results.metrics import row_fields

    rows = rows[rows["evaluator"] == "per_block"]
    # rows written before the variant fields were recorded (2026-11-29) have only the text: read it once, here
    legacy = rows["variant"].str.extract(PER_BLOCK_VARIANT)
    k, block, stream = [], [], []
    for fields, (_, old) in zip(row_fields(rows), legacy.iterrows()):
        if fields is None:
            k.append(old["k"]), block.append(old["block"]), stream.append(old["stream"])
        else:
            k.append(fields.get("k")), block.append(fields.get("block"))
            stream.append(format_variant({n: v for n, v in fields.items() if n not in ("k", "block")}))
    rows = rows.assign(k=pd.to_numeric(pd.Series(k, index=rows.index, dtype=object)),
                       block=pd.to_numeric(pd.Series(block, index=rows.index, dtype=object)),
                       stream=stream).dropna(subset=["block"])
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(column=[f"{m}@k={int(k)},{s}" for m, k, s in zip(rows["metric"], rows["k"], rows["stream"])])
    table = rows.pivot_table(index=["stage", "block"], columns="column", values="value", aggfunc="last")
    table = table.reset_index()
    table["block"] = table["block"].astype(int)
    table.columns.name = None
    return table.sort_values(["stage", "block"], kind="stable").reset_index(drop=True)


def plot_per_block_rows(rows: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path | None:
    """The per-block curve (top-1 at the largest k against block, a line per stream and stage) of ``rows``;
    ``None`` (nothing written) when they hold no per-block top-1 rows."""
    from sslbench.evaluation.per_block import plot_per_block

    table = per_block_table(rows)
    columns = [c for c in table.columns if str(c).startswith("top1@k=")]
    if not columns:
        return None
    largest = max(int(re.match(r"top1@k=(\d+)", c).group(1)) for c in columns)
    prefix = f"top1@k={largest},"
    several_stages = table["stage"].nunique() > 1
    curves = []
    for column in (c for c in columns if c.startswith(prefix)):
        for stage, block, value in zip(table["stage"], table["block"], table[column]):
            if pd.notna(value):
                label = column[len(prefix):] + (f" ({stage})" if several_stages else "")
                curves.append({"variant": label, "block": block, "value": value})
    return Path(plot_per_block(curves, path, title=title, metric=f"top1@k={largest}")) if curves else None


def write_run_per_block(run_dir: str | os.PathLike, rows: pd.DataFrame | None = None) -> list[Path]:
    """``per_block.csv`` and ``per_block.png`` beside ``run_dir/metrics.csv``, if the run has per-block rows:
    ``rows`` (all the run's rows, as :func:`sslbench.results.metrics.write_metrics` returns them), else the file's."""
    from sslbench.core.io import atomic_write_csv
    from sslbench.results.metrics import read_metrics

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    if rows is None:
        if not metrics.is_file():
            return []
        rows = read_metrics(metrics)
    table = per_block_table(rows)
    if table.empty:
        return []
    # Round away float noise: an accuracy from counts, 7504 / 10000 * 100, is stored as 75.03999999999999.
    atomic_write_csv(table.round(6), run_dir / "per_block.csv", index=False)
    written = [run_dir / "per_block.csv"]
    title = f"{run_dir.name}: k-NN accuracy per block"
    plot = plot_per_block_rows(rows, run_dir / "per_block.png", title=title)
    return written + ([plot] if plot else [])


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def main_metric_columns(board: pd.DataFrame) -> list[str]:
    """The leaderboard's headline columns (see :data:`MAIN_METRICS`), in leaderboard order, without std columns."""
    chosen = []
    for column in board.columns:
        match = re.match(r"^([^/]+)/([^\[]+)(?:\[(.*)\])?$", str(column))
        if match is None or str(column).endswith(" std"):
            continue
        evaluator, metric, variant = match.group(1), match.group(2), match.group(3) or ""
        if any(evaluator == e and metric == m and variant.startswith(v) for e, m, v in MAIN_METRICS):
            chosen.append(column)
    return chosen


def _labels(group: pd.DataFrame) -> list[str]:
    """Bar labels: the objective, made unique with the stage and then the checkpoint where needed."""
    labels = list(group["objective"].astype(str))
    for extra in ("stage", "checkpoint"):
        if len(set(labels)) == len(labels):
            break
        labels = [f"{label} · {value}" for label, value in zip(labels, group[extra].astype(str))]
    return labels


def value_axis_limits(values: list[float]) -> tuple[float, float]:
    """The bar chart's value range: refinements move accuracies by tenths of a point, which an axis from 0 would
    hide, so it spans the bars with a margin of half their spread (at least 1 point), never below 0."""
    low, high = min(values), max(values)
    margin = max(1.0, 0.5 * (high - low))
    return max(0.0, low - margin), high + margin


def plot_main_metrics(group: pd.DataFrame, columns: list[str], path: Path, title: str) -> Path:
    """Grouped bars: one group per metric column, one bar per leaderboard row (error bars: std over seeds)."""
    plt = _pyplot()
    rows = len(group)
    width = 0.8 / rows
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(columns) * max(1, rows / 2) + 2), 4.5))
    try:
        shown: list[float] = []
        for i, (label, (_, record)) in enumerate(zip(_labels(group), group.iterrows())):
            # A missing cell is NaN: no bar, rather than a bar at 0 that reads as a result.
            values = [float(record[c]) if pd.notna(record[c]) else math.nan for c in columns]
            errors = [float(record[f"{c} std"]) if f"{c} std" in record and pd.notna(record[f"{c} std"]) else 0.0
                      for c in columns]
            positions = [j + (i - (rows - 1) / 2) * width for j in range(len(columns))]
            bars = axes.bar(positions, values, width, yerr=errors if any(errors) else None, label=label, capsize=2)
            axes.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.2f}" for v in values], fontsize=6,
                           rotation=90, padding=2)
            shown += [v - e for v, e in zip(values, errors) if not math.isnan(v)]
            shown += [v + e for v, e in zip(values, errors) if not math.isnan(v)]
        if shown:
            axes.set_ylim(*value_axis_limits(shown))
        axes.set_xticks(range(len(columns)))
        axes.set_xticklabels(columns, rotation=30, ha="right", fontsize=7)
        axes.set_ylabel("value (%)")
        axes.set_title(title, fontsize=9)
        axes.grid(axis="y", alpha=0.3)
        # Beside the axes: inside, a long legend (one line per run) hides the bars and their values.
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        figure.tight_layout()
        return _save(figure, path)
    finally:
        plt.close(figure)


def write_leaderboard_plots(rows: pd.DataFrame, board: pd.DataFrame, out_dir: str | os.PathLike) -> list[Path]:
    """PNGs in ``out_dir``: ``per_block_<run>.png`` per run with per-block rows (others are skipped) and
    ``metrics_<protocol>.png`` per protocol hash with headline metrics. Returns the written paths."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    if not rows.empty and "run_dir" in rows:
        used: set[str] = set()
        for run_dir, run_rows in rows.groupby("run_dir", sort=True):
            name = _safe(Path(str(run_dir)).name)
            while name in used:
                name += "_"
            used.add(name)
            title = f"{Path(str(run_dir)).name} ({run_rows['objective'].iloc[-1]}): k-NN accuracy per block"
            plot = plot_per_block_rows(run_rows, out_dir / f"per_block_{name}.png", title=title)
            if plot is not None:
                written.append(plot)
    columns = main_metric_columns(board)
    if columns and not board.empty:
        for protocol, group in board.groupby("protocol_hash", sort=True):
            present = [c for c in columns if group[c].notna().any()]
            if present:
                title = f"main metrics — {', '.join(sorted(set(group['dataset'])))}, protocol {str(protocol)[:12]}"
                written.append(plot_main_metrics(group, present, out_dir / f"metrics_{_safe(str(protocol)[:12])}.png",
                                                 title))
    return written
