"""Linear probe: selection on the held-out split only, the split itself, and the training math vs torch.optim."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslbench.core.errors import UserError
from sslbench.evaluation import linear_probe
from sslbench.evaluation.linear_probe import DINOV2_LRS, stratified_holdout, train_linear_heads

FAST = dict(epochs=5, batch_size=64)


def test_default_grid_is_dinov2():
    assert DINOV2_LRS == (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


def test_head_is_chosen_on_validation_never_on_test(clusters):
    # Variant "clean": perfect on train/val, but its *test* features show each class as the next class, so it
    # scores ~0 on test. Variant "noisy": worse on val, but honest on test, so it is the best head on test.
    xtr, ytr, xte, yte = clusters(n_train=400, n_test=200, classes=4, dim=8, spread=0.3)
    g = torch.Generator().manual_seed(3)
    centres = torch.stack([xtr[ytr == c].mean(0) for c in range(4)])
    misleading_test = centres[(yte + 1) % 4] + 0.3 * torch.randn(200, 8, generator=g)
    noisy_train = xtr + 2.0 * torch.randn(xtr.shape, generator=g)
    noisy_test = xte + 2.0 * torch.randn(xte.shape, generator=g)
    metrics, result = linear_probe(None, ytr, None, yte, lrs=(1e-3, 1e-1), variants={
        "clean": (xtr, misleading_test), "noisy": (noisy_train, noisy_test)}, return_result=True, **FAST)
    best_on_test = max(result.heads, key=lambda h: h.test_top1)
    best_on_val = max(result.heads, key=lambda h: h.val_top1)
    assert best_on_test.variant == "noisy" and best_on_val.variant == "clean"
    assert result.chosen == best_on_val
    assert metrics["chosen_variant_index"] == 0.0
    assert metrics["top1"] == best_on_val.test_top1 < 5.0 < best_on_test.test_top1
    assert metrics["val_top1"] == best_on_val.val_top1 > best_on_test.val_top1
    assert result.selection_split == "train-holdout(val_fraction=0.1, seed=0)"


def test_choice_does_not_depend_on_the_test_set(clusters):
    xtr, ytr, xte, yte = clusters(n_train=300, n_test=100, classes=3, dim=6, spread=1.5)
    _, a = linear_probe(xtr, ytr, xte, yte, lrs=(1e-4, 1e-2, 1.0), return_result=True, **FAST)
    _, b = linear_probe(xtr, ytr, -xte, (yte + 1) % 3, lrs=(1e-4, 1e-2, 1.0), return_result=True, **FAST)
    assert (a.chosen.lr, a.chosen.val_top1) == (b.chosen.lr, b.chosen.val_top1)
    assert [h.val_top1 for h in a.heads] == [h.val_top1 for h in b.heads]
    assert a.chosen.test_top1 != b.chosen.test_top1


def test_holdout_is_stratified_seeded_and_disjoint():
    labels = torch.arange(4).repeat_interleave(torch.tensor([10, 20, 30, 41]))
    fit, val = stratified_holdout(labels, 0.1, seed=0)
    assert torch.bincount(labels[val], minlength=4).tolist() == [1, 2, 3, 4]
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(101))
    fit2, val2 = stratified_holdout(labels, 0.1, seed=0)
    assert torch.equal(val, val2) and torch.equal(fit, fit2)
    assert not torch.equal(val, stratified_holdout(labels, 0.1, seed=1)[1])
    # Tiny classes: a class of 1 row stays in fit, a class of 2 rows gives one row to val.
    tiny = torch.tensor([0, 1, 1, 2, 2, 2])
    assert torch.bincount(tiny[stratified_holdout(tiny, 0.1, 0)[1]], minlength=3).tolist() == [0, 1, 1]


def test_batched_heads_equal_torch_sgd_with_momentum_and_cosine(clusters):
    xtr, ytr, _, _ = clusters(n_train=90, classes=3, dim=5, spread=1.0, dtype=torch.float64)
    lrs, epochs, batch = (0.05, 0.5), 3, 32
    (weight, bias), = train_linear_heads([xtr], ytr, 3, lrs, epochs, batch, seed=7)
    steps = epochs * math.ceil(90 / batch)
    for h, lr in enumerate(lrs):
        g = torch.Generator().manual_seed(7)               # same draws as the batched trainer: init, then orders
        layer = torch.nn.Linear(5, 3).double()
        with torch.no_grad():
            layer.weight.copy_((torch.randn(5, 1, 3, generator=g, dtype=torch.float64) * 0.01)[:, 0].T)
            layer.bias.zero_()
        optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
        for _ in range(epochs):
            order = torch.randperm(90, generator=g)
            for start in range(0, 90, batch):
                rows = order[start:start + batch]
                optimizer.zero_grad()
                F.cross_entropy(layer(xtr[rows]), ytr[rows]).backward()
                optimizer.step()
                schedule.step()
        torch.testing.assert_close(weight[h], layer.weight.detach().T)
        torch.testing.assert_close(bias[h], layer.bias.detach())


def test_batchnorm_makes_the_probe_invariant_to_per_dimension_affine_maps(clusters):
    xtr, ytr, xte, yte = clusters(n_train=200, n_test=100, classes=4, dim=6, spread=1.2, dtype=torch.float64)
    scale, shift = torch.linspace(0.01, 30.0, 6, dtype=torch.float64), torch.linspace(-50, 50, 6, dtype=torch.float64)
    plain = linear_probe(xtr, ytr, xte, yte, lrs=(1e-2, 1e-1), **FAST)
    moved = linear_probe(xtr * scale + shift, ytr, xte * scale + shift, yte, lrs=(1e-2, 1e-1), **FAST)
    assert moved == pytest.approx(plain)
    both = linear_probe(xtr * scale + shift, ytr, xte * scale + shift, yte, lrs=(1e-2, 1e-1),
                        batchnorm=(False, True), return_result=True, **FAST)[1]
    assert [(h.batchnorm, h.lr) for h in both.heads] == [(False, 1e-2), (False, 1e-1), (True, 1e-2), (True, 1e-1)]
    assert both.chosen.batchnorm                          # unnormalised, badly scaled features train worse


def test_learns_separable_clusters_and_reports_grid_values(clusters):
    xtr, ytr, xte, yte = clusters(n_train=300, n_test=150, classes=5, dim=12, spread=0.5)
    metrics = linear_probe(xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy(), epochs=10, batch_size=64)
    assert set(metrics) == {"top1", "val_top1", "chosen_lr", "chosen_variant_index", "chosen_batchnorm"}
    assert metrics["top1"] > 95 and metrics["chosen_lr"] in DINOV2_LRS
    assert metrics["chosen_batchnorm"] == 1.0


def test_user_errors(clusters):
    xtr, ytr, xte, yte = clusters(n_train=60)
    with pytest.raises(UserError, match="val_fraction"):
        linear_probe(xtr, ytr, xte, yte, val_fraction=0.0)
    with pytest.raises(UserError, match="no features"):
        linear_probe(None, ytr, None, yte)
    with pytest.raises(UserError, match="variants"):
        linear_probe(xtr, ytr, xte, yte, variants={"half": (xtr[:30], xte)})
    with pytest.raises(UserError, match="lrs"):
        linear_probe(xtr, ytr, xte, yte, lrs=())
