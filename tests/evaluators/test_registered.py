"""Every registered evaluator, with its default options, on tiny fake features: rows are sane and recordable.

Parametrised over the registry, so a new evaluator plugin is tested here with no test written by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from sslbench.core.evaluator import Evaluator, MetricValue, Split
from sslbench.core.evaluator import FeatureRequest
from sslbench.core.options import validate_options
from sslbench.core.registry import build_registry

from ..conftest import assert_declared

REGISTRY = build_registry()
EVALUATORS = REGISTRY.names("evaluator")
DEPTH = 4
#: Metrics that are percentages of samples (accuracy-like) and must lie in [0, 100].
PERCENT = ("top1", "top5", "val_top1", "acc")


def fake_splits(requests: list[FeatureRequest], dim: int = 8, classes: int = 5) -> tuple[Split, Split]:
    """Class-clustered features for every request (2·dim wide for ``cls+mean``), noisier with depth; the labels
    are shared by all requests, as they are for the features of one dataset."""
    g = torch.Generator().manual_seed(0)
    train_y = torch.arange(250) % classes
    test_y = torch.randint(classes, (100,), generator=g)
    train, test = {}, {}
    for request in sorted(set(requests), key=str):
        width = 2 * dim if request.token == "cls+mean" else dim
        centres = torch.randn(classes, width, generator=g)
        spread = 0.6 + 0.2 * request.block
        train[request] = centres[train_y] + spread * torch.randn(len(train_y), width, generator=g)
        test[request] = centres[test_y] + spread * torch.randn(len(test_y), width, generator=g)
    return Split(train, train_y), Split(test, test_y)


def build(name: str, given: dict | None = None) -> Evaluator:
    factory = REGISTRY.get("evaluator", name).factory
    return factory(validate_options(factory.options, given or {}, f"eval.{name}"))


def test_the_suite_is_registered():
    assert {"knn", "linear_probe", "low_shot", "clustering", "per_block"} <= set(EVALUATORS)


@pytest.mark.parametrize("name", EVALUATORS)
def test_declaration(name):
    assert_declared(REGISTRY, "evaluator", name, Evaluator)
    build(name)                                                     # the defaults validate


@pytest.mark.parametrize("name", EVALUATORS)
def test_rows_are_sane_and_deterministic(name):
    evaluator = build(name)
    requests = evaluator.requests(DEPTH)
    assert requests and all(isinstance(r, FeatureRequest) and 0 <= r.block < DEPTH for r in requests)
    train, test = fake_splits(requests)
    rows = evaluator.evaluate(train, test, requests)
    assert rows and all(isinstance(r, MetricValue) for r in rows)
    keys = [(r.metric, r.variant) for r in rows]
    assert len(keys) == len(set(keys)), "a (metric, variant) repeats: metrics.csv would reject the rows"
    for row in rows:
        assert row.metric and isinstance(row.variant, str) and "\n" not in row.variant
        assert isinstance(row.selection_split, str) and row.selection_split
        assert "test" not in row.selection_split, "hyperparameters must never be chosen on the test set"
        assert math.isfinite(row.value), row
        if row.metric in PERCENT:
            assert 0.0 <= row.value <= 100.0, row
    again = build(name)
    assert again.requests(DEPTH) == requests and evaluator.requests(DEPTH) == requests     # no state in between
    assert [(r.metric, r.variant, r.value) for r in again.evaluate(train, test, requests)] == \
        [(r.metric, r.variant, r.value) for r in rows]


@pytest.mark.parametrize("name", EVALUATORS)
def test_rows_go_into_metrics_csv(name, tmp_path, tiny_recipe):
    from sslbench.training.recipe import resolve
    from sslbench.training.publish import metric_rows
    from sslbench.training.spec import EvalSpec
    from sslbench.results.metrics import read_metrics, write_metrics

    evaluator = build(name)
    train, test = fake_splits(evaluator.requests(DEPTH))
    recipe = resolve(tiny_recipe, REGISTRY)
    results = [(EvalSpec(name, False, {}), row) for row in evaluator.evaluate(train, test, evaluator.requests(DEPTH))]
    rows = metric_rows(recipe, results, run_id="r", objective="mae", stage="s", checkpoint="c")
    write_metrics(tmp_path, rows)
    assert len(read_metrics(tmp_path / "metrics.csv")) == len(results)


@pytest.mark.parametrize("name", ["knn", "linear_probe", "low_shot", "per_block"])
def test_clustered_features_score_well_above_chance(name):
    """Catches a plugin pairing features with the wrong labels (chance is 20% on these 5 classes)."""
    evaluator = build(name)
    train, test = fake_splits(evaluator.requests(DEPTH))
    rows = evaluator.evaluate(train, test, evaluator.requests(DEPTH))
    values = [r.value for r in rows if r.metric == "top1" and "1shot" not in r.variant]
    assert values and min(values) > 50, values


@pytest.mark.parametrize("name", EVALUATORS)
def test_per_sample_records_reproduce_the_rows(name, tmp_path):
    """A record is what intervals and paired tests resample: its mean (or its NMI) must be the row's value, and
    it must survive predictions.npz."""
    from sslbench.results.predictions import read_predictions, write_predictions
    from sslbench.results.statistics import nmi

    evaluator = build(name)
    train, test = fake_splits(evaluator.requests(DEPTH))
    rows = evaluator.evaluate(train, test, evaluator.requests(DEPTH))
    recorded = [r for r in rows if r.per_sample is not None]
    if name in ("knn", "linear_probe", "low_shot", "clustering", "per_block"):
        assert recorded, f"{name} keeps no per-sample records"
    for row in recorded:
        values = row.per_sample.values
        assert len(values) == len(test.labels)
        if row.per_sample.kind == "mean":
            assert 100 * float(values.astype(float).mean()) == pytest.approx(row.value, abs=1e-6), row
        else:
            assert 100 * nmi(test.labels.numpy(), values) == pytest.approx(row.value, abs=1e-6), row
    if recorded:
        keyed = [({"stage": "s", "evaluator": name, "metric": r.metric, "variant": r.variant}, r.per_sample)
                 for r in recorded]
        back = read_predictions(write_predictions(tmp_path, keyed, test.labels))
        for key, record in keyed:
            stored = back.records[("s", name, key["metric"], key["variant"])]
            assert stored.kind == record.kind
            assert (stored.values.astype(float) == record.values.astype(float)).all()


@pytest.mark.parametrize("name", EVALUATORS)
def test_headlines_pick_existing_results(name):
    evaluator = build(name)
    train, test = fake_splits(evaluator.requests(DEPTH))
    rows = evaluator.evaluate(train, test, evaluator.requests(DEPTH))
    chosen = type(evaluator).headlines([(r.metric, r.fields, r.value) for r in rows])
    assert isinstance(chosen, dict)
    for label, index in chosen.items():
        assert isinstance(label, str) and label and 0 <= index < len(rows)
