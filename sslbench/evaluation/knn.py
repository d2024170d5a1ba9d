"""Weighted k-nearest-neighbour classification of frozen features (DINO protocol).

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO, 2021), section 4.1 / appendix:
features are L2-normalised, the k training samples with the highest cosine similarity to a test sample vote for
their class with weight ``exp(sim / τ)``, and the class with the largest summed vote is the prediction.
MIM-Refiner (Alkin et al. 2024) first standardises every feature dimension with the *training* set's mean and
standard deviation, which matters for MIM features whose dimensions have very different scales (``standardize``).

Tie-breaking is deterministic and documented, so results do not depend on the chunk size or on how
``torch.topk`` orders equal values:

* neighbours are ranked by similarity, descending; among equal similarities the lower training index ranks first
  (exactly the first ``k`` of a *stable* descending sort of the similarities);
* classes are ranked by summed vote, descending; among equal votes the lower class index ranks first.

>>> import torch
>>> train = torch.eye(3).repeat(4, 1)                       # 12 rows, 3 directions
>>> labels = torch.arange(3).repeat(4)                       # direction i has class i
>>> knn(train, labels, torch.eye(3), torch.arange(3), k=(2,))["top1@k=2"]
100.0

This module also holds the input coercion shared by all evaluators (:func:`as_features`, :func:`as_labels`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sslbench.core.errors import UserError

#: Test rows per similarity chunk: 512 x 60,000 float32 similarities are ~120 MB.
DEFAULT_BATCH_SIZE = 512


# ----------------------------------------------------------------------------------------------------------------
# Input coercion shared by every evaluator
# ----------------------------------------------------------------------------------------------------------------

def as_features(x: Any, name: str) -> torch.Tensor:
    """Return ``x`` (tensor or array-like, shape (N, D)) as a float tensor on the CPU.

    float64 input stays float64 (exact comparisons in tests); anything else becomes float32.
    """
    if x is None:
        raise UserError(f"{name}: expected a float tensor or array of shape (N, D), got None")
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.cpu()
    if t.ndim != 2:
        raise UserError(f"{name}: expected shape (N, D), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise UserError(f"{name}: expected at least one row and one column, got shape {tuple(t.shape)}")
    if t.dtype != torch.float64:
        t = t.float()
    # A sum in the tensor's own dtype first (~20x faster than an isfinite pass or a float64 sum of float32 data):
    # NaN and ±inf propagate into it (inf - inf is NaN), so a finite sum proves every entry finite. Only a
    # non-finite sum, which large finite values can also give by overflow, needs the elementwise check.
    if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
        raise UserError(f"{name}: contains NaN or infinite values")
    return t


def as_labels(y: Any, name: str, rows: int | None = None, rows_name: str = "features") -> torch.Tensor:
    """Return ``y`` as a 1-D LongTensor of non-negative class ids, checking it has ``rows`` entries."""
    if y is None:
        raise UserError(f"{name}: expected integer class labels of shape (N,), got None")
    t = y.detach().cpu() if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if t.ndim != 1:
        raise UserError(f"{name}: expected shape (N,), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise UserError(f"{name}: expected integer class labels, got dtype {t.dtype}")
    t = t.long()
    if t.numel() and int(t.min()) < 0:
        raise UserError(f"{name}: class labels must be >= 0, got {int(t.min())}")
    if rows is not None and t.shape[0] != rows:
        raise UserError(f"{name}: has {t.shape[0]} entries but {rows_name} has {rows} rows")
    return t


def same_width(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise a :class:`UserError` unless ``a`` and ``b`` have the same number of columns."""
    if a.shape[1] != b.shape[1]:
        raise UserError(f"{name_b}: has {b.shape[1]} feature dimensions but {name_a} has {a.shape[1]}")


def count_classes(*labels: torch.Tensor, num_classes: int | None = None) -> int:
    """``num_classes`` if given (checked against the labels), else 1 + the largest label seen."""
    largest = max(int(y.max()) for y in labels if y.numel())
    if num_classes is None:
        return largest + 1
    if num_classes <= largest:
        raise UserError(f"num_classes: got {num_classes}, but a label {largest} occurs (expected > {largest})")
    return num_classes


