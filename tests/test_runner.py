"""Runs as a user launches them: 2 processes train like 1, gradient accumulation equals the full batch, trackers
write their logs, the EMA is kept and evaluated, a later stage's frozen parts stay put."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pandas as pd
import torch

from sslbench.cli import main
from sslbench.training.resume import load_resume_state

from .conftest import dump_recipe, sslbench_cmd


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _backbone(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "backbone.pt", weights_only=False)


def _write(tmp_path, recipe: dict, name: str):
    recipe = copy.deepcopy(recipe)
    recipe["run"]["name"] = name
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_recipe(recipe))
    return path, tmp_path / "runs" / name


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, tiny_recipe):
    tiny_recipe["stages"][0].update(steps=4, batch_size=32)
    one, one_dir = _write(tmp_path, tiny_recipe, "one")
    two, two_dir = _write(tmp_path, tiny_recipe, "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSLBENCH_PROGRESS": "0"}
    done = subprocess.run(sslbench_cmd() + ["run", str(one)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sslbench",
           "run", str(two)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # Same keyed data order, augmentations and masks on each sample, gradients averaged over the global batch.
    losses_one = [r["loss"] for r in _log(one_dir)]
    losses_two = [r["loss"] for r in _log(two_dir)]
    assert len(losses_one) == len(losses_two) == 4
    torch.testing.assert_close(torch.tensor(losses_two), torch.tensor(losses_one), rtol=1e-5, atol=1e-5)
    a, b = _backbone(one_dir)["backbone"], _backbone(two_dir)["backbone"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    # Only the main process wrote results, and the k-NN of both runs agrees.
    rows_one, rows_two = pd.read_csv(one_dir / "metrics.csv"), pd.read_csv(two_dir / "metrics.csv")
    assert len(rows_one) == len(rows_two) > 0
    assert (rows_one["value"] - rows_two["value"]).abs().max() < 1.0  # percent; ties may flip one sample


def test_gradient_accumulation_equals_the_full_batch(tmp_path, tiny_recipe):
    tiny_recipe["stages"][0].update(steps=3, batch_size=32)
    full, full_dir = _write(tmp_path, tiny_recipe, "full")
    tiny_recipe["stages"][0]["grad_accum"] = 4
    accum, accum_dir = _write(tmp_path, tiny_recipe, "accum")
    assert main(["run", str(full), "--no-progress"]) == 0
    assert main(["run", str(accum), "--no-progress"]) == 0
    torch.testing.assert_close(torch.tensor([r["loss"] for r in _log(accum_dir)]),
                               torch.tensor([r["loss"] for r in _log(full_dir)]), rtol=1e-5, atol=1e-6)
    # Adam divides by sqrt(v): float-rounding differences of near-zero gradients grow, so weights are compared to
    # the size of the update (3 steps of lr 1e-3 move a weight by up to ~3e-3), not to machine precision.
    a, b = _backbone(full_dir)["backbone"], _backbone(accum_dir)["backbone"]
    assert max(float((b[n] - a[n]).abs().max()) for n in a) < 1e-4


def test_tensorboard_tracker_writes_event_files(tmp_path, tiny_recipe):
    tiny_recipe["run"]["trackers"] = ["tensorboard"]
    path, run_dir = _write(tmp_path, tiny_recipe, "tracked")
    assert main(["run", str(path), "--no-progress"]) == 0
    events = list((run_dir / "trackers").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_ema_is_kept_exported_and_evaluated_and_frozen_parts_stay(tmp_path, tiny_recipe):
    second = copy.deepcopy(tiny_recipe["stages"][0])
    second.update(name="decoder_only", steps=3, freeze=["backbone"], ema_momentum=0.5)
    tiny_recipe["stages"][0]["name"] = "mae"
    tiny_recipe["stages"].append(second)
    tiny_recipe["eval"] = [{"name": "knn", "k": [5]}, {"name": "knn", "k": [5], "use_ema": True}]
    path, run_dir = _write(tmp_path, tiny_recipe, "ema")
    assert main(["run", str(path), "--no-progress"]) == 0
    exported = _backbone(run_dir)
    # The backbone was frozen through the last stage, so its EMA (started from it) never moved either.
    for name, value in exported["backbone"].items():
        torch.testing.assert_close(exported["ema"][name], value, msg=name)
    state = load_resume_state(run_dir / "checkpoints" / "last.pt")
    assert state["meta"]["progress"]["finished"] and state["meta"]["progress"]["global_step"] == 7
    rows = pd.read_csv(run_dir / "metrics.csv")
    assert len(rows) == 4  # top1 and top5, for the backbone and for its EMA
    assert rows["value"].between(0, 100).all()
