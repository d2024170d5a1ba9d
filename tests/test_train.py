"""The trainer: resume after SIGKILL reproduces the uninterrupted run; a NaN loss stops with the step named."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import types

import torch

import sslbench
import sslbench.core.registry
from sslbench.cli import main
from sslbench.core.registry import build_registry
from sslbench.training.resume import load_resume_state

from .conftest import dump_recipe, kill_after_log_lines, sslbench_cmd


def _knn_values(run_dir):
    import pandas as pd

    df = pd.read_csv(run_dir / "metrics.csv")
    return sorted(zip(df["metric"], df["variant"], df["value"]))


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_recipe):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["run"].update(name="resume", checkpoint_every=3)
    recipe["stages"][0].update(steps=24, batch_size=32)
    path = tmp_path / "resume.toml"
    path.write_text(dump_recipe(recipe))
    env = {**os.environ, "TQDM_DISABLE": "1"}

    # The reference: uninterrupted, in another output folder.
    reference = copy.deepcopy(recipe)
    reference["run"]["output_dir"] = str(tmp_path / "reference")
    ref_path = tmp_path / "reference.toml"
    ref_path.write_text(dump_recipe(reference))
    done = subprocess.run(sslbench_cmd() + ["run", str(ref_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "runs" / "resume"
    kill_after_log_lines(["run", str(path)], run_dir / "log.jsonl", 8, env)    # between the 2nd and 3rd checkpoint
    step = load_resume_state(run_dir / "checkpoints" / "last.pt")["meta"]["progress"]["global_step"]
    assert 3 <= step < 24 and step % 3 == 0
    assert not (run_dir / "metrics.csv").exists()

    refused = subprocess.run(sslbench_cmd() + ["run", str(path)], capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run(sslbench_cmd() + ["run", str(path), "--resume"], capture_output=True, text=True,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref_log = [json.loads(x) for x in (tmp_path / "reference" / "resume" / "log.jsonl").read_text().splitlines()]
    new_log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in new_log] == list(range(1, 25))
    assert new_log[-1]["loss"] == ref_log[-1]["loss"]
    assert [r["loss"] for r in new_log] == [r["loss"] for r in ref_log]
    assert _knn_values(run_dir) == _knn_values(tmp_path / "reference" / "resume")


class NaNAtStep3(sslbench.Objective):
    """Wraps MAE and poisons the loss at the third step."""

    name = "nan_at_3"

    def __init__(self, backbone, opts, context):
        super().__init__(backbone, opts, context)
        from sslbench_plugins.mae import MAE

        self.mae = MAE(backbone, {**{k: o.default for k, o in MAE.options.items()}, "decoder_dim": 32,
                                  "decoder_depth": 1, "decoder_heads": 2}, context)
        self.calls = 0

    def views(self, data):
        return self.mae.views(data)

    def forward(self, views, batch):
        self.calls += 1
        out = self.mae(views, batch)
        if self.calls == 3:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_recipe, write_recipe,
                                                                           monkeypatch, capsys):
    plugin = types.SimpleNamespace()

    @sslbench.hookimpl
    def register_objectives(register):
        register("nan_at_3", NaNAtStep3)

    plugin.register_objectives = register_objectives
    monkeypatch.setattr(sslbench.core.registry, "_REGISTRY", build_registry(extra_modules={"nan_plugin": plugin}))
    recipe = copy.deepcopy(tiny_recipe)
    recipe["run"].update(name="nan", checkpoint_every=2)
    recipe["stages"] = [{"objective": "nan_at_3", "steps": 6, "batch_size": 32, "optimizer": {"lr": 1e-3}}]
    assert main(["run", str(write_recipe(recipe)), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the loss became non-finite at stage 'stage0' step 3" in err
    assert "checkpoints/last.pt (global step 2)" in err and "--allow-optimizer-change" in err
    state = load_resume_state(tmp_path / "runs" / "nan" / "checkpoints" / "last.pt")
    assert state["meta"]["progress"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["backbone"].values())


def test_labels_reach_the_objective_for_its_logged_signals_only_when_the_data_has_them(tmp_path, tiny_recipe,
                                                                                       write_recipe):
    """A MAE-CT run on the labelled digits logs the neighbours' label agreement and the collapse measures with every
    loss line — but at step 1, whose empty queue leaves the agreement unmeasured (NaN), the line leaves it out and
    stays valid JSON. Data with a label of -1 counts as unlabelled (the trainer then passes no labels)."""
    from sslbench.data.dataset import ImageDataset
    from sslbench.training.trainer import is_labelled

    recipe = copy.deepcopy(tiny_recipe)
    recipe["run"].update(name="signals")
    recipe["stages"] = [{"objective": "mae_ct", "steps": 4, "batch_size": 64, "optimizer": {"lr": 1e-3},
                         "options": {"proj_hidden": 32, "proj_out": 8, "pred_hidden": 16, "queue_size": 128}}]
    recipe["eval"] = []
    assert main(["run", str(write_recipe(recipe)), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "signals"
    text = (run_dir / "log.jsonl").read_text()
    assert "NaN" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    train = [r for r in lines if r.get("kind", "train") == "train" and "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert "nn_acc" not in train[0] and train[0]["std_projected"] > 0
    assert all(0.0 <= r["nn_acc"] <= 1.0 and r["std_projected"] > 0 and r["std_features"] > 0 for r in train[1:])
    assert (run_dir / "training.png").stat().st_size > 5000
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    assert is_labelled(ImageDataset(images, torch.tensor([0, 1, 2]), ["a", "b", "c"], "labelled", "f"))
    assert not is_labelled(ImageDataset(images, torch.full((3,), -1), [], "unlabelled", "f"))
    assert not is_labelled(ImageDataset(images, torch.tensor([0, -1, 2]), ["a", "b", "c"], "partly", "f"))
