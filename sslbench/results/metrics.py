"""Metric rows and each run's ``metrics.csv``.

Every number sslbench reports is one :class:`MetricRow`: what was measured (evaluator, metric, variant, value),
on what (objective chain, backbone, dataset, checkpoint, stage, seed) and under which protocol (``protocol_hash``:
evaluation data, preprocessing and evaluator options — see :func:`sslbench.training.recipe.protocol_hash`), plus the
software versions and hardware that produced it. A run writes its rows to ``<run_dir>/metrics.csv``;
``sslbench leaderboard`` reads every run's file (:func:`collect_runs`) and groups them into entries
(``sslbench.results.aggregate``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from sslbench.core.errors import UserError
from sslbench.core.io import atomic_write_csv, file_lock

__all__ = ["MetricRow", "COLUMNS", "ROW_KEY", "LEADERBOARD_KEY", "hardware_description", "versions",
           "write_metrics", "read_metrics", "collect_runs", "row_fields", "as_frame", "normalise", "run_recipe"]


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


def as_frame(rows: Iterable[MetricRow | Mapping[str, Any]]) -> pd.DataFrame:
    records = [_as_record(row, i) for i, row in enumerate(rows)]
    frame = pd.DataFrame.from_records(records, columns=_column_order(records))
    return normalise(frame)


def _column_order(records: list[dict]) -> list[str]:
    extra = sorted({k for record in records for k in record} - set(COLUMNS))
    return list(COLUMNS) + extra


def normalise(frame: pd.DataFrame) -> pd.DataFrame:
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
    return normalise(frame)


def write_metrics(run_dir: str | os.PathLike, rows: Iterable[MetricRow | Mapping[str, Any]]) -> pd.DataFrame:
    """Add ``rows`` to ``run_dir/metrics.csv``, replacing earlier rows with the same (stage, evaluator, metric,
    variant). Idempotent: writing the same rows twice leaves one copy. Atomic, under a lock on ``metrics.csv.lock``.
    Returns every row of the run (earlier stages' included), as written.
    """
    path = Path(run_dir) / "metrics.csv"
    new = as_frame(rows)
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
    return normalise(combined[columns])


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


def row_fields(rows: pd.DataFrame) -> list[dict[str, Any] | None]:
    """Each row's variant fields (the ``fields`` column, JSON); ``None`` for a row written before sslbench recorded
    them (2026-11-29), which only has the ``variant`` text."""
    if "fields" not in rows:
        return [None] * len(rows)
    return [json.loads(text) if text else None for text in rows["fields"]]


def run_recipe(run_dir: str | os.PathLike) -> dict:
    """The resolved recipe a run folder's ``recipe.json`` holds; ``{}`` when there is no readable one (a folder
    of rows alone still makes leaderboard rows, without a budget, a base or a recipe family)."""
    try:
        recipe = json.loads((Path(run_dir) / "recipe.json").read_text(encoding="utf-8")).get("recipe", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return recipe if isinstance(recipe, dict) else {}
