"""Layer-wise k-NN: per-block keys equal knn() on each block; the plot is a PNG written atomically."""

from __future__ import annotations

import os

import pytest

from sslbench.core.errors import UserError
from sslbench.evaluation import knn, per_block, plot_per_block
from sslbench.evaluation.per_block import curves_from


def test_per_block_equals_knn_of_each_block(clusters):
    blocks = {b: clusters(spread=0.5 + b, seed=0) for b in range(3)}          # same labels, noisier with depth
    train = {b: blocks[b][0] for b in blocks}
    test = {b: blocks[b][2] for b in blocks}
    _, ytr, _, yte = blocks[0]
    metrics = per_block(train, ytr, test, yte, k=(10, 20), standardize=True)
    for b in range(3):
        expected = knn(train[b], ytr, test[b], yte, k=(10, 20), standardize=True)
        assert {key.split("/", 1)[1]: v for key, v in metrics.items() if key.startswith(f"block{b}/")} == expected
    assert metrics["block0/top1@k=20"] > metrics["block2/top1@k=20"]
    named = per_block({"head": train[0]}, ytr, {"head": test[0]}, yte, k=(10,))
    assert set(named) == {"head/top1@k=10", "head/top5@k=10"}


def test_per_block_errors(clusters):
    xtr, ytr, xte, yte = clusters()
    with pytest.raises(UserError, match="same blocks"):
        per_block({0: xtr, 1: xtr}, ytr, {0: xte}, yte)
    with pytest.raises(UserError, match="no blocks"):
        per_block({}, ytr, {}, yte)


def test_curves_from_accepts_dicts_per_block_output_and_rows():
    expected = {"raw": {0: 10.0, 1: 30.0}, "normed": {0: 12.0, 1: 25.0}}
    assert curves_from(expected, "top1@k=20") == expected
    flat = {"raw": {"block0/top1@k=20": 10.0, "block1/top1@k=20": 30.0, "block1/top1@k=10": 99.0},
            "normed": {"block0/top1@k=20": 12.0, "block1/top1@k=20": 25.0}}
    assert curves_from(flat, "top1@k=20") == expected
    rows = [{"variant": v, "block": b, "value": x, "metric": "top1@k=20"} for v, c in expected.items() for b, x in c.items()]
    rows.append({"variant": "raw", "block": 5, "value": 1.0, "metric": "top5@k=20"})
    assert curves_from(rows, "top1@k=20") == expected
    assert curves_from({"block3/top1@k=20": 5.0}, "top1@k=20") == {"features": {3: 5.0}}
    with pytest.raises(UserError, match="variant"):
        curves_from([{"block": 1, "value": 2.0}], "top1@k=20")


def test_plot_writes_a_png_atomically(tmp_path):
    path = tmp_path / "plots" / "per_block.png"
    out = plot_per_block({"raw": {0: 10.0, 1: 30.0, 2: 20.0}, "normed": {0: 12.0, 1: 25.0, 2: 40.0}}, path,
                         title="MAE ViT-T")
    assert out == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert os.listdir(path.parent) == ["per_block.png"]          # no temporary file left behind
    with pytest.raises(UserError, match="no values"):
        plot_per_block({"raw": {"block0/top1@k=10": 1.0}}, tmp_path / "x.png", metric="top1@k=20")
    assert not (tmp_path / "x.png").exists()
