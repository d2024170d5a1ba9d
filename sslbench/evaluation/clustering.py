"""k-means clustering of frozen features, scored against the labels.

MIM-Refiner (Alkin et al. 2024, table 4 / appendix) clusters frozen ImageNet features with k-means (k = number of
classes) and reports cluster accuracy (ACC, clusters matched to classes one-to-one by the Hungarian algorithm,
Kuhn 1955), normalised and adjusted mutual information (NMI, AMI) and the adjusted Rand index (ARI), plus the
label-free silhouette and Davies-Bouldin scores.

k-means is ours, in torch, with all ``n_init`` restarts advancing in lock step (scikit-learn runs them one after
another with a k-column matmul per chunk of rows): one matmul computes the distances of every point to the centres of
all restarts still moving, and one matmul with a one-hot matrix computes their new centres; a restart that has
converged drops out of the computation. Each restart follows exactly Lloyd's algorithm:

* initialisation: greedy k-means++ (Arthur & Vassilvitskii 2007, as in scikit-learn): each new centre is the best,
  by potential, of ``2 + ⌊ln k⌋`` candidates sampled with probability ∝ squared distance to the nearest centre;
* iteration: assign every point to its nearest centre, move every centre to the mean of its points; a centre that
  lost all its points moves to the point farthest from its own centre (as in scikit-learn);
* a restart stops when no assignment changed or the total squared centre shift is ≤ ``tol`` × mean per-dimension
  variance (scikit-learn's rule); the loop stops when all restarts stopped or after ``max_iter`` iterations;
* the final assignment is recomputed from the final centres, and the restart with the lowest inertia (sum of squared
  distances) wins; equal inertia → lowest restart index.

ACC, NMI, AMI and ARI are returned in percent (× 100, the scale of the MIM-Refiner paper's tables); silhouette
(−1..1) and Davies-Bouldin (≥ 0) unscaled.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sslbench.core.errors import UserError
from sslbench.evaluation.knn import as_features, as_labels, threads_for


def _squared_distances(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N, M) squared Euclidean distances between the rows of ``x`` and of ``centres`` (M, D), one matmul."""
    distances = torch.addmm(x_sq[:, None] + centres.square().sum(1)[None, :], x, centres.T, alpha=-2.0)
    return distances.clamp_min_(0.0)


