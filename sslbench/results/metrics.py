"""Metric rows, each run's ``metrics.csv``, and the leaderboard built from all runs.

Every number sslbench reports is one :class:`MetricRow`: what was measured (evaluator, metric, variant, value),
on what (objective chain, backbone, dataset, checkpoint, stage, seed) and under which protocol (``protocol_hash``:
evaluation data, preprocessing and evaluator options — see :func:`sslbench.training.recipe.protocol_hash`), plus the
software versions and hardware that produced it. A run writes its rows to ``<run_dir>/metrics.csv``;
``sslbench leaderboard`` reads every run's file and pivots them into one table.

Leaderboard aggregation (the choice, documented): rows are grouped by (objective, backbone, dataset, checkpoint,
stage, protocol_hash) — rows with different protocol hashes are never merged, because their numbers are not
comparable. Within a group, each seed contributes its **latest** value (a re-run of the same seed replaces the old
number); the cell is the **mean over seeds**, a ``<column> std`` column holds the sample standard deviation
(ddof 1; empty with a single seed) and ``seeds`` counts the seeds. ``stage`` is part of the key so that an evaluation
after an intermediate stage is never averaged with the final one.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from sslbench.core.errors import UserError
from sslbench.core.io import atomic_write_csv, atomic_write_text, file_lock

__all__ = ["MetricRow", "COLUMNS", "ROW_KEY", "LEADERBOARD_KEY", "hardware_description", "versions",
           "write_metrics", "read_metrics", "collect_runs", "build_leaderboard", "leaderboard_markdown",
           "write_leaderboard", "metric_column"]


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """``{"sslbench_version", "torch_version", "timm_version"}`` of the running environment.

    Read from package metadata, so asking costs no ``import timm`` (~4 s); an already imported module wins, since
    an editable or source install may not match its metadata.
    """
    def version(name: str) -> str:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__version__", None):
            return str(module.__version__)
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    from sslbench.core.version import __version__ as sslbench_version

    return {"sslbench_version": sslbench_version, "torch_version": version("torch"),
            "timm_version": version("timm")}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@lru_cache(maxsize=1)
def hardware_description() -> str:
    """What ran the computation: ``"2x NVIDIA A100-SXM4-80GB"`` with CUDA, else ``"cpu: 2 cores AMD EPYC"``.

    CPU cores are those this process may use (its affinity mask), which is what bounds the speed.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        counts: dict[str, int] = {}
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        return ", ".join(f"{n}x {name}" for name, n in counts.items())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return f"cpu: {cores} cores {_cpu_model()}"


def _now() -> str:
    # ISO 8601 in UTC, to the microsecond: sorts as text and lets "latest wins" tell rapid re-runs apart.
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass
class MetricRow:
    """One measured number and everything needed to compare it fairly. Environment fields fill themselves in.

        >>> row = MetricRow(run_id="quick-seed0", recipe_hash="ab", protocol_hash="cd", objective="mae",
        ...                 backbone="vit_tiny", dataset="fmnist", checkpoint="", seed=0, stage="pretrain",
        ...                 evaluator="knn", metric="top1", variant="k=20", value=0.81)
        >>> row.as_dict()["metric"], row.hardware.startswith(("cpu", "1x", "2x", "4x", "8x"))
        ('top1', True)
    """

    run_id: str
    recipe_hash: str
    protocol_hash: str
    objective: str
    backbone: str
    dataset: str
    checkpoint: str
    seed: int
    stage: str
    evaluator: str
    metric: str
    variant: str
    value: float
    selection_split: str = "none"
    sslbench_version: str = field(default_factory=lambda: versions()["sslbench_version"])
    torch_version: str = field(default_factory=lambda: versions()["torch_version"])
    timm_version: str = field(default_factory=lambda: versions()["timm_version"])
    hardware: str = field(default_factory=hardware_description)
    timestamp: str = field(default_factory=_now)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(MetricRow))
