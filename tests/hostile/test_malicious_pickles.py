"""Malicious pickles through every path on which sslbench reads a torch file: the payload (which creates a marker
file when unpickled) must never run, and each refusal is one line. The recipe's ``checkpoint_trusted`` covers only
the recipe's own checkpoint, never a file named on the command line."""

from __future__ import annotations

import copy

import pytest
import torch

from sslbench.core.backbone import build_backbone
from sslbench.cli import main

from .conftest import files_under, malicious_file, prove_payload_works

FORMATS = ["timm", "mae", "sslbench", "sslbench_ema", "data2vec2"]


def _tiny_backbone(recipe):
    kwargs = {k: v for k, v in recipe["backbone"].items() if k != "model"}
    return build_backbone(recipe["backbone"]["model"], **kwargs)


def _content(fmt: str, recipe) -> dict:
    """Weights in the layout the format expects, so that only the payload makes the file bad."""
    state = _tiny_backbone(recipe).vit.state_dict()
    if fmt in ("sslbench", "sslbench_ema"):
        return {"format": "sslbench", "backbone": state, "ema": state}
    if fmt == "data2vec2":
        return {"model": {f"model.{k}": v for k, v in state.items()}}
    return {"model": state}


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PAYLOAD_RAN"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_recipe_checkpoint(fmt, suffix, tiny_recipe, tmp_path, write_recipe, refused, marker):
    path = malicious_file(tmp_path / f"evil{suffix}", marker, _content(fmt, tiny_recipe))
    recipe = copy.deepcopy(tiny_recipe)
    recipe["backbone"].update(checkpoint=str(path), checkpoint_format=fmt)
    if fmt == "data2vec2":  # its architecture must match, so that the refusal is about the pickle
        recipe["backbone"]["pos_embed"] = "sincos"
    recipe_path = write_recipe(recipe)
    refused(["run", recipe_path, "--no-progress"], "backbone.checkpoint_trusted", str(path))
    refused(["run", recipe_path, "--dry-run"], "backbone.checkpoint_trusted")
    assert main(["check", str(recipe_path)]) == 0          # check builds on the meta device and reads no weights
    assert not marker.exists()
    assert files_under(tmp_path / "runs") == []
    prove_payload_works(path, marker)


@pytest.mark.parametrize("fmt", FORMATS)
def test_eval_never_inherits_the_recipes_trust(fmt, tiny_recipe, tmp_path, write_recipe, refused, marker):
    """A recipe that trusts its own checkpoint (as the data2vec 2.0 ViT-H recipe does) lends no trust to the file
    given to ``sslbench eval --checkpoint``."""
    recipe = copy.deepcopy(tiny_recipe)
    recipe["backbone"].update(checkpoint_trusted=True)
    path = malicious_file(tmp_path / "evil.pt", marker, _content(fmt, tiny_recipe))
    refused(["eval", write_recipe(recipe), "--checkpoint", path, "--format", fmt, "--no-progress"],
            "--trust-checkpoint", str(path))
    assert not marker.exists()
    assert files_under(tmp_path / "runs") == []


def test_eval_trusts_only_with_the_flag_and_records_it(tiny_recipe, tmp_path, write_recipe):
    """``--trust-checkpoint`` is the explicit way to load a pickled-config file; the run records that it did."""
    import argparse
    import json

    state = _tiny_backbone(tiny_recipe).vit.state_dict()
    path = tmp_path / "with_config.pt"
    torch.save({"model": state, "args": argparse.Namespace(lr=1.0)}, path)    # harmless, but not weights-only
    assert main(["eval", str(write_recipe(tiny_recipe)), "--checkpoint", str(path), "--format", "timm",
                 "--trust-checkpoint", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "runs" / "eval-with_config" / "recipe.json").read_text())
    assert meta["evaluated_checkpoint"]["trusted"] is True


def test_resume_checkpoint(tiny_recipe, tmp_path, write_recipe, refused, marker):
    """A replaced ``checkpoints/last.pt`` is refused before anything of it runs."""
    recipe = copy.deepcopy(tiny_recipe)
    recipe["run"]["checkpoint_every"] = 2
    recipe_path = write_recipe(recipe)
    assert main(["run", str(recipe_path), "--no-progress"]) == 0
    last = tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt"
    genuine = torch.load(last, weights_only=True)                # readable weights-only: it holds no code
    malicious_file(last, marker, {k: v for k, v in genuine.items()})
    refused(["run", recipe_path, "--resume", "--no-progress"], str(last), "not a readable sslbench resume")
    assert not marker.exists()
    prove_payload_works(last, marker)


def test_caches_treat_a_malicious_file_as_a_miss(tiny_recipe, tmp_path, write_recipe, marker, monkeypatch):
    """Feature and dataset cache files are read weights-only too: a replaced one is recomputed, never run."""
    recipe = copy.deepcopy(tiny_recipe)
    recipe["data"]["train"] = {"source": "imagefolder", "path": str(_folder(tmp_path))}
    recipe["data"]["test"] = dict(recipe["data"]["train"])
    recipe["stages"][0]["batch_size"] = 4
    recipe["eval"] = [{"name": "knn", "k": [3]}]
    recipe_path = write_recipe(recipe)
    assert main(["run", str(recipe_path), "--no-progress"]) == 0
    cache = tmp_path / "cache"
    cached = [p for p in cache.rglob("*.pt")]
    assert any("datasets" in p.parts for p in cached) and any("features" in p.parts for p in cached)
    for path in cached:
        malicious_file(path, marker, {})
    assert main(["run", str(recipe_path), "--no-progress", "--force"]) == 0
    assert not marker.exists()


def _folder(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (16, 16), color=30 * i + (0 if label == "a" else 15)).save(root / label / f"{i}.png")
    return root


def test_every_torch_load_in_the_package_is_weights_only():
    """A new loading path cannot slip in unpickling: every ``torch.load`` call in sslbench passes
    ``weights_only=True``, except the one behind an explicit trust decision in ``read_checkpoint_file``."""
    import ast
    from pathlib import Path

    import sslbench

    roots = [Path(sslbench.__file__).parent, Path(__file__).parents[2] / "plugins"]
    unsafe = []
    for root in roots:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" and \
                        getattr(node.func.value, "id", "") == "torch":
                    flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                    if not (isinstance(flag, ast.Constant) and flag.value is True):
                        unsafe.append(f"{path.name}:{node.lineno}")
    assert [u.split(":")[0] for u in unsafe] == ["checkpoints.py"], unsafe
