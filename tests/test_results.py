"""Metric rows, metrics.csv idempotency, run collection and the leaderboard on synthetic run folders."""

from __future__ import annotations

import json
import multiprocessing
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest

from sslbench.core.errors import UserError
from sslbench.results.metrics import (
    COLUMNS,
    MetricRow,
    build_leaderboard,
    collect_runs,
    hardware_description,
    leaderboard_markdown,
    read_metrics,
    refresh_leaderboard,
    versions,
    write_leaderboard,
    write_metrics,
)

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
    assert build_leaderboard(collect_runs(empty)).empty


def test_leaderboard_aggregates_seeds_and_separates_protocols(tmp_path: Path) -> None:
    _synthetic_runs(tmp_path)
    board = build_leaderboard(collect_runs(tmp_path))
    assert len(board) == 3
    keyed = board.set_index(["objective", "protocol_hash"])

    ref = keyed.loc[("mae+mim_refiner", "proto-A")]
    # Seed 1's old run (10.0) is replaced by its later run (82.0): mean over seeds of each seed's latest value.
    assert ref["knn/top1[k=20]"] == pytest.approx(statistics.mean([80.0, 82.0, 84.0]))
    assert ref["knn/top1[k=20] std"] == pytest.approx(statistics.stdev([80.0, 82.0, 84.0]))
    assert ref["knn/top1[k=10]"] == pytest.approx(80.0)
    assert ref["knn/top1[k=10] std"] == pytest.approx(statistics.stdev([79.0, 81.0]))
    assert ref["seeds"] == 3 and ref["latest_run"] in {"ref-seed1", "ref-seed2", "ref-seed0"}

    other = keyed.loc[("mae+mim_refiner", "proto-B")]  # never merged with proto-A
    assert other["knn/top1[k=20]"] == 99.0 and other["seeds"] == 1 and pd.isna(other["knn/top1[k=20] std"])
    mae = keyed.loc[("mae", "proto-A")]
    assert mae["knn/top1[k=100]"] == 42.0 and pd.isna(mae["knn/top1[k=10]"])

    metric_columns = [c for c in board.columns if c.startswith("knn/") and not c.endswith(" std")]
    assert metric_columns == ["knn/top1[k=10]", "knn/top1[k=20]", "knn/top1[k=100]"]  # natural order
    assert ("ghost" not in set(board["latest_run"])) and (board.drop(columns=["latest_run"]) != -1.0).all().all()


def test_stage_is_part_of_the_key(tmp_path: Path) -> None:
    write_metrics(tmp_path / "r", [row("r", 0, "k=20", 30.0, stage="pretrain"), row("r", 0, "k=20", 60.0)])
    board = build_leaderboard(collect_runs(tmp_path))
    assert sorted(zip(board["stage"], board["knn/top1[k=20]"])) == [("pretrain", 30.0), ("refine", 60.0)]


def test_ema_rows_share_columns_with_encoder_rows(tmp_path: Path) -> None:
    """The EMA's rows are told apart by their checkpoint label, so they land in the same metric columns."""
    write_metrics(tmp_path / "a", [row("a", 0, "k=20", 70.0)])
    write_metrics(tmp_path / "b", [row("b", 0, "k=20,ema", 75.0, checkpoint="scratch (ema)"),
                                   row("b", 0, "k=20,std,ema", 76.0, checkpoint="scratch (ema)")])
    write_metrics(tmp_path / "c", [row("c", 0, "k=20,ema", 1.0, checkpoint="scratch", objective="x")])
    board = build_leaderboard(collect_runs(tmp_path)).set_index(["objective", "checkpoint"])
    assert board.loc[("mae+mim_refiner", "scratch"), "knn/top1[k=20]"] == 70.0
    assert board.loc[("mae+mim_refiner", "scratch (ema)"), "knn/top1[k=20]"] == 75.0
    assert board.loc[("mae+mim_refiner", "scratch (ema)"), "knn/top1[k=20,std]"] == 76.0
    # Without the "(ema)" checkpoint label the marker stays: nothing else would tell the rows apart.
    assert board.loc[("x", "scratch"), "knn/top1[k=20,ema]"] == 1.0