def _squared_distances_from(points: torch.Tensor, x: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """(M, N) squared distances from each of ``points`` (M, D) to every row of ``x``: the transposed layout,
    built directly so that per-point rows are contiguous."""
    distances = torch.addmm(points.square().sum(1)[:, None] + x_sq[None, :], points, x.T, alpha=-2.0)
    return distances.clamp_min_(0.0)


def kmeans_plusplus(x: torch.Tensor, n_clusters: int, n_init: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding for ``n_init`` independent restarts at once; returns centres (n_init, k, D)."""
    n, dims = x.shape
    x_sq = x.square().sum(1)
    trials = 2 + int(math.log(n_clusters))
    restarts = torch.arange(n_init)
    centres = torch.empty(n_init, n_clusters, dims, dtype=x.dtype)
    first = torch.randint(n, (n_init,), generator=generator)
    centres[:, 0] = x[first]
    closest = _squared_distances_from(x[first], x, x_sq)                    # (n_init, N)
    for c in range(1, n_clusters):
        # All points may coincide with a centre (fewer distinct points than k): then sample uniformly.
        weights = torch.where(closest.sum(1, keepdim=True) > 0, closest, torch.ones_like(closest))
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator)   # (n_init, T)
        to_candidates = _squared_distances_from(x[candidates.flatten()], x, x_sq).view(n_init, trials, n)
        new_closest = torch.minimum(closest[:, None, :], to_candidates)
        best = new_closest.sum(-1).argmin(1)
        closest = new_closest[restarts, best]
        centres[:, c] = x[candidates[restarts, best]]
    return centres


def _relocate_empty(centres: torch.Tensor, counts: torch.Tensor, nearest: torch.Tensor,
                    x: torch.Tensor) -> None:
    """Move each empty centre (count 0) of each restart to its farthest points (in place, rare)."""
    for restart in torch.nonzero((counts == 0).any(1)).flatten().tolist():
        empty = torch.nonzero(counts[restart] == 0).flatten()
        far = nearest[:, restart].topk(empty.numel()).indices
        centres[restart, empty] = x[far]


def kmeans(
    x: torch.Tensor,
    n_clusters: int,
    n_init: int = 10,
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd's k-means with ``n_init`` k-means++ restarts run in lock step; see the module docstring.

    Returns (assignment (N,) LongTensor, centres (k, D), inertia) of the restart with the lowest inertia.
    """
    with threads_for(x.shape[0] * x.shape[1] * n_init * n_clusters):
        return _kmeans(x, n_clusters, n_init, seed, max_iter, tol)


def _kmeans(x: torch.Tensor, n_clusters: int, n_init: int, seed: int, max_iter: int,
            tol: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    n, dims = x.shape
    generator = torch.Generator().manual_seed(seed)
    centres = kmeans_plusplus(x, n_clusters, n_init, generator)                    # (R, k, D)
    x_sq = x.square().sum(1)
    shift_tol = tol * float(x.var(dim=0, unbiased=False).mean())
    previous = torch.full((n, n_init), -1, dtype=torch.long)
    done = torch.zeros(n_init, dtype=torch.bool)
    for _ in range(max_iter):
        # Only restarts still moving are computed: a finished restart keeps its centres, as if it had stopped.
        active = torch.nonzero(~done).flatten()
        if active.numel() == 0:
            break
        current = centres[active]                                                   # (A, k, D)
        flat = current.reshape(-1, dims)
        # argmin_c ||x - c||² = argmax_c (x·c - ||c||²/2), and ||x - c||² = ||x||² - 2·score.
        scores = torch.addmm(flat.square().sum(1).mul(-0.5), x, flat.T).view(n, active.numel(), n_clusters)
        best_score, assignment = scores.max(dim=2)                                  # (N, A)
        unchanged = (assignment == previous[:, active]).all(dim=0)
        previous[:, active] = assignment
        done[active[unchanged]] = True                  # no assignment changed: the centres would not move
        moving = ~unchanged
        if not bool(moving.any()):
            break
        active, assignment, current = active[moving], assignment[:, moving], current[moving]
        count = active.numel()
        one_hot = torch.zeros(count * n_clusters, n, dtype=x.dtype)
        offsets = (torch.arange(count) * n_clusters)[:, None]
        one_hot.scatter_(0, assignment.T + offsets, 1.0)                            # [a*k + cluster, point] = 1
        counts = one_hot.sum(1).view(count, n_clusters)
        sums = (one_hot @ x).view(count, n_clusters, dims)
        updated = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], current)
        if bool((counts == 0).any()):
            nearest = (x_sq[:, None] - 2.0 * best_score[:, moving]).clamp_min(0.0)
            _relocate_empty(updated, counts, nearest, x)
        shift = (updated - current).square().sum(dim=(1, 2))
        centres[active] = updated
        done[active[shift <= shift_tol]] = True
    distances = _squared_distances(x, x_sq, centres.reshape(-1, dims)).view(n, n_init, n_clusters)
    nearest, assignment = distances.min(dim=2)
    inertia = nearest.double().sum(0)
    best = int(inertia.argmin())
    return assignment[:, best].clone(), centres[best].clone(), float(inertia[best])


def hungarian_matched(assignment: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's class under the best one-to-one matching of clusters to classes (Hungarian algorithm); rows of a
    cluster left unmatched (more clusters than classes) get -1, which no label equals."""
    from scipy.optimize import linear_sum_assignment  # imported here: keeps `import sslbench` light

    clusters, cluster_ids = np.unique(assignment, return_inverse=True)
    classes, class_ids = np.unique(labels, return_inverse=True)
    contingency = np.zeros((clusters.size, classes.size), dtype=np.int64)
    np.add.at(contingency, (cluster_ids, class_ids), 1)
    rows, cols = linear_sum_assignment(contingency, maximize=True)
    class_of_cluster = np.full(clusters.size, -1, dtype=np.int64)
    class_of_cluster[rows] = classes[cols]
    return class_of_cluster[cluster_ids]


def hungarian_accuracy(assignment: np.ndarray, labels: np.ndarray) -> float:
    """Cluster accuracy in percent: the best one-to-one matching of clusters to classes (Hungarian algorithm)."""
    return float(100.0 * np.mean(hungarian_matched(assignment, labels) == np.asarray(labels)))


def clustering(
    features: Any,
    labels: Any,
    n_clusters: int | None = None,
    n_init: int = 10,
    seed: int = 0,
    max_iter: int = 300,
    silhouette: bool = False,
    subsample: int = 10000,
    l2_normalize: bool = True,
    return_assignment: bool = False,
) -> dict[str, float] | tuple[dict[str, float], torch.Tensor]:
    """k-means on ``features`` (L2-normalised first by default), scored against ``labels``.

    Returns ``{"acc", "nmi", "ami", "ari"}`` in percent, plus ``"silhouette"`` and ``"davies_bouldin"`` computed
    by scikit-learn on a seeded random subsample of ``subsample`` rows when ``silhouette=True`` (silhouette is
    quadratic in the rows). ``n_clusters`` defaults to the number of distinct labels. With
    ``return_assignment=True`` also returns the cluster id of every row.
    """
    from sklearn import metrics as skm  # imported here: keeps `import sslbench` light

    x = as_features(features, "features")
    y = as_labels(labels, "labels", x.shape[0], "features")
    if n_clusters is None:
        n_clusters = int((torch.bincount(y) > 0).sum())
    if not 1 <= n_clusters <= x.shape[0]:
        raise UserError(f"n_clusters: got {n_clusters}, expected between 1 and the number of rows ({x.shape[0]})")
    if n_init < 1 or max_iter < 1:
        raise UserError(f"n_init, max_iter: got {n_init}, {max_iter}, expected >= 1")
    if l2_normalize:
        x = F.normalize(x, dim=1)

    assignment, _, _ = kmeans(x, n_clusters, n_init=n_init, seed=seed, max_iter=max_iter)
    ids, truth = assignment.numpy(), y.numpy()
    result = {
        "acc": float(hungarian_accuracy(ids, truth)),
        "nmi": 100.0 * skm.normalized_mutual_info_score(truth, ids),
        "ami": 100.0 * skm.adjusted_mutual_info_score(truth, ids),
        "ari": 100.0 * skm.adjusted_rand_score(truth, ids),
    }
    if silhouette:
        rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:subsample].numpy()
        if np.unique(ids[rows]).size < 2:
            raise UserError("silhouette: needs at least 2 clusters among the subsampled rows")
        result["silhouette"] = float(skm.silhouette_score(x.numpy()[rows], ids[rows]))
        result["davies_bouldin"] = float(skm.davies_bouldin_score(x.numpy()[rows], ids[rows]))
    return (result, assignment) if return_assignment else result
