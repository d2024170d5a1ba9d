"""k-NN against a per-sample numpy loop of DINO's weighted vote, with its documented tie-breaking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslbench.core.errors import UserError
from sslbench.evaluation import knn
from sslbench.evaluation.knn import _group_count, _select_topk, _stable_topk, as_features


def reference_knn(train_x, train_y, test_x, k, temperature, classes, standardize=False, eps=1e-6):
    """Obviously-correct weighted k-NN: one test sample at a time, full stable sorts, numpy float64."""
    train_x = np.asarray(train_x, dtype=np.float64)
    test_x = np.asarray(test_x, dtype=np.float64)
    if standardize:
        mean, std = train_x.mean(0), train_x.std(0, ddof=1) + eps
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    rankings = []
    for q in test_x:
        q = q / np.linalg.norm(q)
        sims = train_x @ q
        nearest = np.argsort(-sims, kind="stable")[:k]       # ties: lower training index first
        votes = np.zeros(classes)
        for j in nearest:
            votes[train_y[j]] += np.exp(sims[j] / temperature)
        rankings.append(np.argsort(-votes, kind="stable")[:min(5, classes)])   # ties: lower class first
    return np.stack(rankings)


@pytest.mark.parametrize("standardize", [False, True])
def test_predictions_identical_to_reference_loop(clusters, standardize):
    xtr, ytr, xte, yte = clusters(n_train=240, n_test=60, classes=6, dim=12, spread=1.5, dtype=torch.float64)
    xtr = xtr * torch.linspace(0.1, 5, 12) + 3.0        # uneven scales and offsets: standardisation matters
    xte = xte * torch.linspace(0.1, 5, 12) + 3.0
    metrics, predictions = knn(xtr, ytr, xte, yte, k=(1, 10, 20), temperature=0.07, standardize=standardize,
                               batch_size=7, return_predictions=True)
    for k in (1, 10, 20):
        expected = reference_knn(xtr, ytr.numpy(), xte, k, 0.07, 6, standardize=standardize)
        np.testing.assert_array_equal(predictions[k].numpy(), expected)
        assert metrics[f"top1@k={k}"] == pytest.approx(100 * np.mean(expected[:, 0] == yte.numpy()))
        assert metrics[f"top5@k={k}"] == pytest.approx(100 * np.mean((expected[:, :5] == yte.numpy()[:, None]).any(1)))
    assert 30 < metrics["top1@k=20"] < 100            # a non-trivial problem


def test_exact_ties_follow_documented_rule_for_every_batch_size():
    # Rows are unit basis vectors (exact similarities 0 or 1), repeated with different labels: many exact ties
    # both among neighbours (at the k-th place) and among class votes.
    basis = torch.eye(4, dtype=torch.float64)
    train_x = basis.repeat(6, 1)                          # row i is direction i % 4
    train_y = torch.tensor([3, 1, 2, 0, 1, 3, 0, 2, 2, 0, 1, 3, 0, 2, 3, 1, 1, 1, 0, 0, 3, 2, 2, 3])
    test_x = torch.cat([basis, basis])
    test_y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    for k in (1, 2, 3, 5, 7):
        expected = reference_knn(train_x, train_y.numpy(), test_x, k, 0.1, 4)
        for batch_size in (1, 3, 8):
            _, predictions = knn(train_x, train_y, test_x, test_y, k=(k,), temperature=0.1, batch_size=batch_size,
                                 return_predictions=True)
            np.testing.assert_array_equal(predictions[k].numpy(), expected)
        _, float32 = knn(train_x.float(), train_y, test_x.float(), test_y, k=(k,), temperature=0.1,
                         return_predictions=True)
        np.testing.assert_array_equal(float32[k].numpy(), expected)


def test_stable_topk_equals_stable_sort_prefix():
    g = torch.Generator().manual_seed(1)
    similarity = torch.randint(0, 4, (50, 40), generator=g).float()     # heavy ties
    for k in (1, 5, 39, 40):
        values, indices = _stable_topk(similarity, k)
        expected = similarity.sort(dim=1, descending=True, stable=True)
        torch.testing.assert_close(indices, expected.indices[:, :k])
        torch.testing.assert_close(values, expected.values[:, :k])


def stable_sort_prefix(similarity, k):
    """The documented rule, written the obvious way: the first k of a stable descending sort of each row."""
    expected = similarity.sort(dim=1, descending=True, stable=True)
    return expected.values[:, :k], expected.indices[:, :k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_selection_equals_stable_sort_prefix_with_ties(dtype):
    """The grouped top-k (group maxima, then candidates from the best groups) returns exactly the stable sort's
    prefix: same values, same indices, same order — on rows with heavy ties, ties across groups (the fallback),
    ties inside the chosen groups only, and partial last rows of the group layout (columns % groups != 0)."""
    g = torch.Generator().manual_seed(3)
    for columns, groups, k in [(400, 40, 5), (400, 41, 5), (401, 22, 20), (1000, 97, 10), (257, 12, 11),
                               (300, 150, 1), (64, 3, 2)]:
        matrices = {
            "continuous": torch.rand(30, columns, generator=g, dtype=dtype),
            "four values": torch.randint(0, 4, (30, columns), generator=g).to(dtype),
            "fifty values": torch.randint(0, 50, (30, columns), generator=g).to(dtype),
        }
        # Continuous rows with planted duplicates of their largest values: ties at and across the k-th place.
        planted = torch.rand(30, columns, generator=g, dtype=dtype)
        for r in range(30):
            order = planted[r].argsort(descending=True)
            source = order[torch.randint(0, 2 * k, (1,), generator=g)]
            targets = torch.randint(0, columns, (1 + r % 4,), generator=g)
            planted[r, targets] = planted[r, source]
        matrices["planted ties"] = planted
        for name, similarity in matrices.items():
            values, indices = _select_topk(similarity, k, groups)
            expected_values, expected_indices = stable_sort_prefix(similarity, k)
            assert torch.equal(indices, expected_indices), (name, columns, groups, k)
            assert torch.equal(values, expected_values), (name, columns, groups, k)
            assert torch.equal(values, similarity.gather(1, indices))


def test_grouped_selection_with_its_default_groups_on_a_large_row():
    g = torch.Generator().manual_seed(4)
    similarity = torch.rand(16, 60_000, generator=g)
    similarity[:8] = (similarity[:8] * 300).round() / 300             # coarse values: many exact ties
    assert 60_000 // _group_count(60_000, 20) >= 2                      # the grouped path, not the fallback
    for k in (1, 10, 20):
        values, indices = _select_topk(similarity, k)
        expected_values, expected_indices = stable_sort_prefix(similarity, k)
        assert torch.equal(indices, expected_indices) and torch.equal(values, expected_values)


def full_sort_knn(train_x, train_y, test_x, k, temperature, classes, batch_size):
    """knn as it was before the grouped top-k: the same chunked similarity matmul, then a full stable sort of every
    row (the documented tie-breaking by definition) and the same weighted vote."""
    import torch.nn.functional as F

    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    rankings = []
    for chunk in test_x.split(batch_size):
        similarity = torch.mm(chunk, train_x.T)
        ordered = similarity.sort(dim=1, descending=True, stable=True)
        values, indices = ordered.values[:, :k], ordered.indices[:, :k]
        weights = ((values - values[:, :1]) / temperature).exp()
        votes = torch.zeros(chunk.shape[0], classes, dtype=weights.dtype).scatter_add_(1, train_y[indices], weights)
        rankings.append(votes.sort(dim=1, descending=True, stable=True).indices[:, :min(5, classes)])
    return torch.cat(rankings)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_through_the_grouped_selection_equals_full_sort_with_ties(clusters, dtype):
    """Enough training rows that knn takes the grouped top-k, and exact similarity ties at the k-th place:
    duplicated training rows with other labels in the same column group (ties inside the chosen groups) and in
    other groups (ties across groups: the whole-row path), and features on a coarse grid."""
    xtr, ytr, xte, yte = clusters(n_train=4000, n_test=64, classes=7, dim=6, spread=1.0, dtype=dtype)
    groups = _group_count(4000, 20)
    assert 4000 // groups >= 2                                        # the grouped path
    xtr[groups:groups + 300] = xtr[:300]                              # same groups as rows 0..299
    xtr[2700:3000] = xtr[300:600]                                     # other groups
    ytr[groups:groups + 300], ytr[2700:3000] = (ytr[:300] + 1) % 7, (ytr[300:600] + 2) % 7
    xte[:16] = xtr[:16] + 1e-3                                        # test rows next to duplicated rows
    xte[16:32] = xtr[300:316]
    grid_tr, grid_te = (xtr * 2).round() / 2, (xte * 2).round() / 2  # coarse grid: many equal directions
    for train_x, test_x in ((xtr, xte), (grid_tr, grid_te)):
        _, predictions = knn(train_x, ytr, test_x, yte, k=(1, 10, 20), temperature=0.1, batch_size=24,
                             return_predictions=True)
        for k in (1, 10, 20):
            expected = full_sort_knn(train_x, ytr, test_x, k, 0.1, 7, batch_size=24)
            assert torch.equal(predictions[k], expected), k


def test_standardize_uses_training_statistics_only(clusters):
    xtr, ytr, xte, yte = clusters(dtype=torch.float64)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    by_hand = knn((xtr - mean) / std, ytr, (xte - mean) / std, yte)
    assert knn(xtr, ytr, xte, yte, standardize=True) == by_hand
    # Shifting the test set must not change the statistics used (no test information leaks in).
    shifted = knn(xtr, ytr, xte + 100.0, yte, standardize=True)
    assert shifted == knn((xtr - mean) / std, ytr, (xte + 100.0 - mean) / std, yte)


def test_numpy_inputs_and_top5_only_with_five_classes(clusters):
    xtr, ytr, xte, yte = clusters(classes=3)
    metrics = knn(xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy(), k=10)
    assert set(metrics) == {"top1@k=10"}
    assert metrics == knn(xtr, ytr, xte, yte, k=[10])
    xtr, ytr, xte, yte = clusters(classes=5)
    assert set(knn(xtr, ytr, xte, yte, k=(10, 20))) == {"top1@k=10", "top5@k=10", "top1@k=20", "top5@k=20"}


def test_weights_are_exp_similarity_over_temperature():
    # One test point, two neighbours of class 0 at similarity 0.6 and one of class 1 at similarity 1.0:
    # class 0 wins iff 2·exp(0.6/τ) > exp(1/τ), i.e. τ > 0.4 / ln 2 ≈ 0.577.
    train_x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    train_y = torch.tensor([1, 0, 0])
    test_x, test_y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert knn(train_x, train_y, test_x, test_y, k=3, temperature=0.6)["top1@k=3"] == 100.0
    assert knn(train_x, train_y, test_x, test_y, k=3, temperature=0.55)["top1@k=3"] == 0.0


def test_user_errors(clusters):
    xtr, ytr, xte, yte = clusters()
    with pytest.raises(UserError, match="train_labels"):
        knn(xtr, ytr[:-1], xte, yte)
    with pytest.raises(UserError, match="test_features"):
        knn(xtr, ytr, xte[:, :3], yte)
    with pytest.raises(UserError, match="k:"):
        knn(xtr, ytr, xte, yte, k=(0,))
    with pytest.raises(UserError, match="k:"):
        knn(xtr, ytr, xte, yte, k=(xtr.shape[0] + 1,))
    with pytest.raises(UserError, match="integer"):
        knn(xtr, ytr.float(), xte, yte)
    with pytest.raises(UserError, match="num_classes"):
        knn(xtr, ytr, xte, yte, num_classes=2)


def test_small_temperature_does_not_overflow(clusters):
    xtr, ytr, xte, yte = clusters(dtype=torch.float64)
    _, predictions = knn(xtr.float(), ytr, xte.float(), yte, k=(10,), temperature=0.005, return_predictions=True)
    expected = reference_knn(xtr, ytr.numpy(), xte, 10, 0.005, 5)    # float64: exp(200) is representable
    assert (predictions[10][:, 0].numpy() == expected[:, 0]).mean() > 0.99


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_are_user_errors(clusters, bad):
    xtr, ytr, xte, yte = clusters()
    xte[3, 2] = bad
    with pytest.raises(UserError, match="test_features: contains NaN"):
        knn(xtr, ytr, xte, yte)
    both = xtr.clone()
    both[0, 0], both[1, 1] = float("inf"), -float("inf")
    with pytest.raises(UserError, match="train_features: contains NaN"):
        knn(both, ytr, xte.nan_to_num(), yte)


def test_large_finite_features_are_accepted(clusters):
    """A float32 sum of finite values can overflow to inf; that alone must not be taken for a non-finite entry."""
    xtr, ytr, xte, yte = clusters()
    huge = xtr.float().abs() * 3e37 + 3e37                 # all finite, their float32 sum is inf
    assert not torch.isfinite(huge.sum())
    assert torch.equal(as_features(huge, "train_features"), huge)
