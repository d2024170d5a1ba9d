"""The leaderboard: every run's rows grouped into entries (``aggregate``), split by (dataset, protocol hash), with
headline columns, budgets and significance marks; written as Markdown and CSV (``sslbench leaderboard``).

Files written into the results folder (the folder that holds the run folders):

* ``leaderboard.md`` — per protocol a headline table (a handful of columns a reader compares, ``mean ± half-width
  of the 95% interval``), the tested differences, and the runs behind each row (recipe hash, hardware, versions);
* ``leaderboard.csv`` — the headline tables as one machine-readable table (mean, low, high per headline column);
* ``leaderboard_long.csv`` — one row per run × metric × variant with every identifying column, the run's value
  and interval and its entry's mean and interval, to pivot in pandas;
* ``leaderboard_details.md`` — per protocol and evaluator, every result (rows) of every entry (columns).

Headline columns are chosen per protocol by the evaluators themselves
(:meth:`sslbench.core.evaluator.Evaluator.headlines`) from the results they produced, so a protocol with other
evaluators or options gets other columns.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sslbench.results.aggregate import Entry, Result, build_entries, long_form
from sslbench.results.budget import Budget, run_budget
from sslbench.results.compare import Comparison, choose_baseline, compare_results, find_base

__all__ = ["Protocol", "Leaderboard", "build", "write", "refresh", "headline_results"]


@dataclass
class Protocol:
    """The entries of one (dataset, protocol hash): comparable with each other, and only with each other."""

    dataset: str
    protocol_hash: str
    entries: list[Entry]
    labels: list[str] = field(default_factory=list)                      # headline columns, in order
    headlines: dict[str, dict[str, Result]] = field(default_factory=dict)  # entry name → label → result
    shown_fields: dict[str, str] = field(default_factory=dict)          # label → field shown instead of the value
    bases: dict[str, Entry | None] = field(default_factory=dict)
    base_seeds: dict[str, int | None] = field(default_factory=dict)    # the base run's seed, when it has several
    baseline: Entry | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    budgets: dict[str, Budget | None] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.dataset} · protocol {self.protocol_hash[:12]}"

    def mark(self, entry: Entry, label: str) -> str:
        """``▲`` / ``▼`` when ``entry`` differs significantly from its base (else from the baseline) in ``label``."""
        for relation in ("base", "baseline"):
            for c in self.comparisons:
                if c.entry == entry.name and c.label == label and c.relation == relation:
                    return ("▲" if c.difference > 0 else "▼") if c.significant else ""
        return ""


@dataclass
class Leaderboard:
    entries: list[Entry]
    protocols: list[Protocol]

    def long_form(self) -> pd.DataFrame:
        return long_form(self.entries)

    def headline_frame(self) -> pd.DataFrame:
        """One row per entry: identity, budget and, per headline column, mean / low / high and the test against
        its base."""
        records = []
        for protocol in self.protocols:
            for entry in protocol.entries:
                budget = protocol.budgets.get(entry.name)
                base = protocol.bases.get(entry.name)
                base_seed = protocol.base_seeds.get(entry.name)
                record = {"dataset": protocol.dataset, "protocol_hash": protocol.protocol_hash, "entry": entry.name,
                          "objective": entry.key["objective"], "backbone": entry.key["backbone"],
                          "start": entry.start,
                          "base": (base.name + (f" (seed {base_seed})" if base_seed is not None else "")) if base else "",
                          "seeds": entry.seeds, "epochs": budget.epochs if budget else np.nan,
                          "images_seen": budget.images if budget else np.nan,
                          "train_seconds": budget.seconds if budget and budget.seconds is not None else np.nan,
                          "hardware": entry.hardware, "versions": entry.versions, "recipe_hash": entry.recipe_hash,
                          "runs": ";".join(entry.runs[s] for s in sorted(entry.runs))}
                for label in protocol.labels:
                    result = protocol.headlines.get(entry.name, {}).get(label)
                    shown = protocol.shown_fields.get(label)
                    record[label] = (result.fields.get(shown) if shown else result.mean) if result else np.nan
                    interval = result.interval if result and not shown else None
                    record[f"{label} low"] = interval.low if interval else np.nan
                    record[f"{label} high"] = interval.high if interval else np.nan
                    test = next((c for c in protocol.comparisons if c.entry == entry.name and c.label == label
                                 and c.relation == "base"), None)
                    record[f"{label} vs base p"] = test.p_value if test else np.nan
                records.append(record)
        return pd.DataFrame.from_records(records)


def headline_results(entry: Entry, evaluator_classes: dict) -> tuple[dict[str, Result], dict[str, str]]:
    """``{label: result}`` of ``entry``'s headline columns, as its evaluators choose them, and the labels that
    show a field instead of the value."""
    by_evaluator: dict[str, list[Result]] = {}
    for result in entry.results.values():
        by_evaluator.setdefault(result.evaluator, []).append(result)
    chosen: dict[str, Result] = {}
    shown: dict[str, str] = {}
    for name, results in by_evaluator.items():
        cls = evaluator_classes.get(name)
        if cls is None:
            continue
        try:
            picks = cls.headlines([(r.metric, r.fields, r.mean) for r in results])
        except Exception as exc:    # noqa: BLE001 — a plugin's choice must not take the leaderboard down
            print(f"warning: {name}.headlines failed on {entry.name} ({type(exc).__name__}: {exc}); its results "
                  "are only in the detail tables", file=sys.stderr)
            continue
        for label, index in picks.items():
            if index is not None:
                chosen[label] = results[index]
        shown.update(getattr(cls, "headline_fields", {}))
    return chosen, shown


def _evaluator_classes() -> dict:
    """Every registered evaluator class by name (the plugins that fail to load are skipped: their rows still show
    in the detail tables)."""
    from sslbench.core.registry import get_registry

    registry = get_registry()
    classes = {}
    for name in registry.names("evaluator"):
        try:
            classes[name] = registry.get("evaluator", name).factory
        except Exception:          # noqa: BLE001 — a broken third-party plugin must not take the leaderboard down
            continue
    return classes


def build(rows: pd.DataFrame, baseline: str | None = None, evaluator_classes: dict | None = None,
          predictions=None) -> Leaderboard:
    """The leaderboard of metric rows (:func:`sslbench.results.metrics.collect_runs`)."""
    entries = build_entries(rows, predictions)
    classes = _evaluator_classes() if evaluator_classes is None else evaluator_classes
    protocols: dict[tuple[str, str], Protocol] = {}
    for entry in entries:
        key = (entry.key["dataset"], entry.protocol)
        protocols.setdefault(key, Protocol(*key, entries=[])).entries.append(entry)
    for protocol in protocols.values():
        _fill(protocol, classes, baseline)
    return Leaderboard(entries, list(protocols.values()))


def _fill(protocol: Protocol, classes: dict, baseline: str | None) -> None:
    for entry in protocol.entries:
        chosen, shown = headline_results(entry, classes)
        protocol.headlines[entry.name] = chosen
        protocol.shown_fields.update(shown)
        for label in chosen:
            if label not in protocol.labels:
                protocol.labels.append(label)
        protocol.bases[entry.name], protocol.base_seeds[entry.name] = find_base(entry, protocol.entries)
        runs = [d for d in entry.run_dirs.values() if d]
        protocol.budgets[entry.name] = run_budget(runs[0]) if runs else None
    protocol.baseline = choose_baseline(protocol.entries, protocol.bases, baseline)
    for entry in protocol.entries:
        base = protocol.bases[entry.name]
        against = [("base", base), ("baseline", protocol.baseline if protocol.baseline is not base else None)]
        for relation, other in against:
            if other is None or other is entry:
                continue
            seed = protocol.base_seeds[entry.name] if relation == "base" else None
            name = other.name + (f" (seed {seed})" if seed is not None else "")
            for label, result in protocol.headlines[entry.name].items():
                other_result = protocol.headlines.get(other.name, {}).get(label)
                if other_result is None or label in protocol.shown_fields:
                    continue
                if seed is not None:
                    other_result = other_result.only(seed)
                    if other_result is None:
                        continue
                comparison = compare_results(result, other_result, entry=entry.name, against=name,
                                             relation=relation, label=label,
                                             fixed=relation == "base" and len(other_result.values) == 1)
                if comparison is not None:
                    protocol.comparisons.append(comparison)


def write(board: Leaderboard, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard_long.csv`` and ``leaderboard_details.md`` into
    ``out_dir`` (atomically each); returns their paths."""
    from sslbench.core.io import atomic_write_csv, atomic_write_text
    from sslbench.results.markdown import details_markdown, leaderboard_markdown

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in ("leaderboard.md", "leaderboard.csv", "leaderboard_long.csv",
                                         "leaderboard_details.md")]
    atomic_write_text(paths[0], leaderboard_markdown(board))
    atomic_write_csv(board.headline_frame(), paths[1])
    atomic_write_csv(board.long_form(), paths[2])
    atomic_write_text(paths[3], details_markdown(board))
    return paths


def refresh(runs_root: str | os.PathLike) -> Path:
    """Rebuild and write the leaderboard of every run below ``runs_root`` into it, all under the leaderboard's lock:
    collecting outside the lock would let a writer that read older rows replace a newer board. Returns the path of
    ``leaderboard.md``."""
    from sslbench.core.io import file_lock
    from sslbench.results.metrics import collect_runs

    runs_root = Path(runs_root)
    with file_lock(runs_root / "leaderboard.lock"):
        write(build(collect_runs(runs_root)), runs_root)
    return runs_root / "leaderboard.md"
