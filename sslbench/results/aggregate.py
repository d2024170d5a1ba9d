"""From metric rows to leaderboard entries: one model under one protocol, its results over seeds, with intervals.

An **entry** is what the leaderboard shows as one row: the rows of every run that share (objective, backbone,
dataset, checkpoint, stage, protocol hash) and the recipe up to its seed — the seeds of one recipe (``--seed N`` runs
share the checkpoint label), each contributing its latest value. Rows of different protocol hashes are never merged: their numbers are not
comparable. ``stage`` is part of the key, so an evaluation after an intermediate stage is never averaged with the
final one; an EMA's checkpoint label ends in ``(ema)``, so it is an entry of its own.

Each result of an entry (evaluator, metric, variant) gets the mean over seeds and a 95% interval
(``docs/statistics.md``):

* two or more seeds: the Student-t interval over the seeds (training noise and test-set noise together);
* one seed with a per-sample record (``predictions.npz``): over the test samples — exact Clopper–Pearson for a 0/1
  accuracy, the percentile bootstrap for a mean of fractions (low-shot over splits), the jackknife for NMI;
* otherwise none (rows written before sslbench kept per-sample records, 2026-11-29; and metrics such as AMI that
  are not resampled).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sslbench.core.evaluator import PerSample, format_variant
from sslbench.results.metrics import LEADERBOARD_KEY, normalise, row_fields, run_recipe
from sslbench.results.predictions import FILENAME, RunPredictions, read_predictions
from sslbench.results.statistics import (Interval, binomial_interval, bootstrap_interval, jackknife_interval, nmi,
                                         seed_interval)

__all__ = ["Sample", "Result", "Entry", "build_entries", "entry_name", "CONFIDENCE"]

CONFIDENCE = 0.95
#: Metrics with a ``partition`` record: recomputed from cluster ids (percent).
PARTITION_STATISTICS = {"nmi": nmi}


@dataclass
class Sample:
    """One seed's per-sample record of a result, with the test labels it was scored on."""

    record: PerSample
    labels: np.ndarray
    fingerprint: str


@dataclass
class Result:
    """One (evaluator, metric, variant) of an entry: per-seed values, their per-sample records, the interval."""

    evaluator: str
    metric: str
    variant: str                      # the column variant (an EMA's ``ema`` field dropped: its entry says so)
    fields: dict                      # the row's variant fields (parsed from the text for rows without them)
    values: dict[int, float]          # seed → value
    samples: dict[int, Sample]        # seed → per-sample record (only seeds that have one)
    selection_split: str = "none"
    interval: Interval | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.values.values())))

    def only(self, seed: int) -> "Result | None":
        """This result of one seed alone (``None`` if that seed has none), with its interval."""
        if seed not in self.values:
            return None
        single = Result(self.evaluator, self.metric, self.variant, self.fields, {seed: self.values[seed]},
                        {seed: self.samples[seed]} if seed in self.samples else {}, self.selection_split)
        single.interval = interval_of(single)
        return single

    @property
    def column(self) -> str:
        return f"{self.evaluator}/{self.metric}[{self.variant}]" if self.variant else f"{self.evaluator}/{self.metric}"


@dataclass
class Entry:
    """One leaderboard row: a model (checkpoint label, stage) under a protocol, over its seeds."""

    key: dict[str, str]               # LEADERBOARD_KEY columns
    name: str                         # short label, unique within the protocol (a run name, "/stage", "(ema)")
    start: str                        # the checkpoint training started from ("scratch" or a path)
    runs: dict[int, str]              # seed → run id
    run_dirs: dict[int, str]          # seed → run folder
    hardware: str
    versions: str
    recipe_hash: str
    timestamp: str
    family: str = ""                  # the recipe without its seed and name (see recipe_family)
    results: dict[tuple[str, str, str], Result] = field(default_factory=dict)

    @property
    def protocol(self) -> str:
        return self.key["protocol_hash"]

    @property
    def seeds(self) -> int:
        return len(self.runs)

    @property
    def ema(self) -> bool:
        return self.key["checkpoint"].endswith("(ema)")