# Within one run, a (stage, evaluator, metric, variant) has exactly one value; writing it again replaces it.
ROW_KEY: tuple[str, ...] = ("stage", "evaluator", "metric", "variant")
# One leaderboard row per model-and-protocol; see the module docstring for why `stage` is included.
LEADERBOARD_KEY: tuple[str, ...] = ("objective", "backbone", "dataset", "checkpoint", "stage", "protocol_hash")
_TEXT_COLUMNS = tuple(c for c in COLUMNS if c not in ("seed", "value"))


def _as_record(row: MetricRow | Mapping[str, Any], i: int) -> dict[str, Any]:
    """A full row dict; a mapping gets the environment fields (versions, hardware, timestamp) filled in, and its
    variant ``fields`` (a dict) become their JSON text, in their order."""
    if isinstance(row, MetricRow):
        return row.as_dict()
    if isinstance(row.get("fields"), Mapping):
        row = {**row, "fields": json.dumps(dict(row["fields"]))}
    known = {k: v for k, v in row.items() if k in COLUMNS}
    try:
        filled = MetricRow(**known).as_dict()
    except TypeError as exc:  # a required column is missing: a bug in the caller, not a user error
        raise ValueError(f"metric row {i}: {exc}") from exc
    return {**filled, **{k: v for k, v in row.items() if k not in COLUMNS}}


def _as_frame(rows: Iterable[MetricRow | Mapping[str, Any]]) -> pd.DataFrame:
    records = [_as_record(row, i) for i, row in enumerate(rows)]
    frame = pd.DataFrame.from_records(records, columns=_column_order(records))
    return _normalise(frame)


def _column_order(records: list[dict]) -> list[str]:
    extra = sorted({k for record in records for k in record} - set(COLUMNS))
    return list(COLUMNS) + extra


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Fix column types so rows from memory and rows read back from CSV compare and group identically."""
    frame = frame.copy()
    for column in (*_TEXT_COLUMNS, "fields"):
        if column in frame:
            frame[column] = frame[column].fillna("").astype(str)
    if "seed" in frame:
        frame["seed"] = pd.to_numeric(frame["seed"], errors="coerce").astype("Int64")
    if "value" in frame:
        frame["value"] = pd.to_numeric(frame["value"], errors="coerce").astype(float)
    return frame


def read_metrics(path: str | os.PathLike) -> pd.DataFrame:
    """One ``metrics.csv`` as a DataFrame (empty strings stay empty strings, not NaN)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=list(COLUMNS))
    except pd.errors.ParserError as exc:
        raise UserError(f"{path}: not a readable metrics CSV ({exc})") from exc
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing columns {', '.join(missing)}; expected a metrics.csv written by sslbench")
    return _normalise(frame)


def write_metrics(run_dir: str | os.PathLike, rows: Iterable[MetricRow | Mapping[str, Any]]) -> pd.DataFrame:
    """Add ``rows`` to ``run_dir/metrics.csv``, replacing earlier rows with the same (stage, evaluator, metric,
    variant). Idempotent: writing the same rows twice leaves one copy. Atomic, under a lock on ``metrics.csv.lock``.
    Returns every row of the run (earlier stages' included), as written.
    """
    path = Path(run_dir) / "metrics.csv"
    new = _as_frame(rows)
    if new.duplicated(list(ROW_KEY)).any():
        dupes = new.loc[new.duplicated(list(ROW_KEY), keep=False), list(ROW_KEY)].drop_duplicates()
        raise ValueError(f"metric rows repeat a (stage, evaluator, metric, variant): {dupes.values.tolist()}")
    with file_lock(path.with_name(path.name + ".lock")):
        if path.exists():
            old = read_metrics(path)
            replaced = old.set_index(list(ROW_KEY)).index.isin(new.set_index(list(ROW_KEY)).index)
            combined = pd.concat([old.loc[~replaced], new], ignore_index=True)
        else:
            combined = new
        columns = list(COLUMNS) + sorted(set(combined.columns) - set(COLUMNS))
        atomic_write_csv(combined[columns], path)
    return _normalise(combined[columns])


