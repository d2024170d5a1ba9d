"""The logged training signals: neighbour-label agreement and the collapse measure."""

from __future__ import annotations

import math

import pytest
import torch

from sslbench.core.diagnostics import neighbour_label_agreement, normalized_std, training_signals


def test_agreement_counts_only_rows_with_both_labels_known():
    labels = torch.tensor([0, 1, 2, -1])
    # view 0 then view 1 of the same 4 samples
    neighbours = torch.tensor([0, 2, -1, 3,    0, 1, 2, 1])
    # known rows: (0,0) (1,2) | (0,0) (1,1) (2,2) -> 4 of 5 agree
    assert neighbour_label_agreement(neighbours, labels).item() == pytest.approx(4 / 5)


def test_agreement_is_none_without_labels_and_nan_when_nothing_is_known():
    assert neighbour_label_agreement(torch.tensor([1, 2]), None) is None
    assert math.isnan(neighbour_label_agreement(torch.tensor([-1, -1]), torch.tensor([0, 1])).item())
    with pytest.raises(ValueError, match="3 neighbour labels do not match 2 labels"):
        neighbour_label_agreement(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))


def test_normalized_std_is_one_on_the_sphere_and_zero_when_collapsed():
    torch.manual_seed(0)
    spread = torch.randn(20000, 64) * 3.0                    # isotropic: each unit coordinate has variance 1/d
    assert normalized_std(spread).item() == pytest.approx(1.0, abs=0.01)
    collapsed = torch.randn(1, 64).expand(100, 64) * torch.rand(100, 1)   # one direction, any length
    assert normalized_std(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    # features living in 4 of 64 dimensions: per-dimension std 1/2 in 4 dims, 0 elsewhere -> 4 * 0.5 / 64 * 8
    low_rank = torch.zeros(20000, 64)
    low_rank[:, :4] = torch.randn(20000, 4)
    assert normalized_std(low_rank).item() == pytest.approx(4 * 0.5 / 64 * 8, abs=0.01)
    with pytest.raises(ValueError):
        normalized_std(torch.ones(1, 8))


def test_training_signals_names_and_values():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])   # per dimension: 1, 0, -1, 0 -> std √(2/3)
    logs = training_signals(torch.tensor([1, 1]), torch.tensor([1, 0]), prefix="out_", projected=z * 5)
    assert set(logs) == {"out_std_projected", "out_nn_acc"}
    assert logs["out_nn_acc"].item() == 0.5
    assert logs["out_std_projected"].item() == pytest.approx(math.sqrt(2 / 3) * math.sqrt(2))
    assert set(training_signals(torch.tensor([1]), None, features=z)) == {"std_features"}
