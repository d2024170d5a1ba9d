"""How much of a difference is noise: intervals for one number and paired tests for two, on test-set predictions.

Pure functions on arrays (see ``docs/statistics.md`` for when each applies and the references):

* :func:`seed_interval` — several seeds of one run: mean ± Student-t half-width over the seeds;
* :func:`binomial_interval` — one seed, an accuracy of ``correct`` out of ``n`` test samples: the exact
  Clopper–Pearson interval;
* :func:`bootstrap_interval` — one seed, any mean of per-sample values: the percentile bootstrap over test samples;
* :func:`mcnemar_test` — two models scored on the same test samples: the exact McNemar test on the discordant pairs;
* :func:`paired_bootstrap` — the same question for the difference of means, with an interval.

Accuracies are fractions in [0, 1] here; multiply by 100 for percent.

    >>> low, high = binomial_interval(5, 10)
    >>> round(low, 3), round(high, 3)
    (0.187, 0.813)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "seed_interval", "binomial_interval", "bootstrap_interval", "PairedTest", "mcnemar_test",
           "paired_bootstrap"]


@dataclass(frozen=True)
class Interval:
    """``estimate`` with a two-sided interval ``[low, high]`` at ``confidence``; ``method`` says how it was made."""

    estimate: float
    low: float
    high: float
    confidence: float
    method: str

    def __iter__(self):                       # ``low, high = interval``
        return iter((self.low, self.high))

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def seed_interval(values, confidence: float = 0.95) -> Interval:
    """Mean over seeds ± ``t(1 − α/2, n − 1) · s / √n`` (Student); one seed gives a zero-width interval marked
    ``"single seed"`` — use a per-sample interval then."""
    from scipy import stats

    _check_confidence(confidence)
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("expected a non-empty 1-D sequence of per-seed values")
    mean = float(x.mean())
    if len(x) == 1:
        return Interval(mean, mean, mean, confidence, "single seed")
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half, confidence, f"t over {len(x)} seeds")


def binomial_interval(correct: int, n: int, confidence: float = 0.95) -> Interval:
    """Exact (Clopper–Pearson) interval of an accuracy ``correct / n``: the beta quantiles
    ``B(α/2; c, n − c + 1)`` and ``B(1 − α/2; c + 1, n − c)``, with 0 and 1 at the ends."""
    from scipy import stats

    _check_confidence(confidence)
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n > 0, got {correct} of {n}")
    alpha = 1 - confidence
    low = 0.0 if correct == 0 else float(stats.beta.ppf(alpha / 2, correct, n - correct + 1))
    high = 1.0 if correct == n else float(stats.beta.ppf(1 - alpha / 2, correct + 1, n - correct))
    return Interval(correct / n, low, high, confidence, f"Clopper-Pearson over {n} samples")


def bootstrap_interval(per_sample, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """Percentile bootstrap of the mean of ``per_sample`` values (e.g. 0/1 correctness): the mean of each of
    ``resamples`` resamples with replacement, and their ``α/2`` and ``1 − α/2`` quantiles. Seeded: reproducible."""
    _check_confidence(confidence)
    x = np.asarray(per_sample, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("expected a non-empty 1-D array of per-sample values")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(float(x.mean()), float(low), float(high), confidence, f"bootstrap, {resamples} resamples")


@dataclass(frozen=True)
class PairedTest:
    """The difference ``a − b`` of two models on the same samples, its interval (when the test gives one) and the
    two-sided ``p_value`` of "no difference"; ``significant`` at the level the interval was made for."""

    difference: float
    p_value: float
    low: float | None
    high: float | None
    method: str
    level: float = 0.05

    @property
    def significant(self) -> bool:
        return self.p_value < self.level


def _paired(a_correct, b_correct) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"expected two equal-length 1-D arrays of per-sample correctness, got {a.shape} and {b.shape}")
    return a, b


def mcnemar_test(a_correct, b_correct, level: float = 0.05) -> PairedTest:
    """Exact McNemar test: only the samples the two models disagree on count; under "no difference" the ``n01``
    samples only ``b`` gets right and the ``n10`` only ``a`` gets right are Binomial(n01 + n10, ½), so
    ``p = min(1, 2 · P(X ≤ min(n01, n10)))``."""
    from scipy import stats

    a, b = _paired(a_correct, b_correct)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else min(1.0, 2 * float(stats.binom.cdf(min(only_a, only_b), discordant, 0.5)))
    return PairedTest(float(a.mean() - b.mean()), p, None, None,
                      f"exact McNemar ({only_a} only a, {only_b} only b)", level)


def paired_bootstrap(a_correct, b_correct, level: float = 0.05, resamples: int = 2000, seed: int = 0) -> PairedTest:
    """Paired percentile bootstrap of the accuracy difference: the same resampled indices for both models; the
    interval is the ``level/2`` and ``1 − level/2`` quantiles, the p-value twice the smaller share of resampled
    differences on either side of 0."""
    a, b = _paired(a_correct, b_correct)
    diff = a.astype(float) - b.astype(float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.quantile(means, [level / 2, 1 - level / 2])
    if not diff.any():
        p = 1.0
    else:
        p = min(1.0, 2 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0))))
    return PairedTest(float(diff.mean()), p, float(low), float(high), f"paired bootstrap, {resamples} resamples",
                      level)
