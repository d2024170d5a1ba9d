"""Low-shot logistic regression against scikit-learn with the documented penalty mapping, and its sampling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslbench.core.errors import UserError
from sslbench.evaluation import low_shot
from sslbench.evaluation.low_shot import (_stable_argsort, centre_and_normalize, fit_logistic_regression,
                                          logistic_loss_and_grad, low_shot_subsets, rank_within_class, sklearn_C)


def sklearn_accuracy(xtr, ytr, xte, yte, rows, lam):
    """The protocol written independently in numpy + scikit-learn, for one split."""
    from sklearn.linear_model import LogisticRegression

    selected = xtr[rows].numpy().astype(np.float64)
    mean = selected.mean(0)
    fit = selected - mean
    fit /= np.linalg.norm(fit, axis=1, keepdims=True)
    test = xte.numpy().astype(np.float64) - mean
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the penalty API warnings of recent scikit-learn versions
        model = LogisticRegression(C=sklearn_C(lam), fit_intercept=False, tol=1e-8, max_iter=5000)
        model.fit(fit, ytr[rows].numpy())
    return 100.0 * np.mean(model.predict(test) == yte.numpy()), model


def test_accuracy_matches_sklearn_logistic_regression(clusters):
    xtr, ytr, xte, yte = clusters(n_train=500, n_test=400, classes=5, dim=24, spread=2.5)
    metrics = low_shot(xtr, ytr, xte, yte, shots=(1, 2, 5), fractions=(0.1,), splits=3, seed=0)
    subsets = low_shot_subsets(ytr, shots=(1, 2, 5), fractions=(0.1,), splits=3, seed=0)
    for name, splits in subsets.items():
        accuracies = [sklearn_accuracy(xtr, ytr, xte, yte, rows, 0.00025)[0] for rows in splits]
        assert metrics[f"{name}_top1"] == pytest.approx(np.mean(accuracies), abs=0.5), name
        assert metrics[f"{name}_top1_std"] == pytest.approx(np.std(accuracies, ddof=1), abs=0.5), name
    assert 30 < metrics["1shot_top1"] < metrics["10pct_top1"] < 100     # non-trivial, more labels help


def test_solution_is_the_penalised_optimum_and_matches_sklearn_weights(clusters):
    xtr, ytr, _, _ = clusters(n_train=200, classes=4, dim=10, spread=1.5, dtype=torch.float64)
    rows = torch.arange(40)
    lam = 0.01                                                  # stronger penalty: a well-conditioned check
    fit, = centre_and_normalize(xtr[rows])
    weights = fit_logistic_regression(fit[None], ytr[rows][None], 4, lam=lam)[0]
    w = weights.clone().requires_grad_(True)
    objective = F.cross_entropy(fit @ w, ytr[rows]) + 0.5 * (lam / rows.numel()) * w.square().sum()
    objective.backward()
    assert w.grad.abs().max() < 1e-7                          # stationary point of a convex objective
    _, model = sklearn_accuracy(xtr, ytr, xtr, ytr, rows, lam)
    np.testing.assert_allclose(weights.numpy(), model.coef_.T, atol=2e-3)


def test_hand_written_gradient_equals_autograd_of_the_objective():
    """The solver's closed-form loss and gradient against autograd of the objective written plainly, per problem."""
    g = torch.Generator().manual_seed(0)
    stacks, rows, dims, classes, penalty = 3, 7, 5, 4, 0.3
    x = torch.randn(stacks, rows, dims, generator=g, dtype=torch.float64)
    y = torch.randint(classes, (stacks, rows), generator=g)
    weights = torch.randn(stacks, dims, classes, generator=g, dtype=torch.float64)
    loss, grad_t = logistic_loss_and_grad(weights.transpose(1, 2).contiguous(), x, x.transpose(1, 2).contiguous(),
                                          y[:, None, :], penalty)
    w = weights.clone().requires_grad_(True)
    expected = sum(F.cross_entropy(x[s] @ w[s], y[s]) + 0.5 * penalty * w[s].square().sum() for s in range(stacks))
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(grad_t.transpose(1, 2), w.grad)


def test_subsets_are_seeded_stratified_and_nested():
    labels = torch.arange(7).repeat_interleave(torch.tensor([30, 40, 50, 60, 70, 80, 90]))
    subsets = low_shot_subsets(labels, shots=(1, 2, 5), fractions=(0.1,), splits=3, seed=4)
    assert {name: len(s) for name, s in subsets.items()} == {"1shot": 3, "2shot": 3, "5shot": 3, "10pct": 3}
    for split in range(3):
        for k in (1, 2, 5):
            counts = torch.bincount(labels[subsets[f"{k}shot"][split]], minlength=7)
            assert counts.tolist() == [k] * 7
        counts = torch.bincount(labels[subsets["10pct"][split]], minlength=7)
        assert counts.tolist() == [3, 4, 5, 6, 7, 8, 9]
        one, two, five = (set(subsets[f"{k}shot"][split].tolist()) for k in (1, 2, 5))
        assert one <= two <= five
    assert not torch.equal(subsets["5shot"][0], subsets["5shot"][1])       # splits differ
    again = low_shot_subsets(labels, shots=(1, 2, 5), fractions=(0.1,), splits=3, seed=4)
    assert all(torch.equal(a, b) for name in subsets for a, b in zip(subsets[name], again[name]))
    other = low_shot_subsets(labels, shots=(5,), fractions=(), splits=1, seed=5)
    assert not torch.equal(other["5shot"][0], subsets["5shot"][0])


def test_rank_within_class_is_a_permutation_per_class():
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1])
    ranks = rank_within_class(labels, torch.Generator().manual_seed(0))
    for c in range(3):
        assert sorted(ranks[labels == c].tolist()) == list(range(int((labels == c).sum())))


def test_fast_argsort_is_the_stable_argsort_with_and_without_ties():
    rng = np.random.default_rng(0)
    for values in (rng.random(5000), rng.integers(0, 50, 5000).astype(np.float64),        # distinct / heavy ties
                   np.r_[rng.random(3000), 0.5, 0.5], rng.integers(0, 3, 7) + rng.random(7), np.zeros(1)):
        np.testing.assert_array_equal(_stable_argsort(values), np.argsort(values, kind="stable"))


def test_rank_within_class_equals_the_stable_sort_definition():
    """The ranks are those of one stable sort of label + key (the subsets of every committed result)."""
    labels = torch.randint(0, 7, (3000,), generator=torch.Generator().manual_seed(5))
    ranks = rank_within_class(labels, torch.Generator().manual_seed(9))
    keys = torch.rand(3000, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    order = np.argsort((labels.double() + keys).numpy(), kind="stable")
    expected = np.empty(3000, dtype=np.int64)
    for c in range(7):
        rows = order[labels.numpy()[order] == c]
        expected[rows] = np.arange(rows.size)
    np.testing.assert_array_equal(ranks.numpy(), expected)


def test_single_split_has_zero_std_and_errors(clusters):
    xtr, ytr, xte, yte = clusters(n_train=100, n_test=50)
    metrics = low_shot(xtr, ytr, xte, yte, shots=(2,), fractions=(), splits=1)
    assert set(metrics) == {"2shot_top1", "2shot_top1_std"} and metrics["2shot_top1_std"] == 0.0
    with pytest.raises(UserError, match="fractions"):
        low_shot(xtr, ytr, xte, yte, fractions=(1.5,))
    with pytest.raises(UserError, match="shots"):
        low_shot(xtr, ytr, xte, yte, shots=(0,))
    with pytest.raises(UserError, match="lam"):
        low_shot(xtr, ytr, xte, yte, lam=0.0)
