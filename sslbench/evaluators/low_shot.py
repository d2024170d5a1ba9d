"""Low-shot classification: multinomial logistic regression on a few labelled images per class.

Protocol of MSN (Assran et al., "Masked Siamese Networks for Label-Efficient Learning", 2022, appendix) as used by
MIM-Refiner (Alkin et al. 2024, section 4): 1, 2 and 5 images per class and 1% of the labels, 3 random splits,
mean ± standard deviation. The classifier is a multinomial logistic regression without intercept on frozen features
that are centred (with the mean of the *selected* training rows) and L2-normalised.

Penalty, precisely. METHODS gives "L2 penalty λ = 0.00025/N" (MSN passes ``lambd / N`` to cyanure, whose objective is
``mean loss + (λ/2)·||W||²``). With ``n`` the number of selected training rows, we minimise

    mean_i CE(W·x_i, y_i) + (λ/2)·||W||²_F,   λ = lam / n.

scikit-learn's ``LogisticRegression`` minimises ``C·Σ_i CE_i + ½·||W||²_F``; dividing by ``C·n`` gives the same
objective when ``1/(C·n) = λ``, i.e. ``C = 1/(λ·n) = 1/lam`` (4000 for the default ``lam = 0.00025``), independent
of ``n``. :func:`sklearn_C` returns it; the tests fit scikit-learn with exactly that value.

The problem is convex and small, so it is solved exactly (to tolerance) with full-batch L-BFGS in float64
(``torch.optim.LBFGS`` with a strong-Wolfe line search). The splits of one setting share the number of rows, so they
are stacked and solved in one L-BFGS run on the *sum* of their objectives — the problems are independent, so the sum's
minimiser is the tuple of the individual minimisers and each block's gradient is its own problem's gradient.

Sampling is nested: for every split each training row gets a random key (one seeded generator, splits drawn in order);
within each class the rows with the lowest keys are taken, so the 1-shot set of a split is contained in its
2-shot set, and so on.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .knn import as_features, as_labels, count_classes, same_width, threads_for


def sklearn_C(lam: float) -> float:
    """scikit-learn's ``C`` for our penalty ``λ = lam / n`` on the mean loss (see the module docstring)."""
    return 1.0 / lam