#: Multiply-adds per operation below which one thread is faster than several (thread hand-off dominates).
SMALL_WORK = 2**25


@contextmanager
def threads_for(work: int) -> Iterator[None]:
    """Run loops of small tensor operations (``work`` multiply-adds each) on one intra-op thread.

    Loops over small matrices (linear-probe steps, low-shot L-BFGS, k-means on small data) spend most of their time
    handing work to threads; on a busy 2-core machine a 10-epoch linear probe took 45 s with 2 threads and 3.3 s
    with 1, and k-means on 3,000 x 32 features 2.7 s and 0.3 s.
    The previous thread count is restored afterwards. Large work keeps the current setting.
    """
    previous = torch.get_num_threads()
    if work < SMALL_WORK:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def correct_in_top(ranking: torch.Tensor, labels: torch.Tensor, top: int) -> torch.Tensor:
    """Per test sample, whether its label is among the first ``top`` classes of its ``ranking`` (n, ≥ top)."""
    return (ranking[:, :top] == as_labels(labels, "labels")[:, None]).any(dim=1)


def percent(correct: torch.Tensor) -> float:
    """Percentage of true entries of a boolean tensor."""
    return 100.0 * float(correct.double().mean())


# ----------------------------------------------------------------------------------------------------------------
# k-NN
# ----------------------------------------------------------------------------------------------------------------

def standardize_with(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> list[torch.Tensor]:
    """Per-dimension standardisation with the training set's statistics (MIM-Refiner's k-NN preprocessing).

    ``(x - mean_train) / (std_train + eps)`` with the unbiased standard deviation (``torch.std``); the same
    statistics are applied to the test features, so no test information leaks into the preprocessing.
    """
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True) + eps
    return [(x - mean) / std for x in (train, *others)]


