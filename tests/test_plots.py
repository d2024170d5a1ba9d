"""Plots from recorded rows: a run's per-block table and curve; `sslbench leaderboard --plots`."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sslbench.cli import main
from sslbench.results.plots import main_metric_columns, per_block_table, write_run_per_block
from sslbench.results.metrics import write_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def row(run: str, evaluator: str, metric: str, variant: str, value: float, **over) -> dict:
    base = dict(run_id=run, recipe_hash="r", protocol_hash="p" * 16, objective="mae", backbone="vit_t",
                dataset="digits", checkpoint=f"scratch → {run}", seed=0, stage="stage0", evaluator=evaluator,
                metric=metric, variant=variant, value=value)
    return {**base, **over}


def per_block_rows(run: str, depth: int = 3, **over) -> list[dict]:
    return [row(run, "per_block", metric, f"k={k},block={b},{stream}", 50 + b + k / 10 + (stream == "raw"), **over)
            for b in range(depth) for stream in ("raw", "normed") for k in (10, 20) for metric in ("top1", "top5")]


def is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG) and len(data) > 1000


def test_per_block_table_and_run_files(tmp_path):
    rows = per_block_rows("a") + [row("a", "knn", "top1", "k=20,b2.cls.normed", 70.0)]
    rows[0]["value"] = 7504 / 10000 * 100  # 75.03999999999999, as an accuracy from counts comes out
    write_metrics(tmp_path, rows)
    written = write_run_per_block(tmp_path)
    assert [p.name for p in written] == ["per_block.csv", "per_block.png"] and is_png(tmp_path / "per_block.png")
    table = pd.read_csv(tmp_path / "per_block.csv")
    assert list(table["block"]) == [0, 1, 2] and table.loc[1, "top1@k=20,raw"] == 50 + 1 + 2 + 1
    assert {"top5@k=10,normed", "top1@k=10,raw"} <= set(table.columns)
    text = (tmp_path / "per_block.csv").read_text()
    assert "75.04" in text and "75.0399" not in text


def test_per_block_table_ignores_other_rows_and_keeps_ema_streams():
    frame = pd.DataFrame(per_block_rows("a", depth=2) + [row("a", "per_block", "top1", "k=20,block=1,raw,ema", 1.0),
                                                         row("a", "knn", "top1", "k=20,b1.cls.normed", 9.0)])
    table = per_block_table(frame)
    assert "top1@k=20,raw,ema" in table.columns and len(table) == 2
    assert per_block_table(pd.DataFrame([row("a", "knn", "top1", "k=20", 1.0)])).empty


def test_run_without_per_block_rows_writes_nothing(tmp_path):
    write_metrics(tmp_path, [row("a", "knn", "top1", "k=20,b2.cls.normed", 70.0)])
    assert write_run_per_block(tmp_path) == [] and not (tmp_path / "per_block.png").exists()
    assert write_run_per_block(tmp_path / "missing") == []


def test_leaderboard_plots(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_metrics(runs / "with_blocks", per_block_rows("with_blocks") + [
        row("with_blocks", "knn", "top1", "k=20,b2.cls.normed", 70.0),
        row("with_blocks", "linear_probe", "top1", "best,normed", 75.0),
        row("with_blocks", "linear_probe", "top1", "last1,normed", 72.0)])
    write_metrics(runs / "knn_only", [row("knn_only", "knn", "top1", "k=20,b2.cls.normed", 60.0, objective="mim")])
    write_metrics(runs / "other_protocol", [row("x", "clustering", "acc", "test,b2.cls.normed", 40.0,
                                                protocol_hash="q" * 16)])
    out = tmp_path / "board" / "leaderboard.csv"
    assert main(["leaderboard", str(runs), "-o", str(out), "--plots"]) == 0
    plots = tmp_path / "board" / "plots"
    assert sorted(p.name for p in plots.iterdir()) == ["metrics_pppppppppppp.png", "metrics_qqqqqqqqqqqq.png",
                                                        "per_block_with_blocks.png"]
    assert all(is_png(p) for p in plots.iterdir())
    assert "3 plots" in capsys.readouterr().out


def test_leaderboard_without_plots_option_or_rows(tmp_path):
    runs = tmp_path / "runs"
    write_metrics(runs / "a", [row("a", "knn", "top1", "k=20", 60.0)])
    assert main(["leaderboard", str(runs), "-o", str(tmp_path / "lb.csv")]) == 0
    assert not (tmp_path / "plots").exists()
    (runs / "empty").mkdir()
    assert main(["leaderboard", str(runs / "empty"), "-o", str(tmp_path / "e.csv"), "--plots"]) == 0
    assert not (tmp_path / "plots").exists() or not any((tmp_path / "plots").iterdir())


def test_main_metric_columns():
    board = pd.DataFrame(columns=["objective", "knn/top1[k=20,b11.cls.normed]", "knn/top5[k=20,b11.cls.normed]",
                                  "linear_probe/top1[best,normed]", "linear_probe/top1[last1,normed]",
                                  "linear_probe/val_top1[best,normed]", "clustering/nmi[test,b11.cls.normed]",
                                  "clustering/nmi[test,b11.cls.normed] std", "per_block/top1[k=20,block=3,raw]"])
    assert main_metric_columns(board) == ["knn/top1[k=20,b11.cls.normed]", "linear_probe/top1[best,normed]",
                                          "clustering/nmi[test,b11.cls.normed]"]


def test_value_axis_limits_show_small_differences():
    from sslbench.results.plots import value_axis_limits

    assert value_axis_limits([80.7, 80.96, 81.0]) == pytest.approx((79.7, 82.0))
    assert value_axis_limits([20.0, 80.0]) == pytest.approx((0.0, 110.0))  # never below 0


def test_per_block_table_reads_the_fields_not_the_text():
    fields = [{"k": 20, "block": b, "stream": "raw", "std": False} for b in range(3)]
    frame = pd.DataFrame([row("a", "per_block", "top1", "not parsed", 60.0 + b, fields=json.dumps(f))
                          for b, f in enumerate(fields)])
    table = per_block_table(frame)
    assert list(table["block"]) == [0, 1, 2] and list(table["top1@k=20,raw"]) == [60.0, 61.0, 62.0]
