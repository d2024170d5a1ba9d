"""Online monitoring (``[monitor]``): k-NN rows in a tiny run's log at the right steps; a monitored run trains
bit-identically to an unmonitored one and has the same recipe hash; a resume rewrites the rows exactly; bad keys
fail in one line before a folder is made; the report draws the learning curve; two processes measure like one."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from sslbench.cli import main
from sslbench.core.registry import get_registry
from sslbench.training.recipe import MONITOR, resolve, to_toml

from .conftest import dump_recipe

MONITORED = {"every_steps": 2, "train_samples": 200, "test_samples": 100, "k": 5}
TIMING = ("time", "images_per_s", "monitor_seconds")


def _write(tmp_path, recipe: dict, name: str, monitor: dict | None = None, output: str = "runs"):
    recipe = copy.deepcopy(recipe)
    recipe["run"].update(name=name, output_dir=str(tmp_path / output))
    if monitor is not None:
        recipe["monitor"] = dict(monitor)
    path = tmp_path / f"{name}-{output}.toml"
    path.write_text(dump_recipe(recipe))
    return path, tmp_path / output / name


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _untimed(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


def _monitor_rows(run_dir) -> list[dict]:
    return [line for line in _log(run_dir) if line.get("kind") == "monitor"]


def test_monitored_run_logs_knn_rows_and_trains_bit_identically(tmp_path, tiny_recipe):
    tiny_recipe["stages"][0]["steps"] = 5
    plain, plain_dir = _write(tmp_path, tiny_recipe, "tiny", output="plain")
    watched_recipe = copy.deepcopy(tiny_recipe)
    watched_recipe["run"]["trackers"] = ["tensorboard"]                          # cosmetic too
    # every image and the evaluator's k: the last row must be the final evaluation's k-NN
    watched, watched_dir = _write(tmp_path, watched_recipe, "tiny", {**MONITORED, "train_samples": 0,
                                                                    "test_samples": 0, "k": 10}, output="watched")
    assert main(["run", str(plain), "--no-progress"]) == 0
    assert main(["run", str(watched), "--no-progress"]) == 0

    rows = _monitor_rows(watched_dir)
    # before training, every 2 steps, and at the stage's last step; written after the step's training line
    assert [r["global_step"] for r in rows] == [0, 2, 4, 5]
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 and r["monitor_seconds"] > 0 for r in rows)
    assert all(r["stage"] == 0 and r["stage_name"] == "stage0" and r["ema"] is False for r in rows)
    log = _log(watched_dir)
    assert rows[-1]["epoch"] == next(r["epoch"] for r in log if r.get("step") == 5 and "loss" in r)
    assert log.index(rows[1]) == log.index(next(r for r in log if r.get("global_step") == 2 and "loss" in r)) + 1
    assert not _monitor_rows(plain_dir)

    # Monitoring changes nothing that training computes: the same losses (bit for bit), weights and results.
    training = [line for line in log if line.get("kind") != "monitor"]
    assert _untimed(training) == _untimed(_log(plain_dir))
    a, b = (torch.load(d / "checkpoints" / "backbone.pt", weights_only=False) for d in (plain_dir, watched_dir))
    assert a["recipe_hash"] == b["recipe_hash"]
    assert all(torch.equal(a["backbone"][name], b["backbone"][name]) for name in a["backbone"])
    import pandas as pd

    results = [pd.read_csv(d / "metrics.csv") for d in (plain_dir, watched_dir)]
    assert results[0]["value"].tolist() == results[1]["value"].tolist()
    final = results[1].set_index(["metric", "variant"])["value"]
    assert (rows[-1]["knn_top1"], rows[-1]["knn_top5"]) == \
        (final[("top1", "k=10,b1.cls.normed")], final[("top5", "k=10,b1.cls.normed")])
    meta = [json.loads((d / "recipe.json").read_text()) for d in (plain_dir, watched_dir)]
    assert meta[0]["recipe_hash"] == meta[1]["recipe_hash"] and meta[0]["protocol_hash"] == meta[1]["protocol_hash"]

    # The budget counts training only; the seconds of the monitor are not in the images/s of the line after it.
    from sslbench.results.budget import run_budget

    plain_budget, watched_budget = run_budget(plain_dir), run_budget(watched_dir)
    assert (plain_budget.images, plain_budget.epochs, plain_budget.steps) == \
        (watched_budget.images, watched_budget.epochs, watched_budget.steps)

    # ... and the trackers got the rows under names of their own.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (watched_dir / "trackers").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"monitor/knn_top1", "monitor/knn_top5", "loss"} <= tags


def test_schedule_of_measurements():
    from sslbench.training.monitor import Monitor

    monitor = Monitor.__new__(Monitor)
    monitor.spec = types.SimpleNamespace(every_steps=0, every_epochs=0.5)
    assert monitor.interval(21) == 10 and monitor.interval(1) == 1
    assert [s for s in range(1, 43) if monitor.due(s, 42, 21)] == [10, 20, 30, 40, 42]
    monitor.spec = types.SimpleNamespace(every_steps=7, every_epochs=0.0)
    assert [s for s in range(1, 15) if monitor.due(s, 14, 21)] == [7, 14]


def test_the_subsets_are_fixed_whatever_the_seed_and_leave_the_random_state_alone():
    from sslbench.training.monitor import subset_indices

    state = torch.get_rng_state()
    torch.manual_seed(1)
    first = subset_indices(1000, 100, 7)
    torch.manual_seed(2)
    assert torch.equal(first, subset_indices(1000, 100, 7))
    assert first.unique().numel() == 100 and torch.equal(first, first.sort().values)
    assert torch.equal(subset_indices(50, 0, 7), torch.arange(50))
    torch.manual_seed(2)
    before = torch.get_rng_state()
    subset_indices(1000, 100, 7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.set_rng_state(state)


def test_the_section_is_left_out_of_the_hashes_and_round_trips(tiny_recipe, tmp_path):
    import dataclasses

    from sslbench.results.aggregate import SEED_FREE_SECTIONS, recipe_family
    from sslbench.training.spec import COSMETIC_SECTIONS, MonitorSpec, Recipe

    assert SEED_FREE_SECTIONS == COSMETIC_SECTIONS

    assert [f.name for f in dataclasses.fields(MonitorSpec)] == list(MONITOR)
    assert {f.name: f.default for f in dataclasses.fields(MonitorSpec)} == {k: o.default for k, o in MONITOR.items()}
    registry = get_registry()
    plain = resolve(copy.deepcopy(tiny_recipe), registry)
    watched = resolve({**copy.deepcopy(tiny_recipe), "monitor": {**MONITORED, "use_ema": False, "block": 0}},
                      registry)
    assert watched.monitor.enabled and not plain.monitor.enabled and watched.monitor.block == 0
    assert watched != plain
    assert (watched.recipe_hash, watched.protocol_hash) == (plain.recipe_hash, plain.protocol_hash)
    # a resolved recipe written before the section existed (an old recipe.json) reads back with the same hash
    old = plain.as_dict()
    del old["monitor"]
    assert Recipe.from_dict(old) == plain and Recipe.from_dict(old).recipe_hash == plain.recipe_hash
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(watched))
    assert "[monitor]" in path.read_text()
    from sslbench.training.recipe import load_recipe

    assert load_recipe(path, registry) == watched
    # seeds of one recipe are averaged whatever their monitoring
    families = []
    for name, recipe in (("a", plain), ("b", watched)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.json").write_text(json.dumps({"recipe_hash": recipe.recipe_hash,
                                                                 "recipe": recipe.as_dict()}))
        families.append(recipe_family(str(tmp_path / name)))
    assert families[0] == families[1] != ""


class Interrupted(BaseException):
    """Stands for a kill: nothing catches it."""


def test_resume_writes_the_same_monitor_rows(tmp_path, tiny_recipe, monkeypatch):
    from sslbench.training.resume import load_resume_state
    from sslbench.training.trainer import StageTrainer

    tiny_recipe["run"]["checkpoint_every"] = 2
    tiny_recipe["stages"][0].update(steps=6, batch_size=32)
    tiny_recipe["eval"] = []
    reference, reference_dir = _write(tmp_path, tiny_recipe, "resume", MONITORED, output="reference")
    assert main(["run", str(reference), "--no-progress"]) == 0

    path, run_dir = _write(tmp_path, tiny_recipe, "resume", MONITORED)
    measure = StageTrainer._monitor

    def killed_at_step_6(self, progress, bar):
        if progress.global_step == 6:
            raise Interrupted
        return measure(self, progress, bar)

    monkeypatch.setattr(StageTrainer, "_monitor", killed_at_step_6)
    with pytest.raises(Interrupted):
        main(["run", str(path), "--no-progress"])
    monkeypatch.undo()
    assert load_resume_state(run_dir / "checkpoints" / "last.pt")["meta"]["progress"]["global_step"] == 4
    assert [r["global_step"] for r in _monitor_rows(run_dir)] == [0, 2, 4]
    assert max(r["global_step"] for r in _log(run_dir)) == 6                     # lines past the checkpoint

    assert main(["run", str(path), "--resume", "--no-progress"]) == 0
    assert [r["global_step"] for r in _monitor_rows(run_dir)] == [0, 2, 4, 6]
    assert _untimed(_log(run_dir)) == _untimed(_log(reference_dir))


@pytest.mark.parametrize("monitor,key,words", [
    ({"every_steps": 2, "train_samples": 10, "k": 20}, "monitor.k", "train_samples is 10"),
    ({"every_steps": 2, "every_epochs": 1.0}, "monitor.every_steps", "not both"),
    ({"every_steps": 2, "use_ema": True}, "monitor.use_ema", "ema_momentum"),
    ({"every_epochs": 1.0, "train_samples": 100_000}, "monitor.train_samples", "has only"),
    ({"every_epochs": 1.0, "train_samples": 200, "test_samples": 100_000}, "monitor.test_samples", "data.test has only"),
    ({"every_epochs": 1.0, "block": 2}, "monitor.block", "2 blocks"),
    ({"every_epochs": 1.0, "kk": 2}, "monitor.kk", "unknown key"),
], ids=["k", "both", "ema", "train_samples", "test_samples", "block", "unknown"])
def test_bad_monitor_keys_fail_in_one_line_before_the_run_folder(tmp_path, tiny_recipe, capsys, monitor, key,
                                                                 words):
    path, run_dir = _write(tmp_path, tiny_recipe, "bad", monitor)
    capsys.readouterr()
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: {key}: ") and words in err[0], err
    assert not run_dir.exists()


def test_report_draws_the_learning_curve(tmp_path):
    from .test_leaderboard import correct, knn, make_run

    def log(values, seed_shift=0.0):
        lines = [{"stage": 0, "step": 10, "epoch": 0.5, "images_per_s": 100.0},
                 {"stage": 0, "step": 20, "epoch": 1.0, "images_per_s": 50.0}]
        for step, value in zip((0, 10, 20), values):
            lines.append({"kind": "monitor", "stage": 0, "step": step, "global_step": step, "epoch": step / 20,
                          "knn_top1": value + seed_shift, "monitor_seconds": 0.5})
        return sorted(lines, key=lambda line: line["step"])

    root = tmp_path / "results"
    make_run(root, "digits_mae-seed0", [knn(correct(300))], log=log([20, 40, 60]))
    make_run(root, "digits_mae-seed1", [knn(correct(305))], seed=1, log=log([20, 40, 60], 2.0))
    make_run(root, "digits_maect", [knn(correct(320))])                            # no monitor lines
    assert main(["report", str(root)]) == 0
    html = (root / "report.html").read_text()
    assert html.count("<img ") == 2 and "learning figure" in html and 'src="data:image/png;base64,' in html
    learning = list((root / "plots").glob("learning_*.png"))
    assert len(learning) == 1 and learning[0].stat().st_size > 5_000
    # the budget of a run with monitor lines counts only its training lines
    from sslbench.results.budget import run_budget

    budget = run_budget(root / "digits_mae-seed0")
    assert budget.seconds == pytest.approx(10 * 100 / 100 + 10 * 100 / 50) and budget.epochs == 1.0
    # curves continue over stages: a second stage's epoch 0 is the first stage's last
    from sslbench.results.plots import monitor_curve

    two_stages = make_run(root, "two", [knn(correct(300))], log=[
        {"stage": 0, "step": 20, "epoch": 2.0, "images_per_s": 9.0},
        {"kind": "monitor", "stage": 0, "step": 20, "global_step": 20, "epoch": 2.0, "knn_top1": 50.0},
        {"kind": "monitor", "stage": 1, "step": 10, "global_step": 30, "epoch": 0.5, "knn_top1": 55.0}])
    assert monitor_curve(two_stages) == [(2.0, 50.0), (2.5, 55.0)]
    # without monitor lines anywhere, no learning figure (and a stale one goes)
    for name in ("digits_mae-seed0", "digits_mae-seed1", "two"):
        (root / name / "log.jsonl").write_text("")
    assert main(["report", str(root)]) == 0
    assert not list((root / "plots").glob("learning_*.png"))
    assert (root / "report.html").read_text().count("<img ") == 1


def test_two_processes_monitor_like_one(tmp_path, tiny_recipe):
    tiny_recipe["stages"][0].update(steps=2, batch_size=32)
    tiny_recipe["eval"] = []
    monitor = {**MONITORED, "train_samples": 0, "test_samples": 0}                # every image: sharding covers all
    one, one_dir = _write(tmp_path, tiny_recipe, "one", monitor)
    two, two_dir = _write(tmp_path, tiny_recipe, "two", monitor)
    assert main(["run", str(one), "--no-progress"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSLBENCH_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sslbench",
           "run", str(two)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows_one, rows_two = _monitor_rows(one_dir), _monitor_rows(two_dir)
    assert [r["global_step"] for r in rows_one] == [r["global_step"] for r in rows_two] == [0, 2]
    queries = 450                                                                  # the digits test split
    for a, b in zip(rows_one, rows_two):
        # the same features up to float rounding of other batch shapes: at most a tie flips one query
        assert abs(a["knn_top1"] - b["knn_top1"]) <= 100 / queries + 1e-9, (a, b)
