"""Running a recipe's ``[[eval]]`` list on a backbone: extract the union of requested features once, evaluate,
and turn the results into metric rows (``sslbench.results.metrics``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sslbench.data.sources import default_cache_dir
from sslbench.core.errors import RecipeError, UserError
from sslbench.core.evaluator import Split
from sslbench.data.geometry import image_size, normalisation


def feature_cache_dir() -> Path:
    """``$SSLBENCH_CACHE/features`` (default ``~/.cache/sslbench/features``), shared by all runs, so evaluating a
    known checkpoint again skips the forward passes."""
    return default_cache_dir().parent / "features"


def build_evaluators(registry, evals, depth: int, source: str | None = None) -> list:
    """The evaluators of an ``[[eval]]`` list (``EvalSpec``s: ``name``, ``use_ema``, ``options``), with their
    feature requests checked against a backbone of ``depth`` blocks: a block it does not have is a
    :class:`RecipeError` naming ``eval[i]`` now, not after the training."""
    evaluators = []
    for i, e in enumerate(evals):
        evaluator = registry.get("evaluator", e.name).factory(dict(e.options))
        try:
            for request in evaluator.requests(depth):
                request.resolve(depth)
        except UserError as err:
            raise RecipeError(f"eval[{i}]", f"{e.name}: {err}", source=source) from None
        evaluators.append(evaluator)
    return evaluators


def preflight_evaluators(evals, evaluators: list, datasets: dict, source: str | None = None) -> None:
    """Each evaluator's :meth:`~sslbench.core.evaluator.Evaluator.check_data` on the loaded evaluation data; a problem
    is a :class:`RecipeError` naming ``eval[i]`` and the option."""
    from sslbench.core.evaluator import DataSummary

    train, test = DataSummary.of(datasets["eval_train"].labels), DataSummary.of(datasets["test"].labels)
    for i, (table, evaluator) in enumerate(zip(evals, evaluators)):
        try:
            evaluator.check_data(train, test)
        except UserError as err:
            raise RecipeError(f"eval[{i}]", f"{table.name}: {err}", source=source) from None


def evaluate_backbone(recipe, registry, backbone, datasets: dict, accelerator, evals=None,
                      progress: bool = True) -> list[tuple[Any, object]]:
    """Run the (typed) recipe's evaluations (or ``evals``). Returns ``[(EvalSpec, MetricValue), ...]`` on the main
    process and ``[]`` on the others."""
    from sslbench.evaluation.features import extract_features, weights_fingerprint
    from sslbench.data.views import EvalTransform

    evals = recipe.eval if evals is None else evals
    if not evals:
        return []
    evaluators = build_evaluators(registry, evals, backbone.depth)
    requests = sorted({r for ev in evaluators for r in ev.requests(backbone.depth)}, key=str)
    mean, std = normalisation(recipe, datasets["test"].channels)
    transform = EvalTransform(image_size(recipe, backbone), mean=mean, std=std)
    weights = weights_fingerprint(backbone)
    kwargs = dict(transform=transform, batch_size=recipe.data.eval_batch_size, accelerator=accelerator,
                  cache_dir=feature_cache_dir(), weights_key=weights, progress=progress)
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    backbone.to(device)
    train = Split(extract_features(backbone, datasets["eval_train"], requests, **kwargs),
                  datasets["eval_train"].labels)
    test = Split(extract_features(backbone, datasets["test"], requests, **kwargs), datasets["test"].labels)
    results = []
    if accelerator is None or accelerator.is_main_process:
        for table, evaluator in zip(evals, evaluators):
            for value in evaluator.evaluate(train, test, evaluator.requests(backbone.depth)):
                results.append((table, value))
    return results
