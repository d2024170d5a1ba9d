"""A run's training signals from log.jsonl: the table (epochs counted over the run) and training.png."""

from __future__ import annotations

import json

import pytest

from sslbench.results.budget import read_log, run_epochs
from sslbench.results.plots import monitor_curve
from sslbench.results.training_plots import _panels, signals_table, write_run_training


def two_stage_log(run_dir, with_signals=True):
    lines = []
    for stage, name, epochs in ((0, "head_preparation", 2.0), (1, "contrastive_tuning", 3.0)):
        for step in range(1, 5):
            epoch = epochs * step / 4
            record = {"stage": stage, "stage_name": name, "step": step, "epoch": epoch, "loss": 5.0 - step / 4,
                      "lr": 1e-4, "images_per_s": 100.0}
            if with_signals:
                record.update({"nn_acc": 0.5 + step / 10, "std_projected": 0.9, "std_features": 0.4})
            lines.append(record)
        lines.append({"kind": "monitor", "stage": stage, "stage_name": name, "step": 4, "epoch": epochs,
                      "knn_top1": 80.0 + stage, "ema": False, "monitor_seconds": 1.0})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return lines


def test_epochs_continue_over_stages(tmp_path):
    lines = two_stage_log(tmp_path / "run")
    assert run_epochs(lines) == {0: 0.0, 1: 2.0}
    table = signals_table(lines)
    train = table[table.kind == "train"]
    assert train.run_epoch.tolist() == [0.5, 1.0, 1.5, 2.0, 2.75, 3.5, 4.25, 5.0]
    assert train.nn_acc.tolist() == pytest.approx([0.6, 0.7, 0.8, 0.9] * 2)
    monitor = table[table.kind == "monitor"]
    assert monitor.run_epoch.tolist() == [2.0, 5.0] and monitor.knn_top1.tolist() == [80.0, 81.0]
    # the leaderboard's learning curve counts the epochs the same way
    assert monitor_curve(tmp_path / "run") == [(2.0, 80.0), (5.0, 81.0)]
    # a stage whose first monitor line comes before its first training line (a killed run, log_every > monitor step)
    early = lines[:5] + [{"kind": "monitor", "stage": 1, "epoch": 0.0, "knn_top1": 79.0}]
    assert run_epochs(early) == {0: 0.0, 1: 2.0}
    assert signals_table(early).run_epoch.tolist()[-1] == 2.0


def test_panels_follow_what_was_logged(tmp_path):
    full = _panels(signals_table(two_stage_log(tmp_path / "a")))
    assert [columns for _, _, columns in full] == [["loss"], ["nn_acc"], ["std_projected", "std_features"],
                                                   ["knn_top1"]]
    plain = _panels(signals_table(two_stage_log(tmp_path / "b", with_signals=False)))
    assert [columns for _, _, columns in plain] == [["loss"], ["knn_top1"]]
    per_head = signals_table([{"epoch": 1.0, "loss": 1.0, "out_nn_acc": 0.5, "block8_nn_acc": 0.4,
                               "out_std_projected": 1.0, "loss_out": 0.5}])
    assert [columns for _, _, columns in _panels(per_head)] == [["loss"], ["out_nn_acc", "block8_nn_acc"],
                                                                ["out_std_projected"]]


def test_training_png_is_written_for_trained_runs_only(tmp_path):
    run = tmp_path / "run"
    two_stage_log(run)
    path = write_run_training(run)
    assert path == run / "training.png" and path.stat().st_size > 5000
    assert sorted(p.name for p in run.iterdir()) == ["log.jsonl", "training.png"]    # no temporary file left
    evaluated = tmp_path / "eval"
    evaluated.mkdir()
    assert write_run_training(evaluated) is None                                     # no log at all
    (evaluated / "log.jsonl").write_text(json.dumps({"kind": "monitor", "epoch": 1.0, "knn_top1": 50.0}) + "\n")
    assert write_run_training(evaluated) is None and read_log(evaluated)            # no training lines
    assert not (evaluated / "training.png").exists()
    bare = tmp_path / "bare"                                                         # training lines, no signal
    bare.mkdir()
    (bare / "log.jsonl").write_text(json.dumps({"stage": 0, "step": 1, "epoch": 0.5, "lr": 1e-3}) + "\n")
    assert write_run_training(bare) is None
