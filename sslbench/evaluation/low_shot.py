"""Low-shot classification: multinomial logistic regression on a few labelled images per class.

Protocol of MSN (Assran et al., "Masked Siamese Networks for Label-Efficient Learning", 2022, appendix) as used by
MIM-Refiner (Alkin et al. 2024, section 4): 1, 2 and 5 images per class and 1% of the labels, 3 random splits,
mean ± standard deviation. The classifier is a multinomial logistic regression without intercept on frozen features
that are centred (with the mean of the *selected* training rows) and L2-normalised.

Penalty, precisely. The protocol (docs/evaluation.md) is "L2 penalty λ = 0.00025/N" (MSN passes ``lambd / N`` to
cyanure, whose objective is
``mean loss + (λ/2)·||W||²``). With ``n`` the number of selected training rows, we minimise

    mean_i CE(W·x_i, y_i) + (λ/2)·||W||²_F,   λ = lam / n.

scikit-learn's ``LogisticRegression`` minimises ``C·Σ_i CE_i + ½·||W||²_F``; dividing by ``C·n`` gives the same
objective when ``1/(C·n) = λ``, i.e. ``C = 1/(λ·n) = 1/lam`` (4000 for the default ``lam = 0.00025``), independent
of ``n``. :func:`sklearn_C` returns it; the tests fit scikit-learn with exactly that value.

The problem is convex and small, so it is solved exactly (to tolerance) with full-batch L-BFGS in float64
(``torch.optim.LBFGS`` with a strong-Wolfe line search) on the loss and gradient written out by hand
(:func:`logistic_loss_and_grad`). The splits of one setting share the number of rows, so they
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

from sslbench.core.errors import UserError
from sslbench.evaluation.knn import as_features, as_labels, count_classes, same_width, threads_for


def sklearn_C(lam: float) -> float:
    """scikit-learn's ``C`` for our penalty ``λ = lam / n`` on the mean loss (see the module docstring)."""
    return 1.0 / lam


def _stable_argsort(values: np.ndarray) -> np.ndarray:
    """``np.argsort(values, kind="stable")``, from numpy's ~4x faster unstable sort when no two values are equal
    (then the sorting permutation is unique, so both sorts return it); with an equal pair, the stable sort."""
    order = np.argsort(values)
    ordered = values[order]
    if bool((ordered[1:] == ordered[:-1]).any()):
        return np.argsort(values, kind="stable")
    return order


