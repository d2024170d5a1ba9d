"""k-means and clustering metrics against scikit-learn, brute force and Lloyd's fixed-point conditions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm
from sklearn.cluster import KMeans

from sslbench.core.errors import UserError
from sslbench.evaluation import clustering
from sslbench.evaluation.clustering import hungarian_accuracy, kmeans


def test_separable_blobs_agree_with_sklearn_kmeans_and_metrics(clusters):
    x, y, _, _ = clusters(n_train=400, classes=6, dim=16, spread=0.2)
    ours, assignment = clustering(x, y, return_assignment=True)
    ids = assignment.numpy()
    # Metrics are scikit-learn's on our assignment (percent).
    assert ours["nmi"] == pytest.approx(100 * skm.normalized_mutual_info_score(y, ids))
    assert ours["ami"] == pytest.approx(100 * skm.adjusted_mutual_info_score(y, ids))
    assert ours["ari"] == pytest.approx(100 * skm.adjusted_rand_score(y, ids))
    # ACC sanity: scikit-learn's KMeans on the same (L2-normalised) features finds the same clustering.
    theirs = KMeans(6, n_init=10, random_state=0).fit(F.normalize(x, dim=1).numpy()).labels_
    assert ours["acc"] == hungarian_accuracy(theirs, y.numpy()) == 100.0
    assert skm.adjusted_rand_score(theirs, ids) == 1.0


def test_hungarian_accuracy_equals_brute_force_over_matchings():
    rng = np.random.default_rng(0)
    for clusters_, classes in ((4, 4), (3, 5), (5, 3)):
        ids = rng.integers(0, clusters_, 60)
        labels = rng.integers(0, classes, 60)
        best = 0
        for perm in itertools.permutations(range(max(clusters_, classes)), clusters_):
            best = max(best, sum(int(np.sum((ids == c) & (labels == perm[c]))) for c in range(clusters_)))
        assert hungarian_accuracy(ids, labels) == pytest.approx(100.0 * best / 60)


def test_kmeans_reaches_a_lloyd_fixed_point_no_worse_than_sklearn(clusters):
    x, _, _, _ = clusters(n_train=600, classes=8, dim=10, spread=1.2, dtype=torch.float64)
    assignment, centres, inertia = kmeans(x, 8, n_init=10, seed=0)
    # Every centre is the mean of its points, every point is assigned to its nearest centre.
    for c in range(8):
        torch.testing.assert_close(centres[c], x[assignment == c].mean(0))
    distances = torch.cdist(x, centres).square()
    assert torch.equal(assignment, distances.argmin(1))
    assert inertia == pytest.approx(float(distances.min(1).values.sum()))
    theirs = KMeans(8, n_init=10, random_state=0).fit(x.numpy())
    assert inertia <= theirs.inertia_ * 1.005


def test_restarts_are_seeded_and_more_restarts_never_hurt(clusters):
    x, _, _, _ = clusters(n_train=300, classes=6, dim=8, spread=1.5)
    a = kmeans(x, 6, n_init=3, seed=1)
    b = kmeans(x, 6, n_init=3, seed=1)
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    single = [kmeans(x, 6, n_init=1, seed=s)[2] for s in range(3)]
    assert kmeans(x, 6, n_init=8, seed=0)[2] <= max(single) + 1e-6


def test_silhouette_and_davies_bouldin_match_sklearn_on_all_rows(clusters):
    x, y, _, _ = clusters(n_train=200, classes=4, dim=8, spread=0.8)
    ours, assignment = clustering(x, y, silhouette=True, subsample=10_000, return_assignment=True)
    normed = F.normalize(x, dim=1).numpy()
    assert ours["silhouette"] == pytest.approx(skm.silhouette_score(normed, assignment.numpy()), abs=1e-5)
    assert ours["davies_bouldin"] == pytest.approx(skm.davies_bouldin_score(normed, assignment.numpy()), rel=1e-5)
    small = clustering(x, y, silhouette=True, subsample=50)
    assert small["acc"] == ours["acc"] and small["silhouette"] != ours["silhouette"]   # subsample only for those


def test_defaults_and_raw_features(clusters):
    x, y, _, _ = clusters(n_train=150, classes=3, dim=6, spread=0.3)
    _, assignment = clustering(x.numpy(), y.numpy(), return_assignment=True)
    assert assignment.unique().numel() == 3                # n_clusters defaults to the number of classes
    _, raw = clustering(x * 10 + 5, y, n_clusters=5, l2_normalize=False, return_assignment=True)
    assert raw.unique().numel() == 5


def test_duplicate_points_fewer_than_k_do_not_crash():
    x = torch.tensor([[0.0, 1.0]] * 5 + [[1.0, 0.0]] * 5)
    y = torch.tensor([0] * 5 + [1] * 5)
    metrics = clustering(x, y, n_clusters=3)
    assert metrics["acc"] == 100.0


def test_user_errors(clusters):
    x, y, _, _ = clusters(n_train=50)
    with pytest.raises(UserError, match="n_clusters"):
        clustering(x, y, n_clusters=0)
    with pytest.raises(UserError, match="labels"):
        clustering(x, y[:10])