def entry_name(checkpoint: str, run_id: str) -> str:
    """``"scratch → quickstart/mae"`` → ``"quickstart/mae"``; an evaluated file (``sslbench eval``) is named by its
    run folder; an EMA keeps its ``(ema)``."""
    if " → " in checkpoint:
        return checkpoint.split(" → ", 1)[1]
    return re.sub(r"-seed\d+$", "", run_id) + (" (ema)" if checkpoint.endswith("(ema)") else "")


def _start(checkpoint: str) -> str:
    return checkpoint.split(" → ", 1)[0] if " → " in checkpoint else checkpoint.removesuffix(" (ema)")


_SETTING = re.compile(r"^(\d+shot|[\d.]+pct)$")


def fields_from_variant(variant: str) -> dict[str, Any]:
    """Best-effort fields of a row written before ``metrics.csv`` kept them (2026-11-29), from its variant text:
    ``k=20,block=3,raw`` → ``{"k": 20, "block": 3, "stream": "raw"}``. Newer rows carry their fields."""
    from sslbench.core.evaluator import _REQUEST_PATTERN

    fields: dict[str, Any] = {}
    for part in filter(None, str(variant).split(",")):
        name, equals, value = part.partition("=")
        if equals:
            fields[name] = int(value) if value.lstrip("-").isdigit() else value
        elif _REQUEST_PATTERN.match(part):
            fields["feature"] = part
        elif part in ("raw", "normed"):
            fields["stream"] = part
        elif part in ("train", "test"):
            fields["split"] = part
        elif _SETTING.match(part):
            fields["setting"] = part
        elif part in ("std", "ema"):
            fields[part] = True
        else:
            fields["head"] = part
    return fields


def _column_variant(fields: dict | None, variant: str, checkpoint: str) -> str:
    """The variant a column is named by: the fields without ``ema`` when the checkpoint label already says
    ``(ema)``, so the EMA of one run and the encoder of another share columns."""
    labelled = str(checkpoint).endswith("(ema)")
    if fields is not None:
        return format_variant({k: v for k, v in fields.items() if not (k == "ema" and labelled)})
    return ",".join(part for part in str(variant).split(",") if not (part == "ema" and labelled))


#: What seeds of one recipe may differ in: its seed and name, and the keys the recipe hash leaves out as cosmetic
#: (``COSMETIC`` in ``sslbench/training/spec.py``), and the sections it leaves out whole (``COSMETIC_SECTIONS``);
#: ``run.compile`` / ``compile_mode`` when compile is off, as the hash leaves them out (``drop_compile_off``).
SEED_FREE = {"run": ("name", "seed", "output_dir", "checkpoint_every", "log_every", "trackers"),
             "backbone": ("checkpoint_trusted", "checkpoint_url")}
SEED_FREE_SECTIONS = ("monitor",)
SEED_FREE_OFF_COMPILE = ("compile", "compile_mode")    # COMPILE_KEYS in sslbench/training/spec.py


