"""Evaluators on tensors: score frozen features from any source.

Every function takes ``(train_features, train_labels, test_features, test_labels, **options)`` —
:func:`clustering` takes ``(features, labels, **options)`` — with features as float tensors or arrays (N, D) and
integer labels (N,), and returns ``dict[str, float]`` (accuracies in percent). The protocols are those of
``docs/evaluation.md``; each module's docstring states every detail that affects a number.

>>> import torch
>>> from sslbench.evaluation import knn
>>> x = torch.randn(100, 8); y = (x[:, 0] > 0).long()
>>> sorted(knn(x, y, x, y, k=(10,)))
['top1@k=10']
"""

from __future__ import annotations

from sslbench.evaluation.clustering import clustering
from sslbench.evaluation.knn import knn
from sslbench.evaluation.linear_probe import LinearProbeResult, linear_probe
from sslbench.evaluation.low_shot import low_shot
from sslbench.evaluation.per_block import per_block, plot_per_block

__all__ = ["knn", "linear_probe", "low_shot", "clustering", "per_block", "plot_per_block", "LinearProbeResult"]
