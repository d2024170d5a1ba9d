"""Synthetic Gaussian-cluster features shared by the evaluator tests (small, so every test file runs in seconds)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch


def gaussian_clusters(n_train: int = 300, n_test: int = 200, classes: int = 5, dim: int = 16, spread: float = 1.0,
                      seed: int = 0, dtype: torch.dtype = torch.float32):
    """Features = class centre (N(0, 1) per dimension) + N(0, spread²) noise; returns (xtr, ytr, xte, yte)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    ytr = torch.arange(n_train) % classes
    yte = torch.randint(classes, (n_test,), generator=g)
    xtr = centres[ytr] + spread * torch.randn(n_train, dim, generator=g, dtype=torch.float64)
    xte = centres[yte] + spread * torch.randn(n_test, dim, generator=g, dtype=torch.float64)
    return xtr.to(dtype), ytr, xte.to(dtype), yte


@pytest.fixture
def clusters() -> Callable[..., tuple]:
    return gaussian_clusters