def recipe_family(run_dir: str) -> str:
    """A hash of the run's resolved recipe (``recipe.json``) without :data:`SEED_FREE`: equal for the seeds of one
    recipe, different once the recipe was edited between two ``--seed`` runs — which are then two rows, not one
    average. Empty for a folder without a readable ``recipe.json``."""
    import hashlib

    recipe = run_recipe(run_dir)
    if not recipe:
        return ""
    trimmed = {section: ({k: v for k, v in body.items() if k not in SEED_FREE.get(section, ())}
                         if isinstance(body, dict) else body) for section, body in recipe.items()
               if section not in SEED_FREE_SECTIONS}
    run = trimmed.get("run")
    if isinstance(run, dict) and not run.get("compile"):
        for key in SEED_FREE_OFF_COMPILE:
            run.pop(key, None)
    text = json.dumps(trimmed, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_predictions(run_dirs) -> dict[str, RunPredictions]:
    """Each run folder's ``predictions.npz``, where there is one. An unreadable file costs that run its
    intervals over test samples and its paired tests (a warning says which), not the whole leaderboard."""
    import sys

    from sslbench.core.errors import UserError

    loaded = {}
    for run_dir in sorted(set(run_dirs)):
        path = Path(run_dir) / FILENAME
        if path.is_file():
            try:
                loaded[run_dir] = read_predictions(path)
            except UserError as exc:
                print(f"warning: {exc}; its rows are shown without per-sample intervals and tests", file=sys.stderr)
    return loaded


def build_entries(rows: pd.DataFrame, predictions: dict[str, RunPredictions] | None = None) -> list[Entry]:
    """Group metric rows (``collect_runs``, with ``run_dir``) into entries with intervals; ``predictions`` maps a
    run folder to its records (default: read from the folders). Sorted by dataset, protocol and name."""
    if rows.empty:
        return []
    rows = normalise(rows)
    if "run_dir" not in rows:
        rows["run_dir"] = ""
    if predictions is None:
        predictions = load_predictions(d for d in rows["run_dir"] if d)
    rows["parsed_fields"] = row_fields(rows)
    rows["column_variant"] = [_column_variant(f, v, c) for f, v, c in zip(rows["parsed_fields"], rows["variant"],
                                                                      rows["checkpoint"])]
    rows["time_key"] = pd.to_datetime(rows["timestamp"], utc=True, errors="coerce", format="ISO8601")
    rows["seed_key"] = rows["seed"].astype("float").fillna(-1).astype(int)
    families = {d: recipe_family(d) for d in set(rows["run_dir"])}
    rows["family"] = [families[d] for d in rows["run_dir"]]
    group_key = [*LEADERBOARD_KEY, "family"]
    # Latest wins per (entry, seed, result): a re-run of a seed replaces its number, it does not add a sample.
    rows = rows.sort_values("time_key", kind="stable")
    rows = rows.drop_duplicates([*group_key, "seed_key", "evaluator", "metric", "column_variant"], keep="last")

    entries = []
    for key, group in rows.groupby(group_key, sort=False):
        family = key[-1]
        key = dict(zip(LEADERBOARD_KEY, key[:-1]))
        latest = group.iloc[-1]
        by_seed = group.drop_duplicates("seed_key", keep="last")
        entry = Entry(key=key, name=entry_name(key["checkpoint"], str(latest["run_id"])),
                      start=_start(key["checkpoint"]), runs=dict(zip(by_seed["seed_key"], by_seed["run_id"])),
                      run_dirs=dict(zip(by_seed["seed_key"], by_seed["run_dir"])), hardware=str(latest["hardware"]),
                      versions=f"sslbench {latest['sslbench_version']}, torch {latest['torch_version']}, "
                               f"timm {latest['timm_version']}",
                      recipe_hash=str(latest["recipe_hash"]), timestamp=str(latest["timestamp"]), family=family)
        for record in group.itertuples(index=False):
            result_key = (record.evaluator, record.metric, record.column_variant)
            result = entry.results.get(result_key)
            if result is None:
                fields = record.parsed_fields
                if fields is None:
                    fields = fields_from_variant(record.column_variant)
                if entry.ema:
                    fields = {k: v for k, v in fields.items() if k != "ema"}
                result = entry.results[result_key] = Result(record.evaluator, record.metric, record.column_variant,
                                                            fields, {}, {}, record.selection_split)
            result.values[record.seed_key] = float(record.value)
            run = predictions.get(record.run_dir)
            stored = run.records.get((record.stage, record.evaluator, record.metric, record.variant)) if run else None
            if stored is not None:
                result.samples[record.seed_key] = Sample(stored, run.labels, run.fingerprint)
        for result in entry.results.values():
            result.interval = interval_of(result)
        entries.append(entry)
    _make_names_unique(entries)
    return sorted(entries, key=lambda e: (e.key["dataset"], e.protocol, e.name))


def _make_names_unique(entries: list[Entry]) -> None:
    """Entries of one protocol with the same name get told apart by the first of start (one recipe started from two
    checkpoints), objective, backbone and recipe (edited between seeds) that differs among them, else by a number —
    tables and tests look rows up by name."""
    groups: dict[tuple[str, str], list[Entry]] = {}
    for entry in entries:
        groups.setdefault((entry.protocol, entry.name), []).append(entry)
    describe = (lambda e: f"from {e.start}", lambda e: e.key["objective"], lambda e: e.key["backbone"],
                lambda e: f"recipe {e.family[:8]}")
    for group in (g for g in groups.values() if len(g) > 1):
        suffix = next((d for d in describe if len({d(e) for e in group}) == len(group)), None)
        for number, entry in enumerate(group, 1):
            entry.name += f" ({suffix(entry)})" if suffix else f" #{number}"


def interval_of(result: Result, confidence: float = CONFIDENCE) -> Interval | None:
    """The result's interval, in percent (see the module docstring for which one)."""
    values = list(result.values.values())
    if len(values) >= 2:
        return seed_interval(values, confidence)
    if len(result.samples) != 1:
        return None
    sample = next(iter(result.samples.values()))
    scores = np.asarray(sample.record.values)
    if sample.record.kind == "mean":
        as_float = scores.astype(float)
        if np.isin(as_float, (0.0, 1.0)).all():
            interval = binomial_interval(int(as_float.sum()), len(as_float), confidence)
        else:
            interval = bootstrap_interval(as_float, confidence)
    elif result.metric in PARTITION_STATISTICS:
        statistic = PARTITION_STATISTICS[result.metric]
        keys = np.stack([sample.labels, scores], axis=1)
        interval = jackknife_interval(lambda w: statistic(sample.labels, scores, w), keys, confidence)
    else:
        return None
    # The record reproduces the row's value (up to its rounding); the interval is centred on the row's value.
    return Interval(values[0], 100 * interval.low, 100 * interval.high, confidence, interval.method)


def long_form(entries: list[Entry]) -> pd.DataFrame:
    """One row per run × result with every identifying column — the table pandas users pivot as they like. A row
    holds the run's own value and its interval over test samples (``low``/``high``, when it has a per-sample
    record), and its entry's mean over seeds with the entry's interval (``entry_*``)."""
    records: list[dict[str, Any]] = []
    for entry in entries:
        for result in entry.results.values():
            aggregate = result.interval
            for seed in sorted(result.values):
                # one seed: the entry's interval is that run's (computed once; a bootstrap is not free)
                interval = aggregate if len(result.values) == 1 else result.only(seed).interval
                sample = result.samples.get(seed)
                records.append({
                    "dataset": entry.key["dataset"], "protocol_hash": entry.protocol,
                    "backbone": entry.key["backbone"], "objective": entry.key["objective"], "entry": entry.name,
                    "run_id": entry.runs.get(seed, ""), "seed": seed, "start": entry.start,
                    "checkpoint": entry.key["checkpoint"], "stage": entry.key["stage"],
                    "evaluator": result.evaluator, "metric": result.metric, "variant": result.variant,
                    "fields": json.dumps(result.fields), "value": result.values[seed],
                    "low": interval.low if interval else np.nan, "high": interval.high if interval else np.nan,
                    "interval": interval.method if interval else "",
                    "entry_mean": result.mean, "entry_low": aggregate.low if aggregate else np.nan,
                    "entry_high": aggregate.high if aggregate else np.nan,
                    "entry_interval": aggregate.method if aggregate else "", "seeds": len(result.values),
                    "test_set": sample.fingerprint if sample else "", "selection_split": result.selection_split,
                    "recipe_hash": entry.recipe_hash, "hardware": entry.hardware, "versions": entry.versions,
                    "timestamp": entry.timestamp})
    return pd.DataFrame.from_records(records)