def collect_runs(root: str | os.PathLike) -> pd.DataFrame:
    """All rows of every ``metrics.csv`` below ``root`` (recursively), with a ``run_dir`` column added."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such results folder; expected a folder holding run folders with metrics.csv")
    frames = []
    for path in sorted(root.rglob("metrics.csv")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts[:-1]):
            continue  # half-built atomic directories (.tmp-*) and hidden folders are not runs
        frame = read_metrics(path)
        frame["run_dir"] = str(path.parent)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*COLUMNS, "run_dir"])
    return pd.concat(frames, ignore_index=True)


def metric_column(evaluator: str, metric: str, variant: str) -> str:
    """Leaderboard column name: ``evaluator/metric[variant]`` (no brackets when the variant is empty)."""
    return f"{evaluator}/{metric}[{variant}]" if variant else f"{evaluator}/{metric}"


def row_fields(rows: pd.DataFrame) -> list[dict[str, Any] | None]:
    """Each row's variant fields (the ``fields`` column, JSON); ``None`` for a row written before sslbench recorded
    them (2026-11-29), which only has the ``variant`` text."""
    if "fields" not in rows:
        return [None] * len(rows)
    return [json.loads(text) if text else None for text in rows["fields"]]


def _column_variant(fields: dict | None, variant: str, checkpoint: str) -> str:
    """The variant a leaderboard column is named by: the fields without ``ema`` — an EMA row's checkpoint already
    says ``(ema)`` (part of the row key), so the EMA of one run and the encoder of another share columns."""
    from sslbench.core.evaluator import format_variant

    labelled = str(checkpoint).endswith("(ema)")      # without the label the marker stays: nothing else tells
    if fields is not None:
        return format_variant({k: v for k, v in fields.items() if not (k == "ema" and labelled)})
    # rows from before the fields were recorded: the text, with its "ema" part dropped for an "(ema)" checkpoint
    return ",".join(part for part in str(variant).split(",") if not (part == "ema" and labelled))


def _natural_key(text: str) -> tuple:
    """Sort ``k=10`` before ``k=100`` and ``b2`` before ``b11``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def build_leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """Pivot metric rows into one row per (objective, backbone, dataset, checkpoint, stage, protocol_hash).

    Columns: the key, ``seeds`` (number of seeds aggregated), ``latest_run`` (most recent contributing run id), then
    one column per ``evaluator/metric[variant]`` holding the mean over seeds of each seed's latest value, followed by
    its ``std`` column when some cell aggregates several seeds. Rows are sorted by dataset, backbone, protocol,
    checkpoint, objective and stage; metric columns by evaluator, metric and variant (natural order).
    """
    key = list(LEADERBOARD_KEY)
    if df.empty:
        return pd.DataFrame(columns=[*key, "seeds", "latest_run"])
    rows = _normalise(df)
    variants = [_column_variant(f, v, c) for f, v, c in zip(row_fields(rows), rows["variant"], rows["checkpoint"])]
    rows["column"] = [metric_column(e, m, v) for e, m, v in zip(rows["evaluator"], rows["metric"], variants)]
    rows["_time"] = pd.to_datetime(rows["timestamp"], utc=True, errors="coerce", format="ISO8601")
    rows["_seed"] = rows["seed"].astype("float").fillna(-1)  # a row without a seed still counts, as its own seed
    # Latest wins per (model, protocol, seed, column): a re-run of a seed replaces, it does not add a sample.
    rows = rows.sort_values("_time", kind="stable")
    latest = rows.drop_duplicates([*key, "_seed", "column"], keep="last")

    grouped = latest.groupby([*key, "column"], sort=False)["value"]
    means = grouped.mean().unstack("column")
    stds = grouped.std(ddof=1).unstack("column")
    counts = grouped.count().unstack("column")
    per_model = latest.groupby(key, sort=False)
    info = pd.DataFrame({"seeds": per_model["_seed"].nunique(),
                         "latest_run": per_model.apply(lambda g: g.loc[g["_time"].idxmax(), "run_id"]
                                                       if g["_time"].notna().any() else g["run_id"].iloc[-1],
                                                       include_groups=False)})

    metric_columns = sorted(means.columns, key=_natural_key)
    board = info.join(means[metric_columns])
    for column in reversed(metric_columns):
        if (counts[column] > 1).any():
            position = board.columns.get_loc(column) + 1
            board.insert(position, f"{column} std", stds[column])
    board = board.reset_index()
    order = ["dataset", "backbone", "protocol_hash", "checkpoint", "objective", "stage"]
    board = board.sort_values(order, key=lambda s: s.map(_natural_key), kind="stable").reset_index(drop=True)
    board["seeds"] = board["seeds"].astype(int)
    board.columns.name = None
    return board


