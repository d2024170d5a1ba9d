"""Plugin discovery: entry points, name collisions, broken plugins, and a third-party objective end to end."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

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


def readme_plugin() -> str:
    """The objective of the README's "Writing a plugin" section, exactly as a user would copy it."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Writing a plugin"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]


def test_readme_objective_installs_as_a_separate_package_and_trains(tmp_path, tiny_recipe):
    """A sixth objective written only against the documented contract (typed batch, keyed mask, EMA teacher),
    installed with pip as its own distribution, is listed and trains from a recipe."""
    package = tmp_path / "sslbench-masked-distill"
    package.mkdir()
    (package / "masked_distill.py").write_text(readme_plugin())
    (package / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "sslbench-masked-distill"
        version = "0.1"
        [project.entry-points.sslbench]
        masked_distill = "masked_distill"
        [tool.setuptools]
        py-modules = ["masked_distill"]
    """))
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(package)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site), "TQDM_DISABLE": "1"}
    listing = subprocess.run(sslbench_cmd() + ["list"], capture_output=True, text=True, env=env)
    assert "masked_distill" in listing.stdout and "[plugin: masked_distill]" in listing.stdout
    recipe = tiny_recipe
    recipe["run"]["name"] = "third_party"
    recipe["stages"] = [{"objective": "masked_distill", "steps": 3, "batch_size": 32, "optimizer": {"lr": 1e-3},
                         "options": {"mask_ratio": 0.75}}]
    path = tmp_path / "third_party.toml"
    path.write_text(dump_recipe(recipe))
    out = subprocess.run(sslbench_cmd() + ["run", str(path), "--no-progress"], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = (tmp_path / "runs" / "third_party" / "metrics.csv").read_text()
    assert "masked_distill" in metrics and "knn" in metrics
    losses = [json.loads(line)["loss"] for line in (tmp_path / "runs" / "third_party" / "log.jsonl").open()]
    assert len(losses) == 3 and all(-1.0 <= loss <= 1.0 for loss in losses)
    bad = copy.deepcopy(recipe)
    bad["stages"][0]["options"]["mask_ratio"] = 1.0
    path.write_text(dump_recipe(bad))
    refused = subprocess.run(sslbench_cmd() + ["run", str(path), "--no-progress"], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
    assert refused.returncode == 2 and "stages[0].options.mask_ratio" in refused.stderr
