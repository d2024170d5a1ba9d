"""Which differences between leaderboard entries are more than noise: each entry against its base and a baseline.

* **Base**: a refinement is compared with the entry of the checkpoint it started from — the run whose
  ``checkpoints/backbone.pt`` it loaded (its EMA when it loaded ``sslbench_ema``), at that run's last stage, under
  the same protocol — that run's seed alone when the base row averages several; failing that, an ``sslbench eval``
  of that very file under the protocol. An entry of ``sslbench eval`` (a file evaluated as is) has no base
  itself.
* **Baseline**: one entry per protocol that every other entry is compared with — named with ``sslbench leaderboard
  --baseline NAME``, else the entry that is the base of the most others (none when no entry is a base).

The test (``docs/statistics.md``): when both entries have per-sample records on the same test set, a **paired** test
over the test samples — exact McNemar for one seed each and 0/1 scores, else the paired bootstrap of the difference of
the per-sample scores averaged over seeds; for NMI (one seed each) the paired jackknife. When a side has two or more
seeds, the test over seeds must also reject — Welch's t-test, or the one-sample t-test of several seeds against one
fixed model (a refinement's seeds against the checkpoint they started from) — so a difference that one lucky seed
makes is not called significant. Without per-sample records, the test over seeds alone; else no test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslbench.results.aggregate import PARTITION_STATISTICS, Entry, Result
from sslbench.results.metrics import run_recipe
from sslbench.results.statistics import PairedTest, mcnemar_test, paired_bootstrap, paired_jackknife, seed_test

__all__ = ["Comparison", "find_base", "choose_baseline", "compare_results", "format_p", "is_named", "recipe_name"]

LEVEL = 0.05


@dataclass(frozen=True)
class Comparison:
    """``entry − against`` for one result, in percentage points, with the test's interval and p-value."""

    entry: str
    against: str
    relation: str                      # "base" or "baseline"
    label: str                         # the result's headline label (or column)
    difference: float
    low: float | None
    high: float | None
    p_value: float
    method: str
    significant: bool


def recipe_name(run_id: str) -> str:
    """A run folder's recipe name: ``quickstart-seed2`` → ``quickstart``."""
    return re.sub(r"-seed\d+$", "", run_id)


def _base_run_of(entry: Entry) -> tuple[str, bool, str] | None:
    """(recipe name of the run whose checkpoint ``entry`` started from, whether it loaded that run's EMA, the run
    folder's name)."""
    if " → " not in entry.key["checkpoint"] or entry.start == "scratch":
        return None
    parts = Path(entry.start).parts
    if "checkpoints" not in parts or parts.index("checkpoints") == 0:
        return None
    backbone = run_recipe(next(iter(entry.run_dirs.values()), "")).get("backbone", {})
    folder = parts[parts.index("checkpoints") - 1]
    return recipe_name(folder), backbone.get("checkpoint_format") == "sslbench_ema", folder


def find_base(entry: Entry, protocol_entries: list[Entry]) -> tuple[Entry | None, int | None]:
    """The entry of the checkpoint ``entry`` started from, in the same protocol (see the module docstring), and the
    seed of the run that wrote that checkpoint when the base entry holds several seeds (``digits_mae-seed0``'s
    checkpoint is seed 0's model, not the mean of three): the comparison is with that seed alone."""
    base = _base_run_of(entry)
    if base is None:
        return None, None
    name, ema, folder = base
    candidates = [e for e in protocol_entries if e is not entry and e.ema == ema
                  and {recipe_name(r) for r in e.runs.values()} == {name}]
    if not candidates:
        # the same file evaluated with `sslbench eval` under this protocol
        evaluated = [e for e in protocol_entries if e is not entry and e.ema == ema
                     and " → " not in e.key["checkpoint"] and Path(e.start) == Path(entry.start)]
        return (evaluated[-1] if evaluated else None), None
    stages = run_recipe(next(iter(candidates[0].run_dirs.values()), "")).get("stages", [])
    last = stages[-1].get("name") if stages else None
    final = [e for e in candidates if e.key["stage"] == last]
    chosen = (final or sorted(candidates, key=lambda e: e.timestamp))[-1]
    seed = next((s for s, run in chosen.runs.items() if run == folder), None)
    if seed is None:
        return None, None      # the run that wrote the checkpoint is not in this row: another model, no base
    return chosen, (seed if chosen.seeds > 1 else None)