def _format_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:#.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def leaderboard_markdown(board: pd.DataFrame) -> str:
    """A GitHub Markdown table of the leaderboard: ``mean ± std`` cells, protocol hashes shortened to 12 characters.

    Written by hand rather than with ``DataFrame.to_markdown`` to avoid a dependency on ``tabulate``.
    """
    std_suffix = " std"
    columns = [c for c in board.columns if not c.endswith(std_suffix)]
    # Numbers right-aligned, text left-aligned.
    lines = ["| " + " | ".join(_format_cell(c) for c in columns) + " |",
             "|" + "".join(" ---: |" if _is_numeric(board, c) else " --- |" for c in columns)]
    for _, record in board.iterrows():
        cells = []
        for column in columns:
            value = record[column]
            if column == "protocol_hash":
                cells.append(_format_cell(str(value)[:12]))
                continue
            cell = _format_cell(value)
            std = record.get(column + std_suffix)
            if cell and std is not None and not pd.isna(std):
                cell = f"{cell} ± {float(std):.2g}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _is_numeric(board: pd.DataFrame, column: str) -> bool:
    return pd.api.types.is_numeric_dtype(board[column])


def write_leaderboard(board: pd.DataFrame, out_csv: str | os.PathLike) -> tuple[Path, Path]:
    """Write the leaderboard as CSV and as Markdown beside it (``.md``), atomically, under a file lock."""
    out_csv = Path(out_csv)
    out_md = out_csv.with_suffix(".md")
    with file_lock(out_csv.with_name(out_csv.name + ".lock")):
        _write_leaderboard_files(board, out_csv, out_md)
    return out_csv, out_md


def _write_leaderboard_files(board: pd.DataFrame, out_csv: Path, out_md: Path) -> None:
    header = ("# sslbench leaderboard\n\n"
              "One row per (objective, backbone, dataset, checkpoint, stage, protocol); rows of different protocol "
              "hashes are never merged. Cells are the mean ± sample std over seeds (each seed's latest run).\n\n")
    atomic_write_csv(board, out_csv)
    atomic_write_text(out_md, header + leaderboard_markdown(board))


def refresh_leaderboard(runs_root: str | os.PathLike, out_csv: str | os.PathLike) -> tuple[Path, Path]:
    """Rebuild the leaderboard from every run below ``runs_root`` and write it, all under the leaderboard's lock:
    collecting outside the lock would let a writer that read older rows replace a newer board."""
    out_csv = Path(out_csv)
    out_md = out_csv.with_suffix(".md")
    with file_lock(out_csv.with_name(out_csv.name + ".lock")):
        _write_leaderboard_files(build_leaderboard(collect_runs(runs_root)), out_csv, out_md)
    return out_csv, out_md
