"""Recipe validation: every bad-recipe case gives a one-line error naming the key, exit code 2, no traceback."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest

from sslbench.cli import main
from sslbench.core.errors import RecipeError
from sslbench.core.registry import get_registry
from sslbench.training.recipe import load_recipe, protocol_hash, recipe_hash, resolve

from .conftest import sslbench_cmd


def _bad(recipe, path, value):
    recipe = copy.deepcopy(recipe)
    *parents, last = path
    node = recipe
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return recipe


BAD_CASES = [
    # (where, value, key path in the message, words the message must contain)
    (("run", "sed"), 1, "run.sed", "unknown key"),
    (("stages", 0, "optimizer", "lr"), "fast", "stages[0].optimizer.lr", "expected a number"),
    (("stages", 0, "optimizer", "lr"), -1.0, "stages[0].optimizer.lr", "> 0"),
    (("stages", 0, "layer_decay"), 1.5, "stages[0].layer_decay", "<= 1"),
    (("stages", 0, "objective"), "simclr9", "stages[0].objective", "unknown objective 'simclr9'"),
    (("eval", 0, "name"), "nope", "eval[0].name", "unknown evaluator 'nope'"),
    (("data", "train", "source"), "nowhere", "data.train.source", "unknown dataset 'nowhere'"),
    (("backbone", "checkpoint"), "/no/such/weights.pth", "backbone.checkpoint", "file not found"),
    (("backbone", "checkpoint_format"), "caffe", "backbone.checkpoint_format", "unknown checkpoint format"),
    (("stages", 0, "options", "mask_ratio"), 2.0, "stages[0].options.mask_ratio", "<= 1"),
    (("stages", 0, "options", "decoder_width"), 3, "stages[0].options.decoder_width", "allowed keys"),
    (("run", "mixed_precision"), "fp8", "run.mixed_precision", "one of"),
    (("eval", 0, "k"), [5, "ten"], "eval[0].k[1]", "integers"),
    (("run", "name"), KeyError, "run.name", "missing"),
    (("eval", 0, "block"), 40, "eval[0]", "block: got 40, expected -2..1"),   # a block the backbone lacks
]


@pytest.mark.parametrize("where,value,key,words", BAD_CASES, ids=[c[2] for c in BAD_CASES])
def test_bad_recipe_one_line_error_exit_2(tiny_recipe, write_recipe, capsys, where, value, key, words):
    path = write_recipe(_bad(tiny_recipe, where, value))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path}: {key}:"), err
    assert words in err, err


def test_bad_recipe_from_the_shell_has_no_traceback(tiny_recipe, write_recipe):
    path = write_recipe(_bad(tiny_recipe, ("stages", 0, "optimizer", "lr"), "fast"))
    out = subprocess.run(sslbench_cmd() + ["run", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: {path}: stages[0].optimizer.lr: got 'fast' (str), expected a number > 0")
    debug = subprocess.run(sslbench_cmd() + ["--debug", "run", str(path)], capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_a_block_the_backbone_lacks_fails_before_training_and_leaves_no_run_folder(tiny_recipe, write_recipe,
                                                                                   capsys):
    path = write_recipe(_bad(tiny_recipe, ("eval", 0, "block"), 40))
    assert main(["run", str(path)]) == 2
    assert "eval[0]: knn: block: got 40" in capsys.readouterr().err
    assert not (Path(tiny_recipe["run"]["output_dir"]) / tiny_recipe["run"]["name"]).exists()


def test_missing_and_malformed_recipe_files(tmp_path, capsys):
    assert main(["check", str(tmp_path / "absent.toml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[run\nname = 1")
    assert main(["check", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_defaults_are_filled_and_stages_inherit(tiny_recipe):
    raw = copy.deepcopy(tiny_recipe)
    raw["stages"].append({"objective": "mae", "steps": 2, "optimizer": {"lr": 5e-4}})
    recipe = resolve(raw, get_registry())
    first, second = recipe.stages
    assert first.name == "stage0" and second.name == "stage1"
    assert first.optimizer.weight_decay == 0.05 and first.grad_accum == 1
    # the second stage keeps what it did not override, including the objective's options
    assert second.optimizer.betas == (0.9, 0.95) and second.optimizer.lr == 5e-4
    assert second.options["decoder_dim"] == 32 and second.batch_size == 64
    assert recipe.run.checkpoint_every == 0 and recipe.eval[0].options["temperature"] == 0.07


def test_the_typed_recipe_is_frozen_mirrors_the_schemas_and_keeps_its_hashes(tiny_recipe):
    """Attributes, not string keys: one field per declared option, nothing assignable, and the canonical form (what
    is hashed and written to recipe.json) unchanged by the typing."""
    import dataclasses

    from sslbench.training import recipe as schemas
    from sslbench.training.spec import (BackboneSpec, DataSpec, OptimizerSpec, RunSpec, ScheduleSpec, StageSpec,
                                        canonical_hash, hashed_form)

    for spec, schema in [(RunSpec, schemas.RUN), (BackboneSpec, schemas.BACKBONE), (DataSpec, schemas.DATA),
                         (StageSpec, schemas.STAGE), (OptimizerSpec, schemas.OPTIMIZER),
                         (ScheduleSpec, schemas.SCHEDULE)]:
        assert [f.name for f in dataclasses.fields(spec)] == list(schema), spec.__name__
    recipe = resolve(copy.deepcopy(tiny_recipe), get_registry())
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.run.seed = 1
    with pytest.raises(TypeError):
        recipe.stages[0].options["mask_ratio"] = 0.5
    assert recipe.recipe_hash == canonical_hash(hashed_form(recipe.as_dict()))
    assert resolve(recipe.as_dict(), get_registry()) == recipe            # the canonical form resolves to itself
    seeded = recipe.replace(run={"seed": 7})
    assert seeded.run.seed == 7 and recipe.run.seed == 0
    assert seeded.recipe_hash != recipe.recipe_hash and seeded.protocol_hash == recipe.protocol_hash


def test_hashes_ignore_cosmetic_keys_and_protocol_ignores_training(tiny_recipe):
    registry = get_registry()
    base = resolve(copy.deepcopy(tiny_recipe), registry)
    cosmetic = copy.deepcopy(tiny_recipe)
    cosmetic["run"]["log_every"] = 7
    cosmetic["run"]["output_dir"] = "elsewhere"
    assert recipe_hash(resolve(cosmetic, registry)) == recipe_hash(base)
    longer = copy.deepcopy(tiny_recipe)
    longer["stages"][0]["steps"] = 8
    other = resolve(longer, registry)
    assert recipe_hash(other) != recipe_hash(base)
    assert protocol_hash(other) == protocol_hash(base)
    k = copy.deepcopy(tiny_recipe)
    k["eval"][0]["k"] = [20]
    assert protocol_hash(resolve(k, registry)) != protocol_hash(base)


def test_check_prints_resolved_recipe_and_plan(tiny_recipe, write_recipe, capsys):
    path = write_recipe(tiny_recipe)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "recipe hash" in out and "protocol hash" in out
    assert "[[stages]]" in out and 'objective = "mae"' in out
    assert "Stage 0 'stage0': mae, 4 steps, batch 64" in out
    assert "Evaluate knn" in out


def test_resolved_recipe_round_trips_through_toml(tiny_recipe, tmp_path):
    from sslbench.training.recipe import to_toml

    registry = get_registry()
    recipe = resolve(copy.deepcopy(tiny_recipe), registry)
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(recipe))
    assert load_recipe(path, registry) == recipe


def test_recipe_error_carries_the_source():
    with pytest.raises(RecipeError) as info:
        resolve({"run": {}}, get_registry(), source="x.toml")
    assert str(info.value).startswith("x.toml: run.name: missing")


# Every committed recipe's hashes as the committed results carry them (results/*/recipe.json): a change to the
# recipe code that moved one would make existing results incomparable with new runs. The three Fashion-MNIST
# refinements moved on 2026-11-29 on purpose: their starting checkpoint is now runs/fmnist_mae/... (a user's runs
# went from results/runs/ to runs/); their committed rows carry the old hashes (cb912815…, 68a7cf16…, b5f423e9…).
# The two ConMIM recipes moved on 2026-12-05 on purpose (issue 16): the official mask modes (mask_mode and its
# options); results/fmnist_conmim, trained with the old block-wise cells, carries the old hash (ac458083…).
# The two study refinements moved on 2026-12-06 on purpose (issue 13): they start from the 20-epoch base
# (runs/fmnist_mae_base_20ep/...); nothing had been published with their old hashes.
COMMITTED_HASHES = {
    # conmim_vitl moved again the same day: the official BEiT-style ViT-L (backbone.model_args); no committed results
    "recipes/conmim_vitl.toml": ("26e9fa8d0f854d98", "d37415a6f0c5b1dd"),
    "recipes/digits/mae.toml": ("053a917c6fecf6be", "8a1d1f20846650d4"),
    "recipes/digits/maect.toml": ("ca7ce7c68fdab3fd", "8a1d1f20846650d4"),
    "recipes/digits/mimrefiner.toml": ("206b652439603a6a", "8a1d1f20846650d4"),
    "recipes/fmnist/conmim.toml": ("b89b1886c8abb229", "9c59d53bf51c1160"),
    "recipes/fmnist/conmim_study.toml": ("3da33fdb64800344", "e1e501e5a1bc4000"),
    "recipes/fmnist/eval_suite.toml": ("46fbffd68982ef2b", "924a727ef6187618"),
    "recipes/fmnist/mae.toml": ("3ca4057234814d10", "9c59d53bf51c1160"),
    "recipes/fmnist/mae_base.toml": ("5951a9a0c1f2f9d3", "e1e501e5a1bc4000"),
    "recipes/fmnist/mae_base_20ep.toml": ("7b080b74ff088a8a", "e1e501e5a1bc4000"),
    "recipes/fmnist/maect.toml": ("3d4f7d44c96daa5b", "cf2738af423bf0bc"),
    "recipes/fmnist/maect_long.toml": ("6ca7fab6653ea361", "cf2738af423bf0bc"),
    "recipes/fmnist/maect_study.toml": ("b13fd50cdd43c1b4", "e1e501e5a1bc4000"),
    "recipes/fmnist/micl.toml": ("37c86e31baf31a4a", "9c59d53bf51c1160"),
    "recipes/fmnist/micl_study.toml": ("e4fc90c5a6b6afe7", "e1e501e5a1bc4000"),
    "recipes/fmnist/mimco.toml": ("bace859343b984b0", "9c59d53bf51c1160"),      # teacher file absent
    "recipes/fmnist/mimrefiner.toml": ("e2fb26b078ed1d2f", "cf2738af423bf0bc"),
    "recipes/fmnist/mimrefiner_study.toml": ("784351cb5e9e0763", "e1e501e5a1bc4000"),
    "recipes/fmnist/refine_eval.toml": ("7466c2370c5e7fe2", "cf2738af423bf0bc"),
    "recipes/maect_vitl.toml": ("de0325e4b74f9229", "d37415a6f0c5b1dd"),
    "recipes/micl_vitl.toml": ("0fd6405ffa6f27d6", "d37415a6f0c5b1dd"),
    "recipes/mimco_vits.toml": ("390aad3d4449cf6c", "478568603012ef60"),        # teacher file absent
    "recipes/mimrefiner_d2v2_vith14.toml": ("7642785ef3a10dba", "d37415a6f0c5b1dd"),
    "recipes/mimrefiner_vitl.toml": ("e17c62cfd8be016e", "d37415a6f0c5b1dd"),
    "recipes/quickstart.toml": ("4493cb3947b14fb6", "5ddf152b008f0fea"),
}


def test_every_committed_recipe_keeps_its_hashes(tmp_path, monkeypatch):
    from pathlib import Path

    # A teacher file's content is part of the recipe hash; from an empty folder the relative teacher paths
    # (runs/fmnist_micl/..., checkpoints/...) are absent wherever the suite runs, so the hashes are those without it.
    monkeypatch.chdir(tmp_path)
    from sslbench.core.registry import get_registry
    from sslbench.training.recipe import load_recipe, protocol_hash, recipe_hash

    root = Path(__file__).parents[1]
    shipped = sorted(str(p.relative_to(root)) for p in (root / "recipes").rglob("*.toml"))
    assert shipped == sorted(COMMITTED_HASHES), "a recipe was added or removed: add its hashes to the table"
    for name, expected in COMMITTED_HASHES.items():
        recipe = load_recipe(root / name, get_registry(), check_files=False)
        assert (recipe_hash(recipe)[:16], protocol_hash(recipe)[:16]) == expected, name
