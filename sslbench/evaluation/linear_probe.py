"""Linear probing of frozen features: many linear heads trained at once, the best chosen on a held-out split.

Protocol of DINOv2 (Oquab et al. 2023, section 7 / appendix: a grid of learning rates × feature variants — CLS of the
last block or concatenated last 4 blocks, with or without the mean patch token — all heads fed by one pass over the
frozen features) with MAE's BatchNorm(affine=False) before the linear layer (He et al. 2021, appendix A.2).

What exactly happens here:

* **Selection split.** A stratified, seeded ``val_fraction`` of the training rows is held out (per class
  ``round(val_fraction · n_c)`` rows, at least one for classes with ≥ 2 rows); heads are trained on the rest, the head
  with the best held-out accuracy is chosen (ties → first in variant, batch-norm, lr order), and only then is its
  test accuracy read. The test set never influences the choice. The chosen head is **not** retrained on the full
  training set; its test accuracy is reported as is (DINOv2 retrains; we keep the cheaper, clearly defined variant and
  record the split as ``"train-holdout(val_fraction=0.1, seed=0)"``).
* **BatchNorm(affine=False).** With frozen, cached features a train-mode BN only adds batch noise around the
  training statistics, and its eval mode uses (converged) running statistics. We use the *fixed* statistics of the
  fitting rows — per-dimension mean and biased variance, eps 1e-6 as in MAE — in training and evaluation alike.
  This is deterministic and shared by all heads of a variant (the BN has no parameters).
* **Heads.** For every variant (and batch-norm setting) the heads of all learning rates are one tensor
  W (H, D, C) and bias (H, C); logits are one batched matmul ``einsum("bd,hdc->hbc")``. Each head minimises its own
  mean cross-entropy, so the gradient is computed in closed form, ``∂CE/∂logits = (softmax − one_hot) / B``.
  Initialisation N(0, 0.01²) weights (same draw for every lr), zero bias.
* **Optimiser.** SGD, momentum 0.9 (PyTorch's update: ``buf = 0.9·buf + g; p -= lr_t·buf``), weight decay 0,
  per-step cosine schedule ``lr_t = lr · ½(1 + cos(π t / T))`` without warm-up, ``lr × batch_size / 256`` when
  ``scale_lr_by_batch``. Mini-batches are a seeded shuffle per epoch, shared by all heads; the last batch may be
  smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from sslbench.core.errors import UserError
from sslbench.evaluation.knn import as_features, as_labels, count_classes, same_width, threads_for
from sslbench.evaluation.low_shot import rank_within_class

#: The 13 learning rates of the DINOv2 linear-probe grid.
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
MOMENTUM = 0.9
BN_EPS = 1e-6


@dataclass(frozen=True)
class HeadScore:
    """One trained head: its variant, batch-norm setting, base learning rate and accuracies (percent)."""

    variant: str
    batchnorm: bool
    lr: float
    val_top1: float
    test_top1: float
    #: per test sample, whether this head classified it correctly (for intervals and paired tests)
    test_correct: torch.Tensor | None = field(default=None, repr=False, compare=False)


@dataclass
class LinearProbeResult:
    """Everything a linear probe did: the reported metrics, the split that chose the head, and every head."""

    metrics: dict[str, float]
    selection_split: str
    chosen: HeadScore
    heads: list[HeadScore] = field(default_factory=list)


def stratified_holdout(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, stratified split of row indices into (fit, val); per class round(f·n_c) val rows (≥ 1 if n_c ≥ 2)."""
    counts = torch.bincount(labels)
    per_class = (counts.double() * val_fraction).round().long()
    per_class = torch.where(counts >= 2, per_class.clamp(1, None), torch.zeros_like(per_class))
    per_class = torch.minimum(per_class, (counts - 1).clamp_min(0))       # keep ≥ 1 fitting row per class
    ranks = rank_within_class(labels, torch.Generator().manual_seed(seed))
    is_val = ranks < per_class[labels]
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def batchnorm_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and 1/sqrt(biased var + eps) of ``x``: a BatchNorm1d(affine=False) with fixed statistics."""
    return x.mean(dim=0), (x.var(dim=0, unbiased=False) + BN_EPS).rsqrt()


def cosine_factor(step: int, total_steps: int) -> float:
    """½(1 + cos(π · step / total_steps)): 1 at the first step, → 0 at the end."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def train_linear_heads(
    features: Sequence[torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float],
    epochs: int,
    batch_size: int,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Train ``len(lrs)`` linear heads on each matrix of ``features`` (already normalised), all in one pass.

    ``lrs`` are the effective learning rates (already scaled). Returns one ``(W (H, D, C), b (H, C))`` per matrix.
    Internally the H heads of a matrix are side by side in one (D, H·C) weight, so a step is two plain matmuls.
    """
    generator = torch.Generator().manual_seed(seed)
    n, heads = labels.shape[0], len(lrs)
    weights, biases = [], []
    for x in features:
        init = torch.randn(x.shape[1], 1, num_classes, generator=generator, dtype=x.dtype) * 0.01
        weights.append(init.expand(-1, heads, -1).reshape(x.shape[1], heads * num_classes).clone())
        biases.append(torch.zeros(heads * num_classes, dtype=x.dtype))
    weight_bufs = [torch.zeros_like(w) for w in weights]
    bias_bufs = [torch.zeros_like(b) for b in biases]
    column_lr = torch.tensor(lrs, dtype=torch.float64).repeat_interleave(num_classes)      # (H·C,)
    total = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            batch = order[start:start + batch_size]     # gathered per batch: no shuffled copy of the features
            rows = batch.numel()
            target = F.one_hot(labels[batch], num_classes).unsqueeze(1)                   # (B, 1, C)
            lr = column_lr * cosine_factor(step, total)
            for i, x in enumerate(features):
                xb = x[batch]
                logits = torch.addmm(biases[i], xb, weights[i]).view(rows, heads, num_classes)
                grad_logits = ((logits.softmax(dim=-1) - target) / rows).view(rows, heads * num_classes)
                weight_bufs[i].mul_(MOMENTUM).add_(xb.T @ grad_logits)
                bias_bufs[i].mul_(MOMENTUM).add_(grad_logits.sum(dim=0))
                step_lr = lr.to(x.dtype)
                weights[i].sub_(weight_bufs[i] * step_lr)
                biases[i].sub_(bias_bufs[i] * step_lr)
            step += 1
    return [(w.view(w.shape[0], heads, num_classes).permute(1, 0, 2).contiguous(), b.view(heads, num_classes))
            for w, b in zip(weights, biases)]


def head_correct(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 chunk: int = 8192) -> torch.Tensor:
    """Whether each of the H heads classifies each row of (x, labels) correctly: a bool tensor (H, N)."""
    parts = []
    for start in range(0, x.shape[0], chunk):
        logits = torch.baddbmm(bias[:, None, :], x[start:start + chunk].expand(weight.shape[0], -1, -1), weight)
        parts.append(logits.argmax(dim=-1) == labels[start:start + chunk])
    return torch.cat(parts, dim=1) if parts else torch.zeros(weight.shape[0], 0, dtype=torch.bool)


def head_accuracies(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    chunk: int = 8192) -> torch.Tensor:
    """Top-1 accuracy (percent) of each of the H heads on (x, labels); returns a float64 tensor (H,)."""
    correct = head_correct(x, labels, weight, bias, chunk).double().sum(dim=1)
    return 100.0 * correct / max(x.shape[0], 1)


def _collect_variants(train_features: Any, test_features: Any,
                      variants: Mapping[str, tuple[Any, Any]] | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The feature variants as checked tensors: the positional features (as ``"features"``) plus ``variants``."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if train_features is not None or test_features is not None:
        out["features"] = (as_features(train_features, "train_features"), as_features(test_features, "test_features"))
    for name, pair in (variants or {}).items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise UserError(f"variants[{name!r}]: expected a pair (train_features, test_features)")
        out[name] = (as_features(pair[0], f"variants[{name!r}][0]"), as_features(pair[1], f"variants[{name!r}][1]"))
    if not out:
        raise UserError("linear_probe: no features given (pass train/test features or variants)")
    for name, (train_x, test_x) in out.items():
        same_width(train_x, test_x, f"{name} train features", f"{name} test features")
    return out


def linear_probe(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    lrs: Sequence[float] = DINOV2_LRS,
    epochs: int = 30,
    batch_size: int = 256,
    batchnorm: bool | Sequence[bool] = True,
    val_fraction: float = 0.1,
    seed: int = 0,
    scale_lr_by_batch: bool = True,
    variants: Mapping[str, tuple[Any, Any]] | None = None,
    num_classes: int | None = None,
    return_result: bool = False,
) -> dict[str, float] | tuple[dict[str, float], LinearProbeResult]:
    """Linear-probe top-1 (percent) of the head chosen on a held-out split of train; see the module docstring.

    Heads are trained for every (variant, batchnorm setting, lr). ``variants`` maps a name to
    ``(train_features, test_features)``; the positional features, if not ``None``, are the variant ``"features"``.
    Returns ``{"top1", "val_top1", "chosen_lr", "chosen_variant_index", "chosen_batchnorm"}`` (``chosen_lr`` is the
    grid value before batch scaling); with ``return_result=True`` also a :class:`LinearProbeResult`.
    """
    features = _collect_variants(train_features, test_features, variants)
    n_train = next(iter(features.values()))[0].shape[0]
    n_test = next(iter(features.values()))[1].shape[0]
    for name, (train_x, test_x) in features.items():
        if train_x.shape[0] != n_train or test_x.shape[0] != n_test:
            raise UserError(f"variants[{name!r}]: has {train_x.shape[0]} train / {test_x.shape[0]} test rows, "
                            f"expected {n_train} / {n_test} like the other variants")
    train_y = as_labels(train_labels, "train_labels", n_train, "train_features")
    test_y = as_labels(test_labels, "test_labels", n_test, "test_features")
    if not lrs or any(lr < 0 for lr in lrs):
        raise UserError(f"lrs: got {list(lrs)}, expected a non-empty list of learning rates >= 0")
    if epochs < 1 or batch_size < 1:
        raise UserError(f"epochs, batch_size: got {epochs}, {batch_size}, expected >= 1")
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction: got {val_fraction}, expected a number in (0, 1)")
    bn_settings = [bool(batchnorm)] if isinstance(batchnorm, bool) else [bool(b) for b in batchnorm]
    if not bn_settings:
        raise UserError("batchnorm: expected true, false or a non-empty list of them")
    classes = count_classes(train_y, test_y, num_classes=num_classes)
    fit_rows, val_rows = stratified_holdout(train_y, val_fraction, seed)
    if val_rows.numel() == 0:
        raise UserError(f"val_fraction: {val_fraction} of {n_train} training rows leaves no validation rows")

    # One "group" per (variant, batchnorm): a preprocessed feature matrix feeding len(lrs) heads.
    groups = []
    for name, (train_x, test_x) in features.items():
        fit_x = train_x[fit_rows]
        for bn in bn_settings:
            if bn:
                mean, inv_std = batchnorm_statistics(fit_x)
                groups.append((name, bn, [(x - mean) * inv_std for x in (fit_x, train_x[val_rows], test_x)]))
            else:
                groups.append((name, bn, [fit_x, train_x[val_rows], test_x]))
    scale = batch_size / 256 if scale_lr_by_batch else 1.0
    step_work = min(batch_size, fit_rows.numel()) * max(x.shape[1] for x, _ in features.values()) * len(lrs) * classes
    with threads_for(step_work):
        trained = train_linear_heads([g[2][0] for g in groups], train_y[fit_rows], classes,
                                     [lr * scale for lr in lrs], epochs, batch_size, seed)

    heads: list[HeadScore] = []
    for (name, bn, (_, val_x, test_x)), (weight, bias) in zip(groups, trained):
        val_acc = head_accuracies(val_x, train_y[val_rows], weight, bias)
        test_correct = head_correct(test_x, test_y, weight, bias)
        test_acc = 100.0 * test_correct.double().sum(dim=1) / max(n_test, 1)
        heads += [HeadScore(name, bn, float(lr), float(v), float(t), c)
                  for lr, v, t, c in zip(lrs, val_acc, test_acc, test_correct)]
    chosen = max(heads, key=lambda h: h.val_top1)          # max() keeps the first of equal values
    names = list(features)
    metrics = {
        "top1": chosen.test_top1,
        "val_top1": chosen.val_top1,
        "chosen_lr": chosen.lr,
        "chosen_variant_index": float(names.index(chosen.variant)),
        "chosen_batchnorm": float(chosen.batchnorm),
    }
    split = f"train-holdout(val_fraction={val_fraction:g}, seed={seed})"
    result = LinearProbeResult(metrics, split, chosen, heads)
    return (metrics, result) if return_result else metrics
