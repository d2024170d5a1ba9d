"""Plots from recorded rows: a run's per-block table and curve (the leaderboard's figures: test_leaderboard.py)."""

from __future__ import annotations

import json

import pandas as pd

from sslbench.results.plots import per_block_table, write_run_per_block
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


def test_per_block_table_reads_the_fields_not_the_text():
    fields = [{"k": 20, "block": b, "stream": "raw", "std": False} for b in range(3)]
    frame = pd.DataFrame([row("a", "per_block", "top1", "not parsed", 60.0 + b, fields=json.dumps(f))
                          for b, f in enumerate(fields)])
    table = per_block_table(frame)
    assert list(table["block"]) == [0, 1, 2] and list(table["top1@k=20,raw"]) == [60.0, 61.0, 62.0]
