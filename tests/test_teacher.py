"""Frozen teachers (``[stages.teacher]``): the recipe schema and hash, check / dry-run with and without the file,
a run that never trains, saves or unfreezes the teacher, a resume that reloads it from its file and equals the
uninterrupted run, and two processes that train like one (the MimCo objective, the one that declares a teacher)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslbench.cli import main
from sslbench.core import registry as registry_module
from sslbench.core.backbone import build_backbone
from sslbench.core.errors import RecipeError
from sslbench.training.recipe import TEACHER, resolve
from sslbench.training.resume import load_resume_state
from sslbench.training.spec import TeacherSpec
from sslbench.training.teacher import file_sha256

from .conftest import dump_recipe

TEACHER_ARCH = {"model": "vit_tiny_patch16_224", "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 2,
                "pos_embed": "sincos"}
REGISTRY = registry_module.get_registry()


@pytest.fixture(autouse=True)
def _registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", REGISTRY)


def save_teacher(path: Path, seed: int = 1) -> Path:
    """A tiny teacher in sslbench's backbone.pt format (as an earlier run exports it)."""
    torch.manual_seed(seed)
    net = build_backbone(**{**TEACHER_ARCH, "img_size": 16, "in_chans": 1})
    torch.save({"format": "sslbench", "backbone": net.vit.state_dict(), "ema": None}, path)
    return path


def mimco_recipe(tiny_recipe: dict, teacher: Path, **stage) -> dict:
    recipe = copy.deepcopy(tiny_recipe)
    recipe["stages"] = [{"objective": "mimco", "steps": 4, "batch_size": 32,
                         "optimizer": {"lr": 1e-3, "betas": [0.9, 0.95]}, "schedule": {"warmup_epochs": 0.0},
                         "options": {"mask_unit_px": 4},
                         "teacher": {**TEACHER_ARCH, "checkpoint": str(teacher), "checkpoint_format": "sslbench"},
                         **stage}]
    return recipe


# --------------------------------------------------------------------------------------------- recipe and hash


def test_teacher_spec_mirrors_its_schema():
    assert [f.name for f in dataclasses.fields(TeacherSpec)] == list(TEACHER)


def test_recipe_hash_covers_the_teacher_file_content_not_its_cosmetic_keys(tmp_path, tiny_recipe):
    path = save_teacher(tmp_path / "teacher.pt")
    recipe = resolve(mimco_recipe(tiny_recipe, path), REGISTRY)
    teacher = recipe.stages[0].teacher
    assert teacher.checkpoint_sha256 == file_sha256(path) and teacher.img_size is None
    cosmetic = mimco_recipe(tiny_recipe, path)
    cosmetic["stages"][0]["teacher"].update(checkpoint_trusted=True, checkpoint_url="https://example.org/t.pt")
    assert resolve(cosmetic, REGISTRY).recipe_hash == recipe.recipe_hash
    save_teacher(path, seed=2)                                   # same path, other weights
    changed = resolve(mimco_recipe(tiny_recipe, path), REGISTRY)
    assert changed.recipe_hash != recipe.recipe_hash
    assert resolve(changed.as_dict(), REGISTRY) == changed       # the canonical form resolves to itself
    # a recipe without a teacher has no teacher key: its form and hash are those from before teachers existed
    plain = resolve(copy.deepcopy(tiny_recipe), REGISTRY)
    assert all("teacher" not in stage for stage in plain.as_dict()["stages"])


def test_a_missing_or_changed_teacher_file_is_named(tmp_path, tiny_recipe):
    missing = mimco_recipe(tiny_recipe, tmp_path / "absent.pt")
    with pytest.raises(RecipeError, match=r"stages\[0\]\.teacher\.checkpoint: file not found: .*absent\.pt.*"
                                          r"--allow-missing-files"):
        resolve(copy.deepcopy(missing), REGISTRY)
    assert resolve(missing, REGISTRY, check_files=False).stages[0].teacher.checkpoint_sha256 is None
    pinned = mimco_recipe(tiny_recipe, save_teacher(tmp_path / "t.pt"))
    pinned["stages"][0]["teacher"]["checkpoint_sha256"] = "0" * 64
    with pytest.raises(RecipeError, match=r"stages\[0\]\.teacher\.checkpoint_sha256: .*the teacher file changed"):
        resolve(pinned, REGISTRY)