def _stable_topk(similarity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` entries of a stable descending sort of each row, without sorting the whole row.

    ``torch.topk`` is fast but leaves the order of equal values unspecified. Only a tie *across the k-th place*
    (the (k+1)-th largest value equals the k-th) can change which rows are selected; taking ``k + 1`` values
    detects it for free, and those (rare) rows are repaired by taking the lowest tied indices.
    The result is then ordered by (similarity descending, index ascending).
    """
    take = min(k + 1, similarity.shape[1])
    values, indices = similarity.topk(take, dim=1, largest=True, sorted=True)
    if take > k:
        crossing = values[:, k] == values[:, k - 1]
        values, indices = values[:, :k].clone(), indices[:, :k].clone()
        for row in torch.nonzero(crossing).flatten().tolist():
            kth = values[row, -1]
            above = torch.nonzero(similarity[row] > kth).flatten()
            tied = torch.nonzero(similarity[row] == kth).flatten()[: k - above.numel()]
            indices[row] = torch.cat([above, tied])
            values[row] = similarity[row, indices[row]]
    # Two stable sorts = lexicographic order (similarity descending, then index ascending).
    by_index = indices.sort(dim=1, stable=True)
    values = values.gather(1, by_index.indices)
    by_value = values.sort(dim=1, descending=True, stable=True)
    return by_value.values, by_index.values.gather(1, by_value.indices)


def _group_count(columns: int, k: int) -> int:
    """Groups for :func:`_select_topk` over ``columns`` similarities: at least 64·(k+1) (``torch.topk`` over fewer
    values takes a slower path per value), else about √(16·columns·(k+1)), which balances the top-k over the group
    maxima against the candidates gathered from the chosen groups (~4,500 groups of 13 columns for 60,000 training
    rows and k = 20)."""
    return max(64 * (k + 1), math.isqrt(16 * columns * (k + 1)))


def _select_topk(similarity: torch.Tensor, k: int, groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly :func:`_stable_topk` (same values, same indices, same tie-breaking), from a few candidates per row.

    ``torch.topk`` over all N columns costs ~1.5 ns per value — on 60,000 training rows about a third of the
    similarity matmul. Instead the columns are split into ``groups`` strided groups (group g holds the columns
    g, g + G, g + 2G, ...) and one elementwise pass takes each group's maximum. With T the k-th largest group maximum,
    at least k values are ≥ T (one per group with a maximum ≥ T), so every value of the top k is ≥ T; and when the
    (k+1)-th largest group maximum is < T, every value ≥ T lies in the k groups with the largest maxima. Those
    k·N/G candidates are gathered in ascending column order (the chosen groups are sorted, and column = row·G + g
    with g < G), the ones ≥ T (rarely more than k + a few) are packed in that order, and :func:`_stable_topk` on them
    ranks them exactly as on the whole row: its tie-breaking needs only the order of the columns and every value
    tied with the k-th place, both kept. Rows whose (k+1)-th and k-th group maxima are equal (exact ties across
    groups: duplicated training rows, quantised features) go through :func:`_stable_topk` on the whole row.
    """
    columns = similarity.shape[1]
    groups = _group_count(columns, k) if groups is None else groups
    if groups <= k or columns // groups < 2:
        return _stable_topk(similarity, k)
    # One thread: a dozen small operations, each a parallel region that waits for its slowest thread; on the shared
    # 2-core machine with other jobs running, 2 threads took 150-210 ms per 512 x 60,000 block and 1 thread 20-26
    # ms (the whole-row torch.topk it replaces: 50-100 ms with 2 threads, 45 ms with 1); on a quieter machine 2
    # threads saved ~4% of the whole k-NN. Every operation below is exact (max, comparisons, copies, sorts), so
    # the thread count cannot change the result.
    with threads_for(0):
        return _select_from_groups(similarity, k, groups)


def _select_from_groups(similarity: torch.Tensor, k: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_select_topk` once the layout is settled (``groups`` > k, at least 2 columns per group)."""
    rows, columns = similarity.shape
    depth, rest = divmod(columns, groups)
    maxima = torch.amax(similarity[:, :depth * groups].view(rows, depth, groups), dim=1)        # (rows, G)
    if rest:                                     # the last, partial row of the (depth + 1) x G layout
        torch.maximum(maxima[:, :rest], similarity[:, depth * groups:], out=maxima[:, :rest])
    # The k + 1 largest group maxima, unsorted (~25% faster), then sorted: only their set matters, and the order
    # of equal ones never does (a tie at the k-th place sends the row to the whole-row path below).
    top_maxima, top_groups = maxima.topk(k + 1, dim=1, sorted=False)
    top_maxima, order = top_maxima.sort(dim=1, descending=True)
    chosen = top_groups.gather(1, order[:, :k]).sort(dim=1).values                              # (rows, k)
    offsets = torch.arange(depth + (rest > 0)) * groups
    columns_of = (offsets[None, :, None] + chosen[:, None, :]).view(rows, -1)                   # ascending
    if rest:
        outside = columns_of >= columns
        candidates = similarity.gather(1, columns_of.clamp(max=columns - 1)).masked_fill_(outside, -math.inf)
    else:
        candidates = similarity.gather(1, columns_of)
    # Pack the candidates >= T, in column order, into (rows, width); the padding (-inf) is never among the top k.
    keep = candidates >= top_maxima[:, k - 1:k]
    counts = keep.sum(1)
    row, position = keep.nonzero(as_tuple=True)                                                 # row-major order
    slot = torch.arange(row.numel()) - (counts.cumsum(0) - counts)[row]
    width = int(counts.max())
    packed = similarity.new_full((rows, width), -math.inf)
    packed[row, slot] = candidates[row, position]
    packed_columns = columns_of.new_zeros((rows, width))
    packed_columns[row, slot] = columns_of[row, position]
    values, local = _stable_topk(packed, k)
    indices = packed_columns.gather(1, local)
    tied = torch.nonzero(top_maxima[:, k] == top_maxima[:, k - 1]).flatten()
    if tied.numel():
        values[tied], indices[tied] = _stable_topk(similarity[tied], k)
    return values, indices


def _rank_classes(votes: torch.Tensor, top: int) -> torch.Tensor:
    """Class ids ordered by vote, descending; equal votes keep ascending class order (stable sort)."""
    return votes.sort(dim=1, descending=True, stable=True).indices[:, :top]


def knn(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    k: int | Sequence[int] = (10, 20),
    temperature: float = 0.07,
    standardize: bool = False,
    eps: float = 1e-6,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_classes: int | None = None,
    return_predictions: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[int, torch.Tensor]]:
    """Weighted k-NN accuracy (DINO protocol) for every ``k``, in percent.

    Returns ``{"top1@k=10": .., "top5@k=10": .., "top1@k=20": .., ...}`` (top-5 only with at least 5 classes).
    The neighbours of the largest ``k`` are found once per chunk of ``batch_size`` test rows (one matmul and one
    top-k, :func:`_select_topk`) and their prefixes reused for the smaller ``k``. With ``return_predictions=True`` also returns
    ``{k: LongTensor (n_test, min(5, C))}``, the class ranking of every test sample (column 0 = prediction).
    """
    ks = sorted({int(v) for v in ([k] if isinstance(k, (int, np.integer)) else k)})
    train_x = as_features(train_features, "train_features")
    test_x = as_features(test_features, "test_features")
    same_width(train_x, test_x, "train_features", "test_features")
    train_y = as_labels(train_labels, "train_labels", train_x.shape[0], "train_features")
    test_y = as_labels(test_labels, "test_labels", test_x.shape[0], "test_features")
    if not ks or ks[0] < 1 or ks[-1] > train_x.shape[0]:
        raise UserError(f"k: got {list(ks)}, expected integers between 1 and the number of training rows "
                        f"({train_x.shape[0]})")
    if temperature <= 0:
        raise UserError(f"temperature: got {temperature}, expected > 0")
    if batch_size < 1:
        raise UserError(f"batch_size: got {batch_size}, expected >= 1")
    classes = count_classes(train_y, test_y, num_classes=num_classes)
    top = min(5, classes)

    if standardize:
        train_x, test_x = standardize_with(train_x, test_x, eps=eps)
    train_x = F.normalize(train_x, dim=1)
    test_x = F.normalize(test_x, dim=1)

    rankings: dict[int, list[torch.Tensor]] = {kk: [] for kk in ks}
    # One reused output buffer: allocating a fresh ~100 MB matrix per chunk costs page faults (~30% of the time).
    buffer = torch.empty(min(batch_size, test_x.shape[0]), train_x.shape[0], dtype=train_x.dtype)
    for start in range(0, test_x.shape[0], batch_size):
        chunk = test_x[start:start + batch_size]
        similarity = buffer[: chunk.shape[0]]
        torch.mm(chunk, train_x.T, out=similarity)
        values, indices = _select_topk(similarity, ks[-1])
        # exp(sim/τ) scaled by exp(-max_sim/τ), the same factor for all votes of a test row: the ranking is
        # unchanged, and small τ cannot overflow (exp(1/0.01) is beyond float32). (Left on the caller's threads:
        # how a large exp is split between threads could change a last bit; the selection's operations are exact.)
        weights = ((values - values[:, :1]) / temperature).exp()
        neighbour_labels = train_y[indices]
        for kk in ks:
            votes = torch.zeros(values.shape[0], classes, dtype=weights.dtype)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            rankings[kk].append(_rank_classes(votes, top))

    metrics: dict[str, float] = {}
    predictions: dict[int, torch.Tensor] = {}
    for kk in ks:
        ranking = torch.cat(rankings[kk])
        predictions[kk] = ranking
        metrics[f"top1@k={kk}"] = percent(correct_in_top(ranking, test_y, 1))
        if classes >= 5:
            metrics[f"top5@k={kk}"] = percent(correct_in_top(ranking, test_y, 5))
    return (metrics, predictions) if return_predictions else metrics
