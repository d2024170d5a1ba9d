"""Intervals and paired tests on cases whose answers are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from sslbench.results.statistics import (binomial_interval, bootstrap_interval, mcnemar_test, paired_bootstrap,
                                         seed_interval)


def test_clopper_pearson_closed_forms_and_definition():
    # 0 of n and n of n have closed forms: the one-sided bound solves (1 − p)^n = α/2, resp. p^n = α/2.
    assert binomial_interval(0, 10).low == 0.0
    assert binomial_interval(0, 10).high == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-12)    # 0.30850
    assert binomial_interval(10, 10).low == pytest.approx(0.025 ** (1 / 10), abs=1e-12)        # 0.69150
    low, high = binomial_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.1871, 0.8129)
    # the definition: at the bounds, the observed count is exactly at the α/2 tail
    low, high = binomial_interval(7, 20)
    assert stats.binom.sf(6, 20, low) == pytest.approx(0.025, abs=1e-9)      # P(X ≥ 7 | low) = α/2
    assert stats.binom.cdf(7, 20, high) == pytest.approx(0.025, abs=1e-9)    # P(X ≤ 7 | high) = α/2
    # the quickstart's interval quoted in the README: 294 of 450 digits
    assert binomial_interval(294, 450).half_width == pytest.approx(0.044, abs=0.001)
    with pytest.raises(ValueError):
        binomial_interval(11, 10)


def test_seed_interval_is_student_t():
    interval = seed_interval([1.0, 2.0, 3.0])
    assert interval.estimate == 2.0
    assert interval.half_width == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-12)   # t(0.975, 2)·s/√n
    single = seed_interval([0.7])
    assert (single.low, single.high, single.method) == (0.7, 0.7, "single seed")


def test_bootstrap_interval_matches_the_normal_approximation_and_is_seeded():
    correct = np.r_[np.ones(200), np.zeros(200)]                     # 50% of 400
    interval = bootstrap_interval(correct, resamples=4000, seed=1)
    assert interval.estimate == 0.5
    assert interval.half_width == pytest.approx(1.96 * math.sqrt(0.25 / 400), abs=0.006)      # ≈ 0.049
    assert bootstrap_interval(correct, seed=3) == bootstrap_interval(correct, seed=3)
    constant = bootstrap_interval(np.ones(50))
    assert (constant.low, constant.high) == (1.0, 1.0)


def test_mcnemar_counts_only_the_discordant_samples():
    # a alone right on 10 samples, b alone right on 2, both right on 50, both wrong on 38
    a = np.r_[np.ones(10), np.zeros(2), np.ones(50), np.zeros(38)].astype(bool)
    b = np.r_[np.zeros(10), np.ones(2), np.ones(50), np.zeros(38)].astype(bool)
    test = mcnemar_test(a, b)
    assert test.p_value == pytest.approx(2 * (1 + 12 + 66) / 4096, abs=1e-12)      # 2·P(Bin(12, ½) ≤ 2) = 0.0386
    assert test.significant and test.difference == pytest.approx(0.08)
    assert mcnemar_test(b, a).p_value == test.p_value
    balanced = np.r_[np.ones(3), np.zeros(3)].astype(bool)
    assert mcnemar_test(balanced, ~balanced).p_value == 1.0                         # 3 vs 3: no evidence
    assert mcnemar_test(a, a).p_value == 1.0


def test_paired_bootstrap_known_answers():
    same = np.r_[np.ones(30), np.zeros(20)].astype(bool)
    equal = paired_bootstrap(same, same)
    assert (equal.difference, equal.low, equal.high, equal.p_value) == (0.0, 0.0, 0.0, 1.0)
    better = np.r_[np.ones(60), np.zeros(40)].astype(bool)
    worse = np.r_[np.ones(40), np.zeros(60)].astype(bool)                # a is right wherever b is, and on 20 more
    test = paired_bootstrap(better, worse, seed=0)
    assert test.difference == pytest.approx(0.2) and test.low > 0 and test.p_value == 0.0 and test.significant
    with pytest.raises(ValueError):
        paired_bootstrap(better, worse[:10])


def test_bootstrap_of_two_samples_has_a_hand_computed_interval():
    # Resampling [0, 1] twice gives the means 0, ½, 1 with probabilities ¼, ½, ¼: the 2.5% and 97.5% quantiles of
    # any large number of resamples are 0 and 1 (each end holds ~25% of them, far more than 2.5%).
    interval = bootstrap_interval([0.0, 1.0], resamples=2000, seed=7)
    assert (interval.estimate, interval.low, interval.high) == (0.5, 0.0, 1.0)


def test_resampling_in_chunks_draws_the_same_resamples():
    from sslbench.results.statistics import _resampled_means

    x = np.random.default_rng(0).random(1000)
    assert np.array_equal(_resampled_means(x, 300, seed=5), _resampled_means(x, 300, seed=5, chunk_elements=10_000))


def test_nmi_matches_scikit_learn_and_takes_bootstrap_weights():
    from sklearn.metrics import normalized_mutual_info_score

    from sslbench.results.statistics import jackknife_interval, nmi

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    clusters = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 5, 300))
    assert nmi(labels, clusters) == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-12)
    assert nmi(labels, labels + 10) == pytest.approx(1.0)                  # a relabelling is a perfect match
    # weights are multiplicities: weight 2 on a sample is the sample listed twice
    weights = rng.integers(0, 3, 300)
    repeated = np.repeat(np.arange(300), weights)
    assert nmi(labels, clusters, weights) == pytest.approx(
        normalized_mutual_info_score(labels[repeated], clusters[repeated]), abs=1e-12)
    # the jackknife computed once per distinct (label, cluster) equals the textbook delete-one loop over all samples
    interval = jackknife_interval(lambda w: nmi(labels, clusters, w), np.stack([labels, clusters], 1))
    loo = np.array([nmi(np.delete(labels, i), np.delete(clusters, i)) for i in range(300)])
    se = math.sqrt(299 / 300 * ((loo - loo.mean()) ** 2).sum())
    assert interval.estimate == pytest.approx(nmi(labels, clusters))
    assert interval.half_width == pytest.approx(1.959963984540054 * se, rel=1e-9)


def test_paired_tests_of_fractions_statistics_and_seeds():
    from sslbench.results.statistics import nmi, paired_jackknife, welch_test

    # fractions: a gets 2 of 3 splits right where b gets 1 of 3, everywhere → a difference of exactly 1/3
    test = paired_bootstrap(np.full(40, 2 / 3), np.full(40, 1 / 3))
    assert test.difference == pytest.approx(1 / 3) and test.low == pytest.approx(1 / 3) and test.significant
    # a statistic compared with itself: no difference at all
    labels = np.arange(60) % 3
    same = paired_jackknife(lambda w: nmi(labels, labels, w), lambda w: nmi(labels, labels, w), labels)
    assert (same.difference, same.p_value) == (0.0, 1.0)
    # a clustering equal to the labels against one that ignores them: NMI 1 vs 0, clearly different
    blind = np.zeros(60, dtype=int)
    versus = paired_jackknife(lambda w: nmi(labels, labels, w), lambda w: nmi(labels, blind, w),
                              np.stack([labels, blind], 1))
    assert versus.difference == pytest.approx(1.0) and versus.significant
    # Welch: scipy's ttest_ind(equal_var=False)
    a, b = [80.1, 80.9, 81.4], [78.0, 78.6, 79.9, 78.2]
    welch = welch_test(a, b)
    assert welch.p_value == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    assert welch.low < welch.difference < welch.high and welch.significant
    with pytest.raises(ValueError):
        welch_test([1.0], [2.0, 3.0])


def test_seed_test_chooses_welch_or_the_one_sample_test():
    from sslbench.results.statistics import seed_test

    refined, base = [64.2, 63.1, 65.0], 61.0
    test = seed_test(refined, [base], fixed_b=True)                      # seeds of a refinement vs its one start
    assert test.p_value == pytest.approx(stats.ttest_1samp(refined, base).pvalue, rel=1e-9)
    assert test.difference == pytest.approx(np.mean(refined) - base) and test.low < test.difference < test.high
    assert seed_test(refined, [base]) is None                            # another recipe's one seed: a random draw
    assert "Welch" in seed_test(refined, [60.0, 61.5]).method
    assert seed_test([1.0], [2.0]) is None
    # identical seeds: no spread, no test over seeds (the paired test decides); the functions say p = 1
    assert seed_test([63.5, 63.5], [61.0], fixed_b=True) is None and seed_test([2.0, 2.0], [1.0, 1.0]) is None
    from sslbench.results.statistics import one_sample_t, welch_test

    assert one_sample_t([63.5, 63.5], 61.0).p_value == 1.0 and welch_test([2.0, 2.0], [1.0, 1.0]).p_value == 1.0