def is_named(entry: Entry, name: str) -> bool:
    """Whether ``name`` names ``entry``: its leaderboard name, one of its run folders or its recipe name."""
    return name == entry.name or name in entry.runs.values() or name == entry.name.split("/")[0]


def choose_baseline(protocol_entries: list[Entry], bases: dict[str, Entry | None],
                    name: str | None = None) -> Entry | None:
    """The protocol's baseline: the entry called ``name`` (entry name or run folder), else the most common base."""
    if name is not None:
        return next((entry for entry in protocol_entries if is_named(entry, name)), None)
    counts: dict[int, int] = {}
    for base in bases.values():
        if base is not None:
            counts[id(base)] = counts.get(id(base), 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    return next(e for e in protocol_entries if counts.get(id(e)) == best)


def _common_samples(a: Result, b: Result):
    fingerprints = {s.fingerprint for s in a.samples.values()} | {s.fingerprint for s in b.samples.values()}
    if not a.samples or not b.samples or len(fingerprints) != 1:
        return None
    return list(a.samples.values()), list(b.samples.values())


def _paired(a: Result, b: Result) -> PairedTest | None:
    common = _common_samples(a, b)
    if common is None:
        return None
    samples_a, samples_b = common
    kind = samples_a[0].record.kind
    if kind != samples_b[0].record.kind:
        return None
    if kind == "mean":
        scores_a = np.mean([np.asarray(s.record.values, dtype=float) for s in samples_a], axis=0)
        scores_b = np.mean([np.asarray(s.record.values, dtype=float) for s in samples_b], axis=0)
        binary = np.isin(scores_a, (0.0, 1.0)).all() and np.isin(scores_b, (0.0, 1.0)).all()
        if binary and len(samples_a) == 1 and len(samples_b) == 1:
            return mcnemar_test(scores_a.astype(bool), scores_b.astype(bool), LEVEL)
        return paired_bootstrap(scores_a, scores_b, LEVEL)
    statistic = PARTITION_STATISTICS.get(a.metric)
    if statistic is None or len(samples_a) > 1 or len(samples_b) > 1:
        return None                       # several seeds: Welch's test over them (a jackknife per seed pair is n²)
    labels, clusters_a, clusters_b = samples_a[0].labels, samples_a[0].record.values, samples_b[0].record.values
    keys = np.stack([labels, clusters_a, clusters_b], axis=1)
    return paired_jackknife(lambda w: statistic(labels, clusters_a, w), lambda w: statistic(labels, clusters_b, w),
                            keys, LEVEL)


def compare_results(a: Result, b: Result, *, entry: str, against: str, relation: str, label: str,
                    fixed: bool = False) -> Comparison | None:
    """The test of ``a − b`` (see the module docstring); ``None`` when neither records nor seeds allow one.
    ``fixed``: ``b`` is the one model ``a``'s seeds all started from, so its single value is not a random draw and
    the one-sample t-test applies; otherwise only Welch's test runs over seeds (both sides need two)."""
    paired = _paired(a, b)
    welch = seed_test(a.values.values(), b.values.values(), LEVEL, fixed_b=fixed)
    if paired is None and welch is None:
        return None
    difference = a.mean - b.mean
    if paired is not None and welch is not None:
        # both must reject; the reported p and interval are those of the test that is less sure
        significant = paired.significant and welch.significant
        method = (f"{paired.method} (p{format_p(paired.p_value, '=')}) and "
                  f"{welch.method} (p{format_p(welch.p_value, '=')})")
        if welch.p_value >= paired.p_value:
            return Comparison(entry, against, relation, label, difference, welch.low, welch.high, welch.p_value,
                              method, significant)
        low, high = _percent(paired.low), _percent(paired.high)
        return Comparison(entry, against, relation, label, difference, low, high, paired.p_value, method,
                          significant)
    if paired is not None:
        return Comparison(entry, against, relation, label, difference, _percent(paired.low), _percent(paired.high),
                          paired.p_value, paired.method, paired.significant)
    return Comparison(entry, against, relation, label, difference, welch.low, welch.high, welch.p_value,
                      welch.method, welch.significant)


def format_p(p: float, equals: str = "") -> str:
    """Two significant digits; a resampling p-value of 0 means "below one in 2000 resamples": ``<0.001``."""
    return "<0.001" if p == 0 else f"{equals}{p:.2g}"


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value
