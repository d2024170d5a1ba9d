"""``run.name`` is one safe folder name, and ``--force`` removes only an sslbench run folder inside
``run.output_dir`` — never the results folder, the checkout or a folder of someone else's files."""

from __future__ import annotations

import copy
import json

import pytest

from sslbench.cli import main

BAD_NAMES = ["", ".", "..", "../..", "../../escaped", "/tmp/absolute", "a/b", ".hidden", "-flag", "x" * 200,
             "tab\tname", "star*", "spaces here"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("command", ["check", "run"])
def test_unsafe_run_names_are_refused(name, command, tiny_recipe, tmp_path, write_recipe, refused):
    results = tmp_path / "results"
    other = results / "runs" / "someone_elses_run"
    other.mkdir(parents=True)
    (other / "recipe.json").write_text(json.dumps({"recipe_hash": "x"}))
    recipe = copy.deepcopy(tiny_recipe)
    recipe["run"].update(name=name, output_dir=str(results / "runs"))
    argv = [command, write_recipe(recipe)] + (["--force", "--no-progress"] if command == "run" else [])
    before = sorted(p for p in tmp_path.rglob("*"))
    refused(argv, "run.name")
    assert sorted(p for p in tmp_path.rglob("*")) == before        # nothing created, nothing deleted
    assert not (tmp_path.parent / "escaped").exists()


def test_force_refuses_a_folder_that_is_not_a_run(tiny_recipe, tmp_path, write_recipe, refused):
    precious = tmp_path / "runs" / "tiny" / "thesis.tex"
    precious.parent.mkdir(parents=True)
    precious.write_text("years of work")
    refused(["run", write_recipe(tiny_recipe), "--force", "--no-progress"], "not an sslbench run folder")
    assert precious.read_text() == "years of work"
    # and without --force the same folder is not written into either
    refused(["run", write_recipe(tiny_recipe), "--no-progress"], "not an sslbench run folder")
    assert sorted(p.name for p in precious.parent.iterdir()) == ["thesis.tex"]


def test_force_refuses_a_symlink_to_elsewhere(tiny_recipe, tmp_path, write_recipe, refused):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "recipe.json").write_text(json.dumps({"recipe_hash": "x"}))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(elsewhere)
    refused(["run", write_recipe(tiny_recipe), "--force", "--no-progress"], "not one")
    assert (elsewhere / "recipe.json").exists()


def test_force_replaces_a_real_run_and_keeps_its_neighbours(tiny_recipe, tmp_path, write_recipe):
    path = write_recipe(tiny_recipe)
    assert main(["run", str(path), "--no-progress"]) == 0
    neighbour = tmp_path / "runs" / "neighbour"
    neighbour.mkdir()
    (neighbour / "keep.txt").write_text("keep")
    (tmp_path / "runs" / "tiny" / "old.txt").write_text("from the first run")
    assert main(["run", str(path), "--force", "--no-progress"]) == 0
    assert not (tmp_path / "runs" / "tiny" / "old.txt").exists()
    assert (tmp_path / "runs" / "tiny" / "metrics.csv").exists()
    assert (neighbour / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ""])
def test_eval_name_is_checked_the_same_way(name, tiny_recipe, tmp_path, write_recipe, refused):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"")
    refused(["eval", write_recipe(tiny_recipe), "--checkpoint", weights, "--name", name], "--name")
