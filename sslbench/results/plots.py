"""Tables and plots drawn from recorded metric rows — never from live results — so a figure always shows exactly
the numbers in ``metrics.csv`` and the leaderboard.

* :func:`write_run_per_block`: a run's per-block k-NN table (``per_block.csv``) and curve (``per_block.png``),
  written beside its ``metrics.csv`` whenever its rows are written (``sslbench run`` and ``sslbench eval``).
* the leaderboard's figures (all runs of a protocol on one axes) are ``sslbench.results.board_plots``.

Per-block rows are those of the ``per_block`` evaluator: metric ``top1``/``top5``, variant
``k=<k>,block=<i>,<raw|normed>[,std][,ema]``. The curves show top-1 at the largest k, one line per token stream
(and per stage when a run evaluated several).

Plots use matplotlib's Agg backend (no display) and are written atomically.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pandas as pd

from sslbench.core.io import atomic_write_bytes

PER_BLOCK_VARIANT = re.compile(r"^k=(?P<k>\d+),block=(?P<block>\d+),(?P<stream>(?:raw|normed)(?:,[^,]+)*)$")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's first import
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> Path:
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


def monitor_curve(run_dir: str | os.PathLike) -> list[tuple[float, float]]:
    """The online k-NN of a run (``"kind": "monitor"`` lines of its ``log.jsonl``, :mod:`sslbench.training.monitor`)
    as ``[(epoch, top-1), ...]``, the epochs counted over the whole run: a later stage's start from where the
    stage before it ended (its last logged epoch). Empty without monitor lines."""
    from sslbench.results.budget import read_log, run_epochs

    lines = read_log(run_dir) or []
    offsets = run_epochs(lines)
    curve = []
    for record in lines:
        value, epoch = record.get("knn_top1"), record.get("epoch")
        if record.get("kind") == "monitor" and isinstance(value, (int, float)) and isinstance(epoch, (int, float)):
            curve.append((offsets.get(int(record.get("stage", 0)), 0.0) + float(epoch), float(value)))
    return curve


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


