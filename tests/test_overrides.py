"""Command-line overrides (`sslbench run|check|eval RECIPE KEY=VALUE ...`): parsing, application to the file's
contents, validation exactly like the file, and their record in the run."""

from __future__ import annotations

import copy
import json

import pytest

from sslbench.cli import main
from sslbench.core.errors import RecipeError, UserError
from sslbench.training.overrides import apply_overrides, parse_override, parse_value
from sslbench.training.recipe import load_recipe


@pytest.mark.parametrize("text,value", [
    ("5", 5), ("0.6", 0.6), ("1e-3", 1e-3), ("true", True), ("[10, 20]", [10, 20]), ('"text"', "text"),
    ("{ kind = \"linear\" }", {"kind": "linear"}), ("my_run", "my_run"), ("ILSVRC/imagenet-1k", "ILSVRC/imagenet-1k"),
    ("", ""),
])
def test_values_are_toml_literals_or_else_strings(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_paths_with_indices_are_parsed():
    override = parse_override("stages[1].options.mask_ratio=0.6")
    assert override.path == ["stages", 1, "options", "mask_ratio"] and override.value == 0.6
    assert override.key == "stages[1].options.mask_ratio"
    assert parse_override("stages[-1].epochs = 5").path == ["stages", -1, "epochs"]
    for bad in ("run.seed", "=1", "run..seed=1", "stages[x].epochs=1", "run.se ed=1"):
        with pytest.raises(UserError, match="override"):
            parse_override(bad)


def test_apply_sets_creates_tables_and_leaves_the_input_alone():
    raw = {"run": {"name": "a"}, "stages": [{"epochs": 1}, {"epochs": 2, "options": {"x": 1}}]}
    before = copy.deepcopy(raw)
    out = apply_overrides(raw, ["run.seed=3", "stages[1].options.x=2", "stages[-1].epochs=7",
                                "stages[0].schedule.kind=linear", "run.seed=4"])
    assert raw == before
    assert out["run"] == {"name": "a", "seed": 4}                            # a later override wins
    assert out["stages"][1] == {"epochs": 7, "options": {"x": 2}}
    assert out["stages"][0] == {"epochs": 1, "schedule": {"kind": "linear"}}


@pytest.mark.parametrize("override,key,text", [
    ("stages[2].epochs=1", "stages[2]", "stages has 2 entries (stages[0] to stages[1]"),
    ("stages[-3].epochs=1", "stages[-3]", "index out of range"),
    ("eval[0].k=5", "eval[0]", "no eval"),
    ("run.name.x=1", "run.name", "not a table"),
    ("run[0]=1", "run", "not an array"),
])
def test_impossible_paths_name_the_key(override, key, text):
    raw = {"run": {"name": "a"}, "stages": [{"epochs": 1}, {"epochs": 2}]}
    with pytest.raises(RecipeError) as info:
        apply_overrides(raw, [override])
    assert info.value.key == key and text in str(info.value)


def test_overrides_change_the_recipe_and_its_hash_and_later_stages_inherit(tiny_recipe, write_recipe):
    two = copy.deepcopy(tiny_recipe)
    two["stages"].append({"objective": "mae", "steps": 2})                   # inherits stage 0's options
    path = write_recipe(two)
    plain = load_recipe(path)
    changed = load_recipe(path, overrides=["stages[0].options.mask_ratio=0.6", "run.seed=3",
                                           "stages[0].optimizer.lr=3e-4"])
    assert plain.stages[0].options["mask_ratio"] == 0.75 and plain.overrides == ()
    assert changed.stages[0].options["mask_ratio"] == 0.6
    assert changed.stages[1].options["mask_ratio"] == 0.6                    # inherited, as from the file
    assert changed.stages[0].optimizer.lr == 3e-4 and changed.run.seed == 3
    assert changed.recipe_hash != plain.recipe_hash
    assert changed.overrides == ("stages[0].options.mask_ratio=0.6", "run.seed=3", "stages[0].optimizer.lr=3e-4")
    # the same values written into the file give the same recipe: an override is exactly an edit of the file
    edited = copy.deepcopy(two)
    edited["stages"][0]["options"]["mask_ratio"] = 0.6
    edited["stages"][0]["optimizer"]["lr"] = 3e-4
    edited["run"]["seed"] = 3
    assert load_recipe(write_recipe(edited, "edited.toml")).recipe_hash == changed.recipe_hash
    # cosmetic keys change nothing that is computed
    assert load_recipe(path, overrides=["run.log_every=7"]).recipe_hash == plain.recipe_hash


BAD_OVERRIDES = [
    ("run.sed=1", ["with run.sed=1: run.sed: unknown key", "allowed keys"]),
    ("stages[0].optimizer.lr=fast", ["with stages[0].optimizer.lr=fast: stages[0].optimizer.lr: got 'fast'",
                                     "expected a number > 0"]),
    ("stages[0].batch_size=0.5", ["stages[0].batch_size"]),
    ("stages[1].epochs=5", ["with stages[1].epochs=5: stages[1]: index out of range", "stages has 1 entry"]),
    ("eval[0].k=[5, 100000]", ["eval[0]", "100000"]),
    ("run.name=../elsewhere", ["run.name", "one folder name"]),
    ("run.seed", ["override 'run.seed': expected KEY=VALUE"]),
]
# `check` loads no data, so k against the training-set size is a `run` error only
CASES = [("run", *case) for case in BAD_OVERRIDES] + [("check", *case) for case in BAD_OVERRIDES
                                                       if not case[0].startswith("eval[0].k")]


@pytest.mark.parametrize("command,override,expected", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_overrides_are_one_line_errors_and_create_nothing(command, override, expected, tiny_recipe, tmp_path,
                                                             write_recipe, refused):
    path = write_recipe(tiny_recipe)
    line = refused([command, path, override, "--no-progress"] if command == "run" else
                       [command, path, override])
    assert str(path) in line
    for text in expected:
        assert text in line, (text, line)
    assert not (tmp_path / "runs").exists()


def test_a_run_records_its_overrides_and_a_resume_must_repeat_them(tiny_recipe, tmp_path, write_recipe, refused):
    path = write_recipe(tiny_recipe)
    # overrides may come before or after the options
    assert main(["run", str(path), "run.name=short", "--no-progress", "stages[0].steps=2",
                 "run.checkpoint_every=1"]) == 0
    run_dir = tmp_path / "runs" / "short"
    meta = json.loads((run_dir / "recipe.json").read_text())
    assert meta["overrides"] == ["run.name=short", "stages[0].steps=2", "run.checkpoint_every=1"]
    assert meta["recipe"]["stages"][0]["steps"] == 2 and meta["recipe"]["run"]["name"] == "short"
    toml = (run_dir / "recipe.toml").read_text()
    assert "command-line overrides:\n#   run.name=short stages[0].steps=2 run.checkpoint_every=1" in toml
    assert [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()] == [1, 2]
    # the resolved recipe.toml runs as it is (the comment is TOML) and is the same recipe
    assert load_recipe(run_dir / "recipe.toml").recipe_hash == meta["recipe_hash"]
    line = refused(["run", path, "run.name=short", "--resume", "--no-progress"])
    assert "holds a run of a different recipe" in line and "stages[0].steps 2 → 4" in line
    assert "it was run with the command-line overrides run.name=short stages[0].steps=2" in line


def test_eval_takes_overrides(tiny_recipe, tmp_path, write_recipe):
    path = write_recipe(tiny_recipe)
    assert main(["run", str(path), "--no-progress"]) == 0
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "backbone.pt"
    assert main(["eval", str(path), "--checkpoint", str(checkpoint), "--name", "k3", "eval[0].k=[3]",
                 "--no-progress"]) == 0
    meta = json.loads((tmp_path / "runs" / "k3" / "recipe.json").read_text())
    assert meta["recipe"]["eval"][0]["k"] == [3] and meta["overrides"] == ["eval[0].k=[3]"]
    metrics = (tmp_path / "runs" / "k3" / "metrics.csv").read_text()
    assert "k=3" in metrics and "k=5" not in metrics
