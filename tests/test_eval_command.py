"""`sslbench eval`: an existing checkpoint scored with a recipe's [[eval]], rows in metrics.csv and the leaderboard."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from sslbench.cli import main
from sslbench.training.recipe import protocol_hash, resolve

EVALS = [{"name": "knn", "k": [5, 10]}, {"name": "per_block", "k": [5]}]


@pytest.fixture
def recipe(tiny_recipe, write_recipe):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["eval"] = EVALS
    return recipe, write_recipe(recipe)


def timm_checkpoint(path, seed: int, **overrides):
    """A timm-format state dict of the tiny recipe's architecture, randomly initialised with ``seed``."""
    from sslbench.core.backbone import build_backbone

    shape = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, pos_embed="sincos")
    torch.manual_seed(seed)
    torch.save(build_backbone("vit_tiny_patch16_224", **{**shape, **overrides}).vit.state_dict(), path)
    return path


def rows_of(run_dir):
    return pd.read_csv(run_dir / "metrics.csv", keep_default_na=False)


def values(frame):
    return {(e, m, v): x for e, m, v, x in zip(frame["evaluator"], frame["metric"], frame["variant"], frame["value"])}


def test_eval_of_a_timm_checkpoint(recipe, tmp_path, capsys):
    recipe, path = recipe
    weights = timm_checkpoint(tmp_path / "vit_tiny.pth", seed=1)
    assert main(["eval", str(path), "--checkpoint", str(weights), "--format", "timm", "--name", "ext",
                 "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "ext"
    frame = rows_of(run_dir)
    assert set(frame["stage"]) == {"eval"} and set(frame["checkpoint"]) == {str(weights)}
    assert set(frame["objective"]) == {"pretrained:timm"} and set(frame["evaluator"]) == {"knn", "per_block"}
    from sslbench.core.registry import get_registry

    assert set(frame["protocol_hash"]) == {protocol_hash(resolve(recipe, get_registry()))[:16]}
    assert (run_dir / "per_block.png").stat().st_size > 1000 and (run_dir / "per_block.csv").is_file()
    board = pd.read_csv(tmp_path / "runs" / "leaderboard_long.csv")         # the runs folder's own leaderboard
    assert set(board["checkpoint"]) == {str(weights)}
    assert "ext: " in capsys.readouterr().out

    # Other weights give other numbers (no stale cache); the same weights again give the same rows, replaced.
    other = timm_checkpoint(tmp_path / "other.pth", seed=2)
    assert main(["eval", str(path), "--checkpoint", str(other), "--name", "other", "--no-progress"]) == 0
    assert values(rows_of(tmp_path / "runs" / "other")) != values(frame)
    assert main(["eval", str(path), "--checkpoint", str(weights), "--name", "ext", "--no-progress"]) == 0
    assert values(rows_of(run_dir)) == values(frame) and len(rows_of(run_dir)) == len(frame)


def test_eval_of_a_backbone_pt_in_sslbench_format(recipe, tmp_path):
    """A run folder as ``sslbench run`` leaves it (recipe.json, checkpoints/backbone.pt), built without training."""
    import json

    recipe, path = recipe
    source = tmp_path / "runs" / "pretrained_run"
    (source / "checkpoints").mkdir(parents=True)
    state = torch.load(timm_checkpoint(tmp_path / "w.pth", seed=3), weights_only=True)
    torch.save({"format": "sslbench", "backbone": state, "ema": None, "recipe_hash": "x"},
               source / "checkpoints" / "backbone.pt")
    stages = [{"objective": "mae"}, {"objective": "mae"}, {"objective": "mim_refiner"}]
    (source / "recipe.json").write_text(json.dumps({"recipe_hash": "x", "recipe": {"stages": stages}}))
    assert main(["eval", str(path), "--checkpoint", str(source / "checkpoints" / "backbone.pt"),
                 "--no-progress"]) == 0
    evaluated = rows_of(tmp_path / "runs" / "eval-pretrained_run")
    assert set(evaluated["objective"]) == {"mae+mim_refiner"}           # the source run's objective chain
    assert main(["eval", str(path), "--checkpoint", str(tmp_path / "w.pth"), "--name", "same", "--no-progress"]) == 0
    assert values(rows_of(tmp_path / "runs" / "same")) == values(evaluated)      # same weights, same numbers
    assert main(["eval", str(path), "--checkpoint", str(source / "checkpoints" / "backbone.pt"),
                 "--format", "sslbench_ema"]) == 2                               # this run kept no EMA


@pytest.mark.slow
def test_eval_of_a_runs_backbone_reproduces_its_rows(recipe, tmp_path):
    recipe, path = recipe
    assert main(["run", str(path), "--no-progress"]) == 0
    trained = tmp_path / "runs" / "tiny"
    # No --format: a run's backbone.pt says it is sslbench's; the default name and objective come from the run.
    assert main(["eval", str(path), "--checkpoint", str(trained / "checkpoints" / "backbone.pt"),
                 "--no-progress"]) == 0
    evaluated = rows_of(tmp_path / "runs" / "eval-tiny")
    assert set(evaluated["objective"]) == {"mae"}
    assert values(evaluated) == values(rows_of(trained))
    board = pd.read_csv(tmp_path / "runs" / "leaderboard.csv")
    assert len(board) == 2 and board["protocol_hash"].nunique() == 1


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_is_one_line_and_exit_2(recipe, tmp_path, write_recipe, capsys):
    recipe, path = recipe
    weights = timm_checkpoint(tmp_path / "w.pth", seed=0)
    assert main(["eval", str(path), "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "file not found" in _error(capsys)
    assert main(["eval", str(path), "--checkpoint", str(weights), "--format", "nope"]) == 2
    assert "unknown checkpoint_format 'nope'" in _error(capsys)
    assert main(["eval", str(path), "--checkpoint", str(weights), "--name", "../up"]) == 2
    assert "--name" in _error(capsys)
    no_eval = write_recipe({k: v for k, v in recipe.items() if k != "eval"}, "no_eval.toml")
    assert main(["eval", str(no_eval), "--checkpoint", str(weights)]) == 2
    assert "no [[eval]]" in _error(capsys)
    deeper = timm_checkpoint(tmp_path / "deeper.pth", seed=0, embed_dim=48, num_heads=3)
    assert main(["eval", str(path), "--checkpoint", str(deeper)]) == 2
    assert "shapes differ" in _error(capsys)
    training_run = tmp_path / "runs" / "trained"
    training_run.mkdir(parents=True)
    (training_run / "recipe.json").write_text('{"recipe_hash": "x", "recipe": {}}')
    assert main(["eval", str(path), "--checkpoint", str(weights), "--name", "trained"]) == 2
    assert "holds a training run" in _error(capsys)
    assert not (tmp_path / "runs" / "eval-deeper").exists()          # a failed load leaves no folder behind
