"""Training signals that tell a working contrastive objective from a broken one, logged next to the loss.

Both are read-only summaries of tensors the step computes anyway; no loss depends on them.

- :func:`neighbour_label_agreement` — how often the nearest neighbour retrieved from a queue has the query's class.
  NNCLR-style objectives (MIM-Refiner, MAE-CT) pull a view towards its neighbour, so this is the share of their
  positives that are semantically right; it reads the dataset labels, which the objectives themselves never use.
- :func:`normalized_std` — the per-dimension standard deviation of L2-normalised features, scaled by √d (the
  collapse measure of SimSiam, Chen & He 2021): about 1 for features spread over the sphere, 0 for a collapse to
  one point (and small when the features live in a few dimensions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["neighbour_label_agreement", "normalized_std", "training_signals"]


@torch.no_grad()
def neighbour_label_agreement(neighbour_labels: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Fraction of rows whose neighbour's label equals the query's, over rows where both are known (≥ 0).

    ``neighbour_labels`` may stack V views of the same batch, ``(V·B,)`` against ``labels`` ``(B,)``. ``None`` for
    an unlabelled dataset (``labels is None``), so that nothing is logged; NaN when no row has both labels (an empty
    queue) — decided on the device, without a host round trip per step.
    """
    if labels is None:
        return None
    if len(neighbour_labels) % len(labels):
        raise ValueError(f"{len(neighbour_labels)} neighbour labels do not match {len(labels)} labels")
    query = labels.to(neighbour_labels.device).repeat(len(neighbour_labels) // len(labels))
    known = (query >= 0) & (neighbour_labels >= 0)
    return ((neighbour_labels == query) & known).sum() / known.sum()


@torch.no_grad()
def normalized_std(x: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch standard deviation of ``norm(x)``, times √d (``x``: ``(n, d)``, n ≥ 2)."""
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"expected (n >= 2, d) features, got {tuple(x.shape)}")
    unit = F.normalize(x.detach().float(), dim=-1)
    return unit.std(dim=0).mean() * math.sqrt(x.shape[1])


def training_signals(neighbour_labels: torch.Tensor, labels: torch.Tensor | None, prefix: str = "",
                     **features: torch.Tensor) -> dict[str, torch.Tensor]:
    """An objective's logged diagnostics: ``<prefix>nn_acc`` (:func:`neighbour_label_agreement`, left out for
    unlabelled data) and ``<prefix>std_<name>`` (:func:`normalized_std`) for each feature tensor given."""
    logs = {f"{prefix}std_{name}": normalized_std(x) for name, x in features.items()}
    agreement = neighbour_label_agreement(neighbour_labels, labels)
    if agreement is not None:
        logs[f"{prefix}nn_acc"] = agreement
    return logs