def test_only_objectives_that_declare_a_teacher_take_one(tmp_path, tiny_recipe):
    path = save_teacher(tmp_path / "t.pt")
    without = mimco_recipe(tiny_recipe, path)
    del without["stages"][0]["teacher"]
    with pytest.raises(RecipeError, match=r"stages\[0\]\.teacher: objective 'mimco' learns from a frozen teacher"):
        resolve(without, REGISTRY)
    mae = copy.deepcopy(tiny_recipe)
    mae["stages"][0]["teacher"] = {**TEACHER_ARCH, "checkpoint": str(path), "checkpoint_format": "sslbench"}
    with pytest.raises(RecipeError, match=r"stages\[0\]\.teacher: objective 'mae' takes no teacher"):
        resolve(mae, REGISTRY)
    bad = mimco_recipe(tiny_recipe, path)
    bad["stages"][0]["teacher"]["checkpoint_format"] = "nope"
    with pytest.raises(RecipeError, match=r"stages\[0\]\.teacher\.checkpoint_format: unknown checkpoint format"):
        resolve(bad, REGISTRY)


def test_a_carried_over_objective_keeps_its_teacher(tmp_path, tiny_recipe):
    recipe = mimco_recipe(tiny_recipe, save_teacher(tmp_path / "t.pt"))
    recipe["stages"].append({"steps": 2})
    resolved = resolve(copy.deepcopy(recipe), REGISTRY)
    assert resolved.stages[1].teacher == resolved.stages[0].teacher
    recipe["stages"][1]["teacher"] = {**TEACHER_ARCH, "checkpoint": str(save_teacher(tmp_path / "u.pt", 3)),
                                      "checkpoint_format": "sslbench"}
    with pytest.raises(RecipeError, match=r"stages\[1\]\.teacher: cannot change while the 'mimco' objective"):
        resolve(recipe, REGISTRY)


# -------------------------------------------------------------------------------------------- check, dry run


def test_check_and_dry_run_with_and_without_the_teacher_file(tmp_path, tiny_recipe, write_recipe, refused, capsys):
    path = write_recipe(mimco_recipe(tiny_recipe, tmp_path / "later.pt"))
    refused(["check", path], "stages[0].teacher.checkpoint", "--allow-missing-files")
    assert main(["check", str(path), "--allow-missing-files"]) == 0
    out = capsys.readouterr().out
    assert "warning: stages[0].teacher.checkpoint" in out and "teacher vit_tiny_patch16_224" in out
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "not on this machine, weights random" in capsys.readouterr().out
    save_teacher(tmp_path / "later.pt")
    assert main(["run", str(path), "--dry-run"]) == 0
    assert ".pt (format sslbench): loaded" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------ runs


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()
            if json.loads(line).get("kind") != "monitor"]


def test_the_teacher_is_never_trained_nor_saved(tmp_path, tiny_recipe):
    from sslbench.training.run import Run

    path = save_teacher(tmp_path / "t.pt")
    recipe = resolve(mimco_recipe(tiny_recipe, path), REGISTRY)
    run = Run(recipe, REGISTRY)
    objective = run.first_trainer.objective
    network = objective.teacher.network
    in_optimizer = {id(p) for group in run.first_trainer.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in network.parameters()}
    run.train()
    assert not network.training and all(not p.requires_grad and p.grad is None for p in network.parameters())
    saved = torch.load(path, weights_only=True)["backbone"]
    assert all(torch.equal(saved[k], v) for k, v in network.vit.state_dict().items())
    state = load_resume_state(run.ckpt_dir / "last.pt")
    assert state["objective"] and not any(k.startswith("teacher") for k in state["objective"])
    run.finish()