def rank_within_class(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each row, its position (0, 1, ...) within its class under a uniformly random order of the rows.

    Taking the rows with rank < m_c gives a uniformly random, seeded subset of m_c rows of every class c.
    """
    keys = torch.rand(labels.shape[0], generator=generator, dtype=torch.float64)
    # Sort by (label, key) in one pass: the label is the integer part, the key in [0, 1) the fraction (float64
    # keeps ~40 bits of key for up to 10^4 classes). numpy's stable sort is ~5x faster than torch's on CPU here.
    order = torch.from_numpy(np.argsort((labels.double() + keys).numpy(), kind="stable"))
    counts = torch.bincount(labels)
    class_start = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(labels)
    ranks[order] = torch.arange(labels.shape[0]) - class_start[labels[order]]
    return ranks


def fraction_per_class(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Rows to take from every class for a stratified ``fraction`` of the labels: round(f·n_c), at least 1."""
    counts = torch.bincount(labels)
    return torch.where(counts > 0, (counts.double() * fraction).round().long().clamp_min(1), counts)


def low_shot_subsets(
    train_labels: Any,
    shots: Sequence[int] = (1, 2, 5),
    fractions: Sequence[float] = (0.01,),
    splits: int = 3,
    seed: int = 0,
) -> dict[str, list[torch.Tensor]]:
    """The training rows of every setting and split: ``{"1shot": [idx_split0, ...], "1pct": [...], ...}``.

    Indices are sorted ascending. A class with fewer rows than ``k`` contributes all its rows.
    """
    labels = as_labels(train_labels, "train_labels")
    if splits < 1:
        raise UserError(f"splits: got {splits}, expected >= 1")
    if any(int(k) < 1 for k in shots):
        raise UserError(f"shots: got {list(shots)}, expected positive integers")
    if any(not 0 < f <= 1 for f in fractions):
        raise UserError(f"fractions: got {list(fractions)}, expected numbers in (0, 1]")
    generator = torch.Generator().manual_seed(seed)
    per_class = {f"{int(k)}shot": torch.full((int(labels.max()) + 1,), int(k)) for k in shots}
    per_class.update({f"{100 * f:g}pct": fraction_per_class(labels, f) for f in fractions})
    subsets: dict[str, list[torch.Tensor]] = {name: [] for name in per_class}
    with threads_for(0):                      # a few elementwise passes over the labels: one thread is plenty
        for _ in range(splits):
            ranks = rank_within_class(labels, generator)
            for name, take in per_class.items():
                subsets[name].append(torch.nonzero(ranks < take[labels]).flatten())
    return subsets


def centre_and_normalize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Subtract the mean of ``train``'s rows from every matrix, then L2-normalise each row (MSN preprocessing).

    Works on stacked problems too: ``train`` of shape (S, n, D) is centred per problem.
    """
    mean = train.mean(dim=-2, keepdim=True)
    return [F.normalize(x - mean, dim=-1) for x in (train, *others)]


def fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lam: float = 0.00025,
    max_iter: int = 1000,
    tolerance_grad: float = 1e-8,
) -> torch.Tensor:
    """Minimise ``mean CE(x W, y) + (lam / n / 2)·||W||²`` (no intercept) for a stack of S problems.

    ``x`` (S, n, D), ``y`` (S, n); returns W (S, D, C) in float64. The S objectives are summed (they are
    independent), so one L-BFGS run solves all of them.
    """
    x = x.double()
    stacks, rows, dims = x.shape
    weights = torch.zeros(stacks, dims, num_classes, dtype=torch.float64, requires_grad=True)
    penalty = lam / rows
    optimizer = torch.optim.LBFGS([weights], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance_grad,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.bmm(x, weights)
        cross_entropy = F.cross_entropy(logits.reshape(-1, num_classes), y.reshape(-1), reduction="sum") / rows
        loss = cross_entropy + 0.5 * penalty * weights.square().sum()
        loss.backward()
        return loss

    with threads_for(stacks * rows * dims * num_classes):
        optimizer.step(objective)
    return weights.detach()


def low_shot(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    shots: Sequence[int] = (1, 2, 5),
    fractions: Sequence[float] = (0.01,),
    splits: int = 3,
    seed: int = 0,
    lam: float = 0.00025,
    max_iter: int = 1000,
    tolerance_grad: float = 1e-8,
) -> dict[str, float]:
    """Low-shot top-1 accuracy (percent), mean and standard deviation over ``splits`` seeded splits.

    Returns ``{"1shot_top1": .., "1shot_top1_std": .., ..., "1pct_top1": .., "1pct_top1_std": ..}``. The standard
    deviation is the sample standard deviation (ddof = 1; 0 for a single split).
    """
    train_x = as_features(train_features, "train_features")
    test_x = as_features(test_features, "test_features")
    same_width(train_x, test_x, "train_features", "test_features")
    train_y = as_labels(train_labels, "train_labels", train_x.shape[0], "train_features")
    test_y = as_labels(test_labels, "test_labels", test_x.shape[0], "test_features")
    if lam <= 0:
        raise UserError(f"lam: got {lam}, expected > 0")
    classes = count_classes(train_y, test_y)
    test_x = test_x.double()

    subsets = low_shot_subsets(train_y, shots, fractions, splits, seed)
    largest = max(len(ix) * ix[0].numel() for ix in subsets.values()) * train_x.shape[1] * classes
    metrics: dict[str, float] = {}
    with threads_for(largest):                # everything below is as small as the largest L-BFGS problem
        for name, indices in subsets.items():
            rows = torch.stack(indices)                                           # (S, n)
            selected = train_x[rows].double()
            mean = selected.mean(dim=1, keepdim=True)
            fit_x, = centre_and_normalize(selected)
            weights = fit_logistic_regression(fit_x, train_y[rows], classes, lam, max_iter, tolerance_grad)
            # Test rows are centred with the training mean; their L2 normalisation divides a row's logits by a
            # positive number, which cannot change its argmax, so it is skipped: (x - m) W = x W - m W.
            logits = torch.einsum("nd,sdc->snc", test_x, weights) - torch.bmm(mean, weights)
            predictions = logits.argmax(dim=-1)                                   # (S, n_test)
            accuracies = 100.0 * (predictions == test_y).double().mean(dim=1)
            metrics[f"{name}_top1"] = float(accuracies.mean())
            metrics[f"{name}_top1_std"] = float(accuracies.std()) if len(indices) > 1 else 0.0
    return metrics
