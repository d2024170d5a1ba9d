"""data2vec 2.0's feature — the mean of the patch tokens through a LayerNorm, ``mean_fc_norm`` — is available to every
evaluator by name, and the options that name it leave the recipes that do not (and their hashes) unchanged."""

from __future__ import annotations

import pytest

from sslbench.core.errors import UserError
from sslbench.core.evaluator import FeatureRequest
from sslbench.core.options import validate_options
from sslbench.evaluation import knn
from sslbench.results.plots import PER_BLOCK_VARIANT

from .test_registered import REGISTRY, build, fake_splits

DEPTH = 4
FEATURE = FeatureRequest(DEPTH - 1, "mean_fc_norm", "normed")


@pytest.mark.parametrize("name", ["knn", "low_shot", "clustering"])
def test_single_feature_evaluators_take_it_as_their_token(name):
    evaluator = build(name, {"token": "mean_fc_norm"})
    assert evaluator.requests(DEPTH) == [FEATURE]
    train, test = fake_splits([FEATURE])
    rows = evaluator.evaluate(train, test, [FEATURE])
    assert rows and all(row.fields["feature"] == "b3.mean_fc_norm.normed" for row in rows)


def test_linear_probe_appends_it_or_uses_it_alone():
    evaluator = build("linear_probe", {"n_last_blocks": [0, 1], "avgpool": [False, True], "pool": "mean_fc_norm",
                                       "epochs": 2, "lrs": [0.1]})
    # (0 blocks, no avgpool) has no feature and is skipped; n_last_blocks = 0 is data2vec 2.0's own probe
    assert evaluator.layout(DEPTH) == {"mean_fc_norm": [FEATURE],
                                       "last1": [FeatureRequest(3, "cls", "normed")],
                                       "last1+mean_fc_norm": [FeatureRequest(3, "cls", "normed"), FEATURE]}
    requests = evaluator.requests(DEPTH)
    train, test = fake_splits(requests)
    heads = {row.fields["head"] for row in evaluator.evaluate(train, test, requests)}
    assert heads == {"best", "mean_fc_norm", "last1", "last1+mean_fc_norm"}
    with pytest.raises(UserError, match="n_last_blocks = 0 needs avgpool = true"):
        build("linear_probe", {"n_last_blocks": [0], "avgpool": [False]}).requests(DEPTH)
    with pytest.raises(UserError, match="pool"):
        build("linear_probe", {"pool": "max"})
    assert set(build("linear_probe").layout(DEPTH)) == {"last1", "last1+mean", "last4", "last4+mean"}  # as before


def test_per_block_pools_every_block_with_it():
    evaluator = build("per_block", {"token": "mean_fc_norm", "norm": "raw", "k": [5]})
    requests = evaluator.requests(DEPTH)
    assert requests == [FeatureRequest(b, "mean_fc_norm", "raw") for b in range(DEPTH)]
    train, test = fake_splits(requests)
    rows = evaluator.evaluate(train, test, requests)
    for row in rows:
        match = PER_BLOCK_VARIANT.match(row.variant)       # the plots still read the variant
        assert match and match["stream"] == "raw,mean_fc_norm" and row.fields["token"] == "mean_fc_norm"
        request = FeatureRequest(int(match["block"]), "mean_fc_norm", "raw")
        expected = knn(train.features[request], train.labels, test.features[request], test.labels, k=(5,))
        assert row.value == expected[f"{row.metric}@k=5"]
    # the CLS rows keep the variants they always had
    plain = build("per_block", {"k": [5], "norm": "raw", "blocks": [0]})
    train, test = fake_splits(plain.requests(DEPTH))
    assert {r.variant for r in plain.evaluate(train, test, plain.requests(DEPTH))} == {"k=5,block=0,raw"}


@pytest.mark.parametrize("name, key", [("linear_probe", "pool"), ("per_block", "token")])
def test_new_options_stay_out_of_recipes_that_leave_them_out(name, key):
    """Added after results were published: absent from the resolved table unless given (so protocol hashes of
    existing recipes do not move), and the evaluator applies the default."""
    options = REGISTRY.get("evaluator", name).factory.options
    assert key not in validate_options(options, {}, f"eval.{name}")
    assert validate_options(options, {key: "mean_fc_norm"}, f"eval.{name}")[key] == "mean_fc_norm"
    assert build(name).opts[key] == options[key].default


def test_feature_request_text_round_trips():
    assert FeatureRequest.parse("b-1.mean_fc_norm.raw") == FeatureRequest(-1, "mean_fc_norm", "raw")
    assert str(FEATURE) == "b3.mean_fc_norm.normed"
    with pytest.raises(UserError, match=r"cls\|mean\|cls\+mean\|mean_fc_norm"):
        FeatureRequest.parse("b1.mean_norm.raw")
    with pytest.raises(UserError, match="token"):
        FeatureRequest(0, "fc_norm", "raw")


def test_the_monitor_and_the_evaluators_share_the_choices():
    from sslbench.core.evaluator import FEATURE_OPTIONS, TOKENS
    from sslbench.training.recipe import MONITOR

    assert FEATURE_OPTIONS["token"].choices == TOKENS and "mean_fc_norm" in TOKENS
    assert MONITOR["token"] is FEATURE_OPTIONS["token"]