def rank_within_class(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each row, its position (0, 1, ...) within its class under a uniformly random order of the rows.

    Taking the rows with rank < m_c gives a uniformly random, seeded subset of m_c rows of every class c.
    """
    keys = torch.rand(labels.shape[0], generator=generator, dtype=torch.float64)
    # Sort by (label, key) in one pass: the label is the integer part, the key in [0, 1) the fraction (float64
    # keeps ~40 bits of key for up to 10^4 classes). numpy's stable sort is ~5x faster than torch's on CPU here.
    order = torch.from_numpy(_stable_argsort((labels.double() + keys).numpy()))
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


def logistic_loss_and_grad(
    weights_t: torch.Tensor,
    x: torch.Tensor,
    x_t: torch.Tensor,
    y: torch.Tensor,
    penalty: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and gradient of ``Σ_s [mean_i CE(x_si W_s, y_si) + (penalty/2)·||W_s||²]``, written out by hand.

    Everything is in the transposed layout: ``weights_t`` (S, C, D) holds Wᵀ, ``x`` (S, n, D) and its transpose
    ``x_t`` (S, D, n) (both contiguous), ``y`` (S, 1, n) class ids; the logits are ``Wᵀ·xᵀ`` (S, C, n). With only
    C ≈ 10 columns, ``x·W`` ran at ~5 GFLOP/s here while ``Wᵀ·xᵀ`` is about twice as fast, and the softmax over
    the middle dimension then runs along contiguous rows of n (``benchmarks/README.md``). The gradient of the softmax
    cross-entropy with respect to the logits is ``softmax − one-hot``, so ``∇Wᵀ_s = (P_s − Y_s)ᵀ·x_s/n +
    penalty·Wᵀ_s``. Written out rather than taken from autograd because the solver evaluates it a few dozen times
    per problem on small matrices, where autograd's bookkeeping costs as much as the arithmetic.
    """
    rows = x.shape[1]
    log_p = torch.log_softmax(torch.bmm(weights_t, x_t), dim=1)
    loss = -log_p.gather(1, y).sum() / rows + 0.5 * penalty * weights_t.square().sum()
    residual = log_p.exp_().scatter_add_(1, y, torch.full(y.shape, -1.0, dtype=log_p.dtype)).div_(rows)
    return loss, torch.baddbmm(weights_t, residual, x, beta=penalty)


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
    independent), so one L-BFGS run solves all of them. Stacks of *different* settings are not joined the same way:
    one run over all 12 low-shot problems took 412 evaluations against 106 for the four settings apart (the
    problems' curvatures differ, and L-BFGS's shared step and history fit none of them well).
    """
    x = x.double()
    stacks, rows, dims = x.shape
    x_t = x.transpose(1, 2).contiguous()
    y = y[:, None, :]
    penalty = lam / rows
    weights_t = torch.zeros(stacks, num_classes, dims, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights_t], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance_grad,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        with torch.no_grad():
            loss, weights_t.grad = logistic_loss_and_grad(weights_t, x, x_t, y, penalty)
        return loss

    with threads_for(stacks * rows * dims * num_classes):
        optimizer.step(objective)
    return weights_t.detach().transpose(1, 2).contiguous()


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
    return_per_sample: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Low-shot top-1 accuracy (percent), mean and standard deviation over ``splits`` seeded splits.

    Returns ``{"1shot_top1": .., "1shot_top1_std": .., ..., "1pct_top1": .., "1pct_top1_std": ..}``. The standard
    deviation is the sample standard deviation (ddof = 1; 0 for a single split). With ``return_per_sample=True``
    also ``{"1shot": fraction of the splits that classify each test sample correctly (n_test,), ...}``, whose
    mean × 100 is the setting's ``top1``.
    """
    train_x = as_features(train_features, "train_features")
    test_x = as_features(test_features, "test_features")
    same_width(train_x, test_x, "train_features", "test_features")
    train_y = as_labels(train_labels, "train_labels", train_x.shape[0], "train_features")
    test_y = as_labels(test_labels, "test_labels", test_x.shape[0], "test_features")
    if lam <= 0:
        raise UserError(f"lam: got {lam}, expected > 0")
    classes = count_classes(train_y, test_y)

    subsets = low_shot_subsets(train_y, shots, fractions, splits, seed)
    weights, means = [], []
    for indices in subsets.values():          # the splits of a setting have equal sizes: one stack, one L-BFGS run
        rows = torch.stack(indices)                                               # (S, n)
        selected = train_x[rows].double()
        means.append(selected.mean(dim=1))
        fit_x, = centre_and_normalize(selected)
        weights.append(fit_logistic_regression(fit_x, train_y[rows], classes, lam, max_iter, tolerance_grad))
    weights, means = torch.cat(weights), torch.cat(means)                         # (P, D, C), (P, D)
    problems, dims, _ = weights.shape
    # All settings and splits predicted by one matmul (P problems side by side). Test rows are centred with each
    # problem's training mean; their L2 normalisation divides a row's logits by a positive number, which cannot
    # change its argmax, so it is skipped: (x - m) W = x W - m W.
    logits = test_x.double() @ weights.permute(1, 0, 2).reshape(dims, problems * classes)
    logits = logits.view(-1, problems, classes) - torch.einsum("pd,pdc->pc", means, weights)
    correct = (logits.argmax(dim=-1) == test_y[:, None]).double()                # (n_test, P)
    sizes = [len(ix) for ix in subsets.values()]
    accuracies = (100.0 * correct.mean(dim=0)).split(sizes)
    metrics: dict[str, float] = {}
    for name, setting in zip(subsets, accuracies):
        metrics[f"{name}_top1"] = float(setting.mean())
        metrics[f"{name}_top1_std"] = float(setting.std()) if setting.numel() > 1 else 0.0
    if return_per_sample:
        return metrics, {name: part.mean(dim=1) for name, part in zip(subsets, correct.split(sizes, dim=1))}
    return metrics
