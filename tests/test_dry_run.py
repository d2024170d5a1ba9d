"""`sslbench run --dry-run` builds everything and takes one step per stage without writing anything; pickled
(fairseq) checkpoints load only with `backbone.checkpoint_trusted = true`."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

from sslbench.core.backbone import build_backbone
from sslbench.core.checkpoints import BUILTIN_FORMATS
from sslbench.core.data2vec2 import RENAMES as _D2V_RENAMES
from sslbench.cli import main
from sslbench.core.errors import RecipeError
from sslbench.core.registry import get_registry
from sslbench.training.recipe import load_recipe, recipe_hash
from sslbench.training.assembly import build_model

TINY_D2V = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)


def _nothing_written(tmp_path):
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.*"))


def test_dry_run_of_the_tiny_recipe_writes_nothing(tiny_recipe, write_recipe, tmp_path, capsys):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["stages"].append({"objective": "mae", "steps": 3, "freeze": ["blocks[:1]"], "layer_decay": 0.65,
                             "ema_momentum": 0.99})
    recipe["eval"][0]["use_ema"] = True
    path = write_recipe(recipe)
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 synthetic 1x16x16 images" in out and "no checkpoint" in out
    assert "Stage 0 'stage0': mae, 1 view(s) 1x1x16x16" in out
    assert "Stage 1 'stage1': mae (carried over)" in out and "EMA 0.99" in out
    assert "Evaluate knn (EMA): built" in out
    assert "Dry run passed: wall time" in out and "peak memory (max RSS)" in out
    _nothing_written(tmp_path)


def test_dry_run_of_a_bad_recipe_exits_2(tiny_recipe, write_recipe, tmp_path, capsys):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["stages"][0]["optimizer"]["lr"] = "fast"
    path = write_recipe(recipe)
    assert main(["run", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: stages[0].optimizer.lr:")
    recipe = copy.deepcopy(tiny_recipe)
    recipe["stages"][0]["freeze"] = ["nothing.like.this"]  # caught only when the objective is built
    assert main(["run", str(write_recipe(recipe)), "--dry-run"]) == 2
    assert "stages[0].freeze[0]" in capsys.readouterr().err
    _nothing_written(tmp_path)


@pytest.fixture
def fairseq_file(tmp_path):
    """A tiny data2vec 2.0 checkpoint as fairseq writes it: fairseq names under `model`, config pickled."""
    torch.manual_seed(7)
    backbone = build_backbone("vit_tiny_patch16_224", **TINY_D2V, **BUILTIN_FORMATS["data2vec2"].architecture)
    to_fairseq = {timm_name: name for name, timm_name in _D2V_RENAMES.items()}
    state = {to_fairseq.get(k, k): v for k, v in backbone.vit.state_dict().items()}
    path = tmp_path / "d2v2.pt"
    torch.save({"model": state, "cfg": argparse.Namespace(depth=2)}, path)
    return path, backbone


def _d2v_recipe(tiny_recipe, path, trusted: bool | None) -> dict:
    recipe = copy.deepcopy(tiny_recipe)
    recipe["backbone"].update(checkpoint=str(path), checkpoint_format="data2vec2")
    if trusted is not None:
        recipe["backbone"]["checkpoint_trusted"] = trusted
    return recipe


def test_pickled_checkpoint_needs_checkpoint_trusted(tiny_recipe, write_recipe, fairseq_file, capsys):
    path, reference = fairseq_file
    registry = get_registry()
    untrusted = write_recipe(_d2v_recipe(tiny_recipe, path, None), "untrusted.toml")
    with pytest.raises(RecipeError, match=r"backbone.checkpoint_trusted: .*d2v2.pt pickles .*argparse.Namespace.*"
                                          r"set backbone.checkpoint_trusted = true"):
        build_model(load_recipe(untrusted, registry), registry)
    for command in (["run", str(untrusted)], ["run", str(untrusted), "--dry-run"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {untrusted}: backbone.checkpoint_trusted:") and len(err.splitlines()) == 1

    trusted = load_recipe(write_recipe(_d2v_recipe(tiny_recipe, path, True), "trusted.toml"), registry)
    backbone, report = build_model(trusted, registry)
    assert not report.unexpected
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(backbone(images).tokens, reference(images).tokens, atol=1e-5)
    # trusting a file changes nothing that is computed: the run keeps its hash
    assert recipe_hash(trusted) == recipe_hash(load_recipe(write_recipe(_d2v_recipe(tiny_recipe, path, False),
                                                                        "false.toml"), registry))


def test_dry_run_loads_a_present_checkpoint_and_checks_an_absent_one(tiny_recipe, write_recipe, fairseq_file,
                                                                     tmp_path, capsys):
    path, _ = fairseq_file
    assert main(["run", str(write_recipe(_d2v_recipe(tiny_recipe, path, True))), "--dry-run"]) == 0
    assert f"checkpoint {path} (format data2vec2): loaded" in capsys.readouterr().out
    absent = _d2v_recipe(tiny_recipe, tmp_path / "elsewhere.pt", None)
    assert main(["run", str(write_recipe(absent)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "not on this machine — format and implied architecture checked" in out
    assert "unless backbone.checkpoint_trusted = true" in out
    _nothing_written(tmp_path)
