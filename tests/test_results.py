"""Metric rows, metrics.csv idempotency, run collection and the grouping of rows into leaderboard entries."""

from __future__ import annotations

import json
import multiprocessing
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest

from sslbench.core.errors import UserError
from sslbench.results.aggregate import build_entries, fields_from_variant, long_form
from sslbench.results.metrics import COLUMNS, MetricRow, collect_runs, hardware_description, read_metrics, versions, \
    write_metrics

BASE = dict(recipe_hash="rh", protocol_hash="proto-A", objective="mae+mim_refiner", backbone="vit_tiny",
            dataset="fmnist", checkpoint="scratch", stage="refine", evaluator="knn", metric="top1")


def row(run_id: str, seed: int, variant: str, value: float, **overrides) -> dict:
    return {**BASE, "run_id": run_id, "seed": seed, "variant": variant, "value": value, **overrides}


def test_environment_helpers() -> None:
    v = versions()
    assert set(v) == {"sslbench_version", "torch_version", "timm_version"}
    import sslbench
    import torch

    assert v["sslbench_version"] == sslbench.__version__ and v["torch_version"] == torch.__version__
    hardware = hardware_description()
    assert re.fullmatch(r"cpu: \d+ cores .+", hardware) or re.fullmatch(r"\d+x .+", hardware)


def test_metric_row_fills_environment_and_has_all_columns() -> None:
    r = MetricRow(run_id="a", recipe_hash="r", protocol_hash="p", objective="mae", backbone="b", dataset="d",
                  checkpoint="", seed=0, stage="s", evaluator="knn", metric="top1", variant="", value=0.5)
    d = r.as_dict()
    assert tuple(d) == COLUMNS
    assert d["hardware"] == hardware_description() and d["timm_version"] == versions()["timm_version"]
    assert d["timestamp"].endswith("+00:00") and d["selection_split"] == "none"


def test_write_metrics_is_idempotent_and_replaces_by_key(tmp_path: Path) -> None:
    run = tmp_path / "run0"
    rows = [row("run0", 0, "k=10", 70.0), row("run0", 0, "k=20", 71.0), row("run0", 0, "", 3.0, metric="loss")]
    write_metrics(run, rows)
    first = read_metrics(run / "metrics.csv")
    write_metrics(run, rows)  # same rows again: still one copy each
    again = read_metrics(run / "metrics.csv")
    cols = ["stage", "evaluator", "metric", "variant", "value"]
    pd.testing.assert_frame_equal(first[cols], again[cols])
    assert len(again) == 3

    # A new value for one key replaces only that row; a new key is appended; other rows survive.
    write_metrics(run, [row("run0", 0, "k=20", 75.5), row("run0", 0, "k=20", 60.0, stage="pretrain")])
    final = read_metrics(run / "metrics.csv")
    assert len(final) == 4
    by_key = {(r.stage, r.metric, r.variant): r.value for r in final.itertuples()}
    assert by_key == {("refine", "top1", "k=10"): 70.0, ("refine", "top1", "k=20"): 75.5,
                      ("refine", "loss", ""): 3.0, ("pretrain", "top1", "k=20"): 60.0}
    # Empty variants survive the CSV round trip as "", not NaN, so they keep matching on rewrite.
    assert (final["variant"] == "").sum() == 1
    assert list(final.columns) == list(COLUMNS)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.csv", "metrics.csv.lock"]


def test_write_metrics_rejects_incomplete_or_duplicate_rows(tmp_path: Path) -> None:
    bad = row("r", 0, "k=10", 1.0)
    del bad["objective"]
    with pytest.raises(ValueError, match="objective"):
        write_metrics(tmp_path, [bad])
    with pytest.raises(ValueError, match="repeat"):
        write_metrics(tmp_path, [row("r", 0, "k=10", 1.0), row("r", 0, "k=10", 2.0)])
    assert not (tmp_path / "metrics.csv").exists()


def _append_rows(run_dir: str, worker: int, count: int) -> None:
    for i in range(count):
        write_metrics(run_dir, [row("r", 0, f"w{worker}-{i}", float(i))])