def test_resume_reloads_the_teacher_and_equals_the_uninterrupted_run(tmp_path, tiny_recipe, monkeypatch):
    import sslbench_plugins.mimco as mimco

    teacher = save_teacher(tmp_path / "t.pt")
    recipe = mimco_recipe(tiny_recipe, teacher, steps=6)
    recipe["run"].update(checkpoint_every=2)
    reference = copy.deepcopy(recipe)
    reference["run"].update(name="reference")
    (tmp_path / "reference.toml").write_text(dump_recipe(reference))
    (tmp_path / "resumed.toml").write_text(dump_recipe({**recipe, "run": {**recipe["run"], "name": "resumed"}}))
    assert main(["run", str(tmp_path / "reference.toml"), "--no-progress"]) == 0

    def interrupt(self, step):
        if step == 3:                                  # after the checkpoint of global step 2, before that of 4
            raise KeyboardInterrupt                    # as Ctrl-C: the CLI says to --resume
    monkeypatch.setattr(mimco.MimCo, "after_step", interrupt)
    assert main(["run", str(tmp_path / "resumed.toml"), "--no-progress"]) != 0
    monkeypatch.undo()
    monkeypatch.setattr(registry_module, "_REGISTRY", REGISTRY)
    run_dir = tmp_path / "runs" / "resumed"
    assert load_resume_state(run_dir / "checkpoints" / "last.pt")["meta"]["progress"]["global_step"] == 2
    assert main(["run", str(tmp_path / "resumed.toml"), "--resume", "--no-progress"]) == 0
    ref_log, new_log = _log(tmp_path / "runs" / "reference"), _log(run_dir)
    assert [r["global_step"] for r in new_log] == list(range(1, 7))
    assert [r["loss"] for r in new_log] == [r["loss"] for r in ref_log]
    a = torch.load(tmp_path / "runs" / "reference" / "checkpoints" / "backbone.pt", weights_only=True)["backbone"]
    b = torch.load(run_dir / "checkpoints" / "backbone.pt", weights_only=True)["backbone"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_teacher_file_is_refused(tmp_path, tiny_recipe, write_recipe, refused):
    teacher = save_teacher(tmp_path / "t.pt")
    recipe = mimco_recipe(tiny_recipe, teacher, steps=2)
    path = write_recipe(recipe)
    assert main(["run", str(path), "--no-progress"]) == 0
    save_teacher(teacher, seed=5)
    refused(["run", path, "--resume"], "checkpoint_sha256")


@pytest.mark.parametrize("masks", [{"mask_mode": "random_units", "mask_unit_px": 4},
                                   {"mask_mode": "block", "mask_min_block": 2}], ids=["random_units", "block"])
def test_two_processes_take_the_mimco_step_of_one(tmp_path, tiny_recipe, masks):
    """One MimCo step on 2 gloo CPU processes (half the batch each, teacher keys gathered) equals one process;
    block masks may stop short, so the processes then gather different numbers of keys."""
    teacher = save_teacher(tmp_path / "t.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSLBENCH_PROGRESS": "0"}
    dirs = []
    for name in ("one", "two"):
        recipe = mimco_recipe(tiny_recipe, teacher, steps=1)
        recipe["stages"][0]["options"] = masks
        recipe["run"]["name"] = name
        recipe["eval"] = []
        path = tmp_path / f"{name}.toml"
        path.write_text(dump_recipe(recipe))
        prefix = ([sys.executable] if name == "one" else
                  [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
        done = subprocess.run(prefix + ["-m", "sslbench", "run", str(path)], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        dirs.append(tmp_path / "runs" / name)
    one, two = (_log(d) for d in dirs)
    assert len(one) == len(two) == 1
    for key in ("loss", "patch_loss", "image_loss"):
        assert abs(one[0][key] - two[0][key]) < 1e-5, key
    a, b = (torch.load(d / "checkpoints" / "backbone.pt", weights_only=True)["backbone"] for d in dirs)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
