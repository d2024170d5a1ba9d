"""Layer-wise k-NN probe: k-NN accuracy of the CLS token of every block, and its plot.

The curve that motivates MIM-Refiner (Alkin et al. 2024, figure 1): a MIM model's k-NN accuracy peaks in an
intermediate block and drops towards the output, while a refined model peaks at the end. Blocks are numbered
from 0, like ``backbone.blocks``; a variant is one way of reading the tokens (the raw residual stream, or the
stream after the final norm: ``"raw"`` / ``"normed"``).
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, Iterable, Mapping

from sslbench.core.errors import UserError
from sslbench.core.io import atomic_write_bytes
from sslbench.evaluation.knn import knn

_BLOCK_KEY = re.compile(r"^block(\d+)/(.+)$")


def block_name(block: int | str) -> str:
    """``3`` (or ``"3"``) → ``"block3"``; any other string is used as is (e.g. ``"head"``)."""
    if isinstance(block, int) or (isinstance(block, str) and block.isdigit()):
        return f"block{int(block)}"
    return str(block)


def per_block(
    train_features: Mapping[int | str, Any],
    train_labels: Any,
    test_features: Mapping[int | str, Any],
    test_labels: Any,
    return_predictions: bool = False,
    **knn_options: Any,
) -> dict[str, float] | tuple[dict[str, float], dict[Any, dict[int, Any]]]:
    """k-NN metrics of every block: ``{"block3/top1@k=20": .., ...}``; ``knn_options`` go to :func:`knn`.

    ``train_features`` and ``test_features`` map the same block ids (ints, or names) to (N, D) features. With
    ``return_predictions=True`` also ``{block: {k: class ranking (n_test, min(5, C))}}`` (see :func:`knn`).
    """
    if set(train_features) != set(test_features):
        missing = sorted(map(str, set(train_features) ^ set(test_features)))
        raise UserError(f"per_block: train and test features must have the same blocks; unmatched: {missing}")
    if not train_features:
        raise UserError("per_block: no blocks given")
    metrics: dict[str, float] = {}
    predictions: dict[Any, dict[int, Any]] = {}
    for block in train_features:
        scores, predictions[block] = knn(train_features[block], train_labels, test_features[block], test_labels,
                                         return_predictions=True, **knn_options)
        metrics.update({f"{block_name(block)}/{name}": value for name, value in scores.items()})
    return (metrics, predictions) if return_predictions else metrics


def curves_from(data: Mapping[str, Any] | Iterable[Mapping[str, Any]], metric: str) -> dict[str, dict[int, float]]:
    """Normalise the accepted inputs of :func:`plot_per_block` to ``{variant: {block: value}}``.

    Accepted: ``{variant: {block: value}}``; ``{variant: per_block(...) output}``; one ``per_block`` output
    (variant ``"features"``); or rows (dicts) with keys ``variant``, ``block``, ``value`` and optionally
    ``metric`` (rows of another metric are skipped).
    """
    if isinstance(data, Mapping):
        if data and all(isinstance(v, (int, float)) for v in data.values()):
            data = {"features": data}
        curves: dict[str, dict[int, float]] = {}
        for variant, values in data.items():
            if not isinstance(values, Mapping):
                raise UserError(f"plot_per_block: variant {variant!r} must map blocks to values")
            curve: dict[int, float] = {}
            for key, value in values.items():
                if isinstance(key, int):
                    curve[key] = float(value)
                    continue
                match = _BLOCK_KEY.match(str(key))
                if match is None:
                    raise UserError(f"plot_per_block: key {key!r} of variant {variant!r} is neither a block number "
                                    "nor 'block<N>/<metric>'")
                if match.group(2) == metric:
                    curve[int(match.group(1))] = float(value)
            curves[str(variant)] = curve
        return curves
    curves = {}
    for i, row in enumerate(data):
        if not {"variant", "block", "value"} <= set(row):
            raise UserError(f"plot_per_block: row {i} needs the keys 'variant', 'block' and 'value'")
        if row.get("metric", metric) == metric:
            curves.setdefault(str(row["variant"]), {})[int(row["block"])] = float(row["value"])
    return curves


def plot_per_block(
    data: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str = "",
    metric: str = "top1@k=20",
) -> str:
    """Write a PNG of k-NN accuracy (``metric``) against block, one line per variant; returns the path.

    See :func:`curves_from` for the accepted inputs. The file is written to a temporary file in the same folder
    and renamed into place, so a reader never sees a half-written image.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = {name: curve for name, curve in curves_from(data, metric).items() if curve}
    if not curves:
        raise UserError(f"plot_per_block: no values for metric {metric!r}")
    path = os.fspath(path)

    figure, axes = plt.subplots(figsize=(6, 4))
    try:
        for name, curve in curves.items():
            blocks = sorted(curve)
            axes.plot(blocks, [curve[b] for b in blocks], marker="o", label=name)
        axes.set_xlabel("block")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(f"k-NN {metric} (%)")
        if title:
            axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120)
        atomic_write_bytes(path, buffer.getvalue())     # temp file + rename, usual permissions
    finally:
        plt.close(figure)
    return path