def test_concurrent_write_metrics_lose_no_rows(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_rows, args=(str(tmp_path), w, 15)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert len(read_metrics(tmp_path / "metrics.csv")) == 30  # read-modify-write under the lock: nothing lost


def test_collect_runs_reads_every_run_recursively(tmp_path: Path) -> None:
    _synthetic_runs(tmp_path)
    df = collect_runs(tmp_path)
    assert sorted(set(df["run_id"])) == ["mae-seed0", "ref-other-protocol", "ref-seed0", "ref-seed1",
                                         "ref-seed1-old", "ref-seed2"]
    assert len(df) == 9 and df["value"].dtype == float and "run_dir" in df
    with pytest.raises(UserError, match="no such results folder"):
        collect_runs(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_entries(collect_runs(empty)) == []


def _by(entries, objective, protocol="proto-A"):
    return next(e for e in entries if e.key["objective"] == objective and e.protocol == protocol)


def test_entries_aggregate_seeds_and_separate_protocols(tmp_path: Path) -> None:
    _synthetic_runs(tmp_path)
    entries = build_entries(collect_runs(tmp_path))
    assert len(entries) == 3
    ref = _by(entries, "mae+mim_refiner")
    k20 = ref.results[("knn", "top1", "k=20")]
    # Seed 1's old run (10.0) is replaced by its later run (82.0): mean over seeds of each seed's latest value.
    assert k20.values == {0: 80.0, 1: 82.0, 2: 84.0} and k20.mean == pytest.approx(82.0)
    # Three seeds: the Student-t interval over them, t(0.975, 2) · s / √3.
    half = 4.302652729911275 * statistics.stdev([80.0, 82.0, 84.0]) / 3 ** 0.5
    assert (k20.interval.low, k20.interval.high) == pytest.approx((82.0 - half, 82.0 + half))
    assert ref.seeds == 3 and ref.runs == {0: "ref-seed0", 1: "ref-seed1", 2: "ref-seed2"}

    other = _by(entries, "mae+mim_refiner", "proto-B")  # never merged with proto-A
    assert other.results[("knn", "top1", "k=20")].values == {0: 99.0} and other.seeds == 1
    assert other.results[("knn", "top1", "k=20")].interval is None       # one seed and no per-sample record
    mae = _by(entries, "mae")
    assert set(mae.results) == {("knn", "top1", "k=20"), ("knn", "top1", "k=100")}
    assert all(e.name != "ghost" for e in entries)


def test_stage_is_part_of_the_key(tmp_path: Path) -> None:
    write_metrics(tmp_path / "r", [row("r", 0, "k=20", 30.0, stage="pretrain"), row("r", 0, "k=20", 60.0)])
    entries = build_entries(collect_runs(tmp_path))
    assert sorted((e.key["stage"], e.results[("knn", "top1", "k=20")].mean) for e in entries) == [
        ("pretrain", 30.0), ("refine", 60.0)]


def test_ema_rows_share_columns_with_encoder_rows(tmp_path: Path) -> None:
    """The EMA's rows are told apart by their checkpoint label, so they land in the same result columns."""
    write_metrics(tmp_path / "a", [row("a", 0, "k=20", 70.0)])
    write_metrics(tmp_path / "b", [row("b", 0, "k=20,ema", 75.0, checkpoint="scratch (ema)"),
                                   row("b", 0, "k=20,std,ema", 76.0, checkpoint="scratch (ema)")])
    write_metrics(tmp_path / "c", [row("c", 0, "k=20,ema", 1.0, checkpoint="scratch", objective="x")])
    entries = {(e.key["objective"], e.key["checkpoint"]): e for e in build_entries(collect_runs(tmp_path))}
    assert entries[("mae+mim_refiner", "scratch")].results[("knn", "top1", "k=20")].mean == 70.0
    ema = entries[("mae+mim_refiner", "scratch (ema)")]
    assert ema.results[("knn", "top1", "k=20")].mean == 75.0 and ema.results[("knn", "top1", "k=20,std")].mean == 76
    assert ema.ema and ema.name == "b (ema)" and ema.results[("knn", "top1", "k=20")].fields == {"k": 20}
    # Without the "(ema)" checkpoint label the marker stays: nothing else would tell the rows apart.
    assert entries[("x", "scratch")].results[("knn", "top1", "k=20,ema")].mean == 1.0


def test_entries_read_the_variant_fields_and_parse_old_rows(tmp_path: Path) -> None:
    """Rows that carry their fields are grouped by them, not by the text: here the text is deliberately wrong."""
    ema = {"k": 20, "feature": "b1.cls.normed", "ema": True}
    write_metrics(tmp_path / "a", [row("a", 0, "ignored", 70.0, fields={"k": 20, "feature": "b1.cls.normed"})])
    write_metrics(tmp_path / "b", [row("b", 0, "also ignored", 75.0, checkpoint="scratch (ema)", fields=ema)])
    entries = {e.key["checkpoint"]: e for e in build_entries(collect_runs(tmp_path))}
    assert entries["scratch"].results[("knn", "top1", "k=20,b1.cls.normed")].mean == 70.0
    assert entries["scratch (ema)"].results[("knn", "top1", "k=20,b1.cls.normed")].mean == 75.0
    frame = pd.read_csv(tmp_path / "b" / "metrics.csv")
    assert json.loads(frame["fields"][0]) == ema                   # stored as JSON, in the fields' order
    # rows from before the fields were kept: parsed from the text
    assert fields_from_variant("k=20,block=3,raw,std") == {"k": 20, "block": 3, "stream": "raw", "std": True}
    assert fields_from_variant("1pct,b11.cls.normed") == {"setting": "1pct", "feature": "b11.cls.normed"}
    assert fields_from_variant("best,normed") == {"head": "best", "stream": "normed"}
    assert fields_from_variant("test,b-1.mean.raw,ema") == {"split": "test", "feature": "b-1.mean.raw", "ema": True}


def test_long_form_has_one_row_per_run_and_result(tmp_path: Path) -> None:
    _synthetic_runs(tmp_path)
    frame = long_form(build_entries(collect_runs(tmp_path)))
    # ref: 3 seeds of k=20 and 2 of k=10; the other protocol: 1; mae: k=20 and k=100 (the replaced run is gone)
    assert len(frame) == 3 + 2 + 1 + 2
    ref = frame[(frame["objective"] == "mae+mim_refiner") & (frame["protocol_hash"] == "proto-A")]
    k10 = ref[ref["variant"] == "k=10"].sort_values("seed")
    assert list(k10["run_id"]) == ["ref-seed0", "ref-seed1"] and list(k10["value"]) == [79.0, 81.0]
    assert (k10["entry_mean"] == 80.0).all() and (k10["seeds"] == 2).all()
    assert k10["entry_interval"].iloc[0].startswith("t over 2") and k10["low"].isna().all()   # no records here
    for column in ("dataset", "backbone", "entry", "start", "evaluator", "metric", "hardware", "versions",
                   "recipe_hash", "entry_low", "entry_high", "fields", "test_set"):
        assert column in frame


def _synthetic_runs(root: Path) -> None:
    """Three seeds of one model (seed 1 run twice: the later run must win), a different protocol, a baseline."""
    write_metrics(root / "runs" / "ref-seed0", [row("ref-seed0", 0, "k=20", 80.0), row("ref-seed0", 0, "k=10", 79.0)])
    write_metrics(root / "runs" / "ref-seed1-old", [row("ref-seed1-old", 1, "k=20", 10.0,
                                                        timestamp="2020-01-01T00:00:00+00:00")])
    write_metrics(root / "runs" / "ref-seed1", [row("ref-seed1", 1, "k=20", 82.0), row("ref-seed1", 1, "k=10", 81.0)])
    write_metrics(root / "runs" / "ref-seed2", [row("ref-seed2", 2, "k=20", 84.0)])
    write_metrics(root / "runs" / "ref-other-protocol", [row("ref-other-protocol", 0, "k=20", 99.0,
                                                             protocol_hash="proto-B")])
    write_metrics(root / "runs" / "mae-seed0", [row("mae-seed0", 0, "k=20", 40.0, objective="mae"),
                                                row("mae-seed0", 0, "k=100", 42.0, objective="mae")])
    # A half-built atomic directory is not a run.
    write_metrics(root / "runs" / ".tmp-ghost-123", [row("ghost", 0, "k=20", -1.0)])