def test_leaderboard_columns_come_from_the_variant_fields(tmp_path: Path) -> None:
    """Rows that carry their fields are grouped by them, not by the text: here the text is deliberately wrong."""
    ema = {"k": 20, "feature": "b1.cls.normed", "ema": True}
    write_metrics(tmp_path / "a", [row("a", 0, "ignored", 70.0, fields={"k": 20, "feature": "b1.cls.normed"})])
    write_metrics(tmp_path / "b", [row("b", 0, "also ignored", 75.0, checkpoint="scratch (ema)", fields=ema)])
    board = build_leaderboard(collect_runs(tmp_path)).set_index("checkpoint")
    assert board.loc["scratch", "knn/top1[k=20,b1.cls.normed]"] == 70.0
    assert board.loc["scratch (ema)", "knn/top1[k=20,b1.cls.normed]"] == 75.0
    frame = pd.read_csv(tmp_path / "b" / "metrics.csv")
    assert json.loads(frame["fields"][0]) == ema                   # stored as JSON, in the fields' order


def test_write_leaderboard_csv_and_markdown(tmp_path: Path) -> None:
    _synthetic_runs(tmp_path)
    board = build_leaderboard(collect_runs(tmp_path))
    out_csv, out_md = write_leaderboard(board, tmp_path / "leaderboard.csv")
    assert out_md == tmp_path / "leaderboard.md"
    back = pd.read_csv(out_csv)
    assert list(back.columns) == list(board.columns) and len(back) == 3
    assert back["knn/top1[k=20]"].tolist() == pytest.approx(board["knn/top1[k=20]"].tolist())

    md = out_md.read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert "knn/top1[k=20]" in header and not any(c.endswith(" std") for c in header)
    assert len(table) == 2 + 3 and all(line.count("|") == table[0].count("|") for line in table)
    assert "| ---: |" in table[1]  # numeric columns right-aligned
    ref_line = next(line for line in table if "proto-A" in line and "mae+mim_refiner" in line)
    cells = dict(zip(header, (c.strip() for c in ref_line.strip("|").split("|"))))
    assert cells["knn/top1[k=20]"] == "82.00 ± 2"
    assert cells["knn/top1[k=10]"] == "80.00 ± 1.4"
    assert cells["seeds"] == "3"
    mae_line = next(line for line in table if "| mae |" in line)
    assert dict(zip(header, (c.strip() for c in mae_line.strip("|").split("|"))))["knn/top1[k=10]"] == ""

    # Rewriting is idempotent: same content (no timestamp in the leaderboard itself).
    write_leaderboard(build_leaderboard(collect_runs(tmp_path)), tmp_path / "leaderboard.csv")
    assert out_md.read_text() == md
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "leaderboard.csv", "leaderboard.csv.lock", "leaderboard.md"]


def test_markdown_escapes_pipes_and_shortens_protocol_hash() -> None:
    board = pd.DataFrame({"objective": ["a|b"], "protocol_hash": ["0123456789abcdef0123"], "x/top1": [0.81234]})
    md = leaderboard_markdown(board)
    assert "a\\|b" in md and "0123456789ab " in md and "0123456789abc" not in md and "0.8123" in md


def test_refresh_leaderboard_collects_the_runs_under_the_lock(tmp_path: Path, monkeypatch) -> None:
    """Collecting outside the lock let an older writer replace a newer board; the rows are read while the lock is
    held, so no other writer can be between its read and its write."""
    import fcntl
    import os

    import sslbench.results.metrics as results

    _synthetic_runs(tmp_path / "runs")
    out = tmp_path / "leaderboard.csv"
    held = []

    def collecting(root):
        fd = os.open(out.with_name(out.name + ".lock"), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        return collect_runs(root)

    monkeypatch.setattr(results, "collect_runs", collecting)
    refresh_leaderboard(tmp_path / "runs", out)
    assert held == [True]
    assert len(pd.read_csv(out)) == len(build_leaderboard(collect_runs(tmp_path / "runs")))
