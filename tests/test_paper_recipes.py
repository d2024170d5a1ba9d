"""Every shipped recipe validates; the paper-scale ImageNet recipes: `sslbench check` validates each (fast, meta device, no checkpoint or data
needed); they share one evaluation protocol; `sslbench run --dry-run` takes a real step of each (slow: minutes and
up to ~18 GB on a CPU; `python -m pytest -m slow tests/test_paper_recipes.py`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sslbench.cli import main
from sslbench.core.registry import get_registry
from sslbench.training.recipe import load_recipe, protocol_hash

from .conftest import sslbench_cmd

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PAPER_RECIPES = ["mimrefiner_vitl.toml", "mimrefiner_d2v2_vith14.toml", "maect_vitl.toml"]
PRETRAINING_RECIPES = ["conmim_vitl.toml", "micl_vitl.toml"]


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipe_checks(name, capsys):
    assert main(["check", str(RECIPES / name), "--allow-missing-files"]) == 0
    out = capsys.readouterr().out
    assert "is not on this machine" in out  # the official weights are not shipped
    assert out.count("Stage ") == 2 and "(carried over)" in out


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.toml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_checks(path, capsys):
    """Every recipe in recipes/ (paper-scale, Fashion-MNIST, quickstart) validates against the registered plugins."""
    assert main(["check", str(path), "--allow-missing-files"]) == 0, capsys.readouterr().out


def test_paper_recipes_share_data_and_protocol():
    registry = get_registry()
    recipes = {name: load_recipe(RECIPES / name, registry, check_files=False) for name in PAPER_RECIPES}
    assert len({protocol_hash(r) for r in recipes.values()}) == 1, "leaderboard rows would not be comparable"
    for recipe in recipes.values():
        assert dict(recipe.data.train) == {**recipe.data.train, "source": "hf", "path": "ILSVRC/imagenet-1k"}
        heads, tuning = recipe.stages
        assert heads.freeze == ("backbone",) and tuning.layer_decay == 0.65
    refiner_l, refiner_h = recipes["mimrefiner_vitl.toml"], recipes["mimrefiner_d2v2_vith14.toml"]
    assert refiner_h.backbone.checkpoint_trusted and not refiner_l.backbone.checkpoint_trusted
    assert [s.options["topk"] for s in refiner_l.stages] == [1, 20]
    assert refiner_l.stages[0].options["head_blocks"] == list(range(16, 23))
    assert refiner_h.stages[0].options["head_blocks"] == list(range(20, 31))
    assert all(e.use_ema for e in refiner_l.eval) and refiner_l.stages[1].ema_momentum == 0.9999


def test_pretraining_recipes_share_the_refinement_protocol():
    registry = get_registry()
    hashes = {protocol_hash(load_recipe(RECIPES / name, registry, check_files=False))
              for name in PAPER_RECIPES + PRETRAINING_RECIPES}
    assert len(hashes) == 1, "ConMIM / MiCL rows would not sit beside the refinements' on the leaderboard"


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_RECIPES + PRETRAINING_RECIPES)
def test_paper_recipe_dry_run(name, tmp_path):
    done = subprocess.run(sslbench_cmd() + ["run", str(RECIPES / name), "--dry-run"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Dry run passed" in done.stdout
    assert not any(tmp_path.iterdir())  # no results/, no run folder, nothing half-written
