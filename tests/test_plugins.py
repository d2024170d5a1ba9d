"""Plugin discovery: entry points, name collisions, broken plugins, and a third-party objective end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest

import sslbench
from sslbench.core.errors import PluginError
from sslbench.core.registry import build_registry

from .conftest import dump_recipe, sslbench_cmd


def test_first_party_plugins_register_through_entry_points():
    registry = build_registry()
    assert registry.entries["objective"]["mae"].plugin == "mae"
    assert registry.entries["evaluator"]["knn"].plugin == "knn"
    assert {"digits", "fashion_mnist", "hf"} <= set(registry.names("dataset"))
    assert {"timm", "mae", "data2vec2", "sslbench"} <= set(registry.names("checkpoint_format"))
    assert not registry.failed, registry.failed


def test_two_plugins_registering_one_name_is_an_error_naming_both():
    impostor = types.ModuleType("impostor")

    @sslbench.hookimpl
    def register_objectives(register):
        register("mae", object)

    impostor.register_objectives = register_objectives
    with pytest.raises(PluginError, match="objective 'mae' is registered by two plugins: 'mae' and 'impostor'"):
        build_registry(extra_modules={"impostor": impostor})


def test_plugin_that_fails_to_import_is_listed_and_others_keep_working(tmp_path):
    site = _install_plugin(tmp_path, "broken_plugin", "import does_not_exist_anywhere\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(sslbench_cmd() + ["list"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "mae" in out.stdout and "[plugin: mae]" in out.stdout
    assert "Plugins that failed to load:" in out.stdout
    assert "broken_plugin (broken_plugin): ModuleNotFoundError: No module named 'does_not_exist_anywhere'" in out.stdout


def test_every_hook_is_documented():
    from sslbench.core import hookspecs

    for name in ("register_objectives", "register_evaluators", "register_checkpoint_formats", "register_datasets"):
        assert getattr(hookspecs, name).__doc__.strip()


def _install_plugin(tmp_path, name: str, source: str):
    """A package folder discoverable through an ``sslbench`` entry point, as pip would install it."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(source)
    dist = site / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[sslbench]\n{name} = {name}\n")
    return site


THIRD_PARTY = textwrap.dedent('''
    """A third-party objective: SimSiam-style negative cosine between two crops' CLS tokens."""
    import torch
    import torch.nn.functional as F

    import sslbench
    from sslbench.data.views import Compose, IndependentCrops, Normalize, RandomResizedCrop


    class CosineCrops(sslbench.Objective):
        name = "cosine_crops"
        description = "negative cosine similarity of two crops (toy third-party plugin)"
        options = {"scale_min": sslbench.Option(0.3, float, "smallest crop area", min=0, max=1)}

        def __init__(self, backbone, opts, context):
            super().__init__(backbone, opts, context)
            self.predictor = torch.nn.Linear(backbone.embed_dim, backbone.embed_dim)

        def views(self, data):
            crop = RandomResizedCrop(data.image_size, scale=(self.opts["scale_min"], 1.0))
            return IndependentCrops(2, Compose([crop, Normalize(data.mean, data.std)]))

        def forward(self, views, batch):
            a, b = (self.backbone(v).tokens[:, 0] for v in views)
            loss = -F.cosine_similarity(self.predictor(a), b.detach(), dim=-1).mean()
            return {"loss": loss, "logs": {"cos": -loss.detach()}}


    @sslbench.hookimpl
    def register_objectives(register):
        register("cosine_crops", CosineCrops)
''')


def test_third_party_objective_runs_from_a_recipe(tmp_path, tiny_recipe):
    site = _install_plugin(tmp_path, "sslbench_cosine_crops", THIRD_PARTY)
    env = {**os.environ, "PYTHONPATH": str(site)}
    listing = subprocess.run(sslbench_cmd() + ["list"], capture_output=True, text=True, env=env)
    assert "cosine_crops" in listing.stdout and "[plugin: sslbench_cosine_crops]" in listing.stdout
    recipe = tiny_recipe
    recipe["run"]["name"] = "third_party"
    recipe["stages"] = [{"objective": "cosine_crops", "steps": 3, "batch_size": 32, "optimizer": {"lr": 1e-3},
                         "options": {"scale_min": 0.5}}]
    path = tmp_path / "third_party.toml"
    path.write_text(dump_recipe(recipe))
    out = subprocess.run(sslbench_cmd() + ["run", str(path), "--no-progress"], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = (tmp_path / "runs" / "third_party" / "metrics.csv").read_text()
    assert "cosine_crops" in metrics and "knn" in metrics
