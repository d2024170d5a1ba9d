"""The recipe evaluators are thin wrappers: their rows equal the tensor API on the same features, and they name
their feature variants, settings and selection split as documented."""

from __future__ import annotations

import pytest
import torch

from sslbench.core.errors import UserError
from sslbench.core.evaluator import Split
from sslbench.evaluation import clustering, knn, linear_probe, low_shot
from sslbench.core.evaluator import FeatureRequest
from sslbench.results.plots import PER_BLOCK_VARIANT

from .test_registered import build, fake_splits


def by_key(rows):
    return {(r.metric, r.variant): r for r in rows}


def test_linear_probe_variants_and_requests():
    evaluator = build("linear_probe")
    assert [str(r) for r in evaluator.requests(12)] == [
        "b10.cls.normed", "b11.cls.normed", "b11.mean.normed", "b8.cls.normed", "b9.cls.normed"]
    assert evaluator.layout(12)["last4+mean"] == [FeatureRequest(b, "cls", "normed") for b in (8, 9, 10, 11)] + \
        [FeatureRequest(11, "mean", "normed")]
    assert set(evaluator.layout(12)) == {"last1", "last1+mean", "last4", "last4+mean"}
    short = build("linear_probe", {"n_last_blocks": [4], "avgpool": [False], "norm": "raw"})
    assert [str(r) for r in short.requests(2)] == ["b0.cls.raw", "b1.cls.raw"]      # fewer blocks than asked


def test_linear_probe_rows_equal_the_tensor_api_and_ignore_the_test_labels():
    options = {"n_last_blocks": [1, 2], "avgpool": [False], "epochs": 3, "lrs": [0.01, 0.1, 1.0],
               "batchnorm": [True, False]}
    evaluator = build("linear_probe", options)
    train, test = fake_splits(evaluator.requests(4))
    rows = by_key(evaluator.evaluate(train, test, evaluator.requests(4)))
    assert set(rows) == {("top1", "best,normed"), ("val_top1", "best,normed"), ("top1", "last1,normed"),
                         ("top1", "last2,normed")}
    best = rows[("top1", "best,normed")]
    assert best.selection_split == "train-holdout(val_fraction=0.1, seed=0)"
    assert set(best.extra) == {"variant", "batchnorm", "lr", "val_top1"} and best.extra["lr"] in (0.01, 0.1, 1.0)

    cat = lambda split, blocks: torch.cat([split.features[FeatureRequest(b, "cls", "normed")] for b in blocks], 1)
    variants = {"last1": (cat(train, [3]), cat(test, [3])), "last2": (cat(train, [2, 3]), cat(test, [2, 3]))}
    expected = linear_probe(None, train.labels, None, test.labels, variants=variants, lrs=[0.01, 0.1, 1.0],
                            epochs=3, batchnorm=[True, False])
    assert best.value == expected["top1"] and rows[("val_top1", "best,normed")].value == expected["val_top1"]
    assert best.extra["lr"] == expected["chosen_lr"]
    assert best.extra["variant"] == ["last1", "last2"][int(expected["chosen_variant_index"])]

    permutation = torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(1))
    shuffled = Split(test.features, test.labels[permutation])
    fresh = build("linear_probe", options)
    again = by_key(fresh.evaluate(train, shuffled, fresh.requests(4)))
    assert again[("top1", "best,normed")].extra == best.extra          # the choice never looks at the test set


def test_low_shot_rows_equal_the_tensor_api():
    evaluator = build("low_shot", {"shots": [1, 3], "fractions": [0.1], "splits": 2, "block": -2})
    requests = evaluator.requests(4)
    assert requests == [FeatureRequest(2, "cls", "normed")]
    train, test = fake_splits(requests)
    rows = by_key(evaluator.evaluate(train, test, requests))
    expected = low_shot(train.features[requests[0]], train.labels, test.features[requests[0]], test.labels,
                        shots=(1, 3), fractions=(0.1,), splits=2)
    assert set(rows) == {(m, f"{s},b2.cls.normed") for s in ("1shot", "3shot", "10pct") for m in ("top1", "top1_std")}
    for key, value in expected.items():
        setting, metric = key.split("_", 1)
        assert rows[(metric, f"{setting},b2.cls.normed")].value == value
    assert all(r.selection_split == "none" for r in rows.values())


@pytest.mark.parametrize("split", ["test", "train"])
def test_clustering_rows_equal_the_tensor_api(split):
    evaluator = build("clustering", {"split": split, "n_init": 3, "silhouette": True, "subsample": 50})
    request, = evaluator.requests(4)
    assert request == FeatureRequest(3, "cls", "normed")
    train, test = fake_splits([request])
    data = train if split == "train" else test
    rows = by_key(evaluator.evaluate(train, test, [request]))
    expected = clustering(data.features[request], data.labels, n_init=3, silhouette=True, subsample=50)
    assert {m: rows[(m, f"{split},b3.cls.normed")].value for m in expected} == expected
    assert set(expected) == {"acc", "nmi", "ami", "ari", "silhouette", "davies_bouldin"}


def test_per_block_rows_are_knn_of_every_block_and_parse():
    evaluator = build("per_block", {"k": [5, 10], "standardize": True})
    requests = evaluator.requests(3)
    assert sorted(map(str, requests)) == sorted(f"b{b}.cls.{n}" for b in range(3) for n in ("raw", "normed"))
    train, test = fake_splits(requests)
    rows = evaluator.evaluate(train, test, requests)
    assert len(rows) == 3 * 2 * 2 * 2                        # blocks × streams × k × (top1, top5)
    for row in rows:
        match = PER_BLOCK_VARIANT.match(row.variant)
        assert match, row.variant
        request = FeatureRequest(int(match["block"]), "cls", match["stream"].split(",")[0])
        expected = knn(train.features[request], train.labels, test.features[request], test.labels, k=(5, 10),
                       standardize=True)
        assert row.value == expected[f"{row.metric}@k={match['k']}"] and match["stream"].endswith(",std")


def test_per_block_block_and_norm_options():
    only_last = build("per_block", {"blocks": [-1, 3], "norm": "normed"})
    assert only_last.requests(4) == [FeatureRequest(3, "cls", "normed")]
    with pytest.raises(UserError, match="norm"):
        build("per_block", {"norm": "final"})
    with pytest.raises(UserError, match="blocks"):
        build("per_block", {"blocks": [4]}).requests(4)


@pytest.mark.parametrize("name", ["knn", "low_shot", "clustering"])
def test_a_block_outside_the_backbone_is_a_user_error(name):
    with pytest.raises(UserError, match=r"block: got 7, expected -4\.\.3"):
        build(name, {"block": 7}).requests(4)


def test_variant_text_is_formatted_from_the_fields_in_one_place():
    from sslbench.core.evaluator import MetricValue, format_variant

    assert format_variant({"k": 20, "feature": "b11.cls.normed", "std": True}) == "k=20,b11.cls.normed,std"
    assert format_variant({"k": 10, "block": 3, "stream": "raw", "std": False, "ema": True}) == "k=10,block=3,raw,ema"
    assert format_variant({}) == ""
    assert MetricValue("top1", 1.0, {"setting": "1shot", "feature": "b2.cls.normed"}).variant == "1shot,b2.cls.normed"
