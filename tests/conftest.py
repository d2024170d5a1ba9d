"""Shared fixtures: a tiny valid recipe on the embedded digits data, and helpers to write recipe variants."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

# Two cores are shared by the test processes: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_RECIPE = {
    "run": {"name": "tiny", "seed": 0, "log_every": 1},
    "backbone": {"model": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "in_chans": 1,
                 "embed_dim": 32, "depth": 2, "num_heads": 2, "pos_embed": "sincos"},
    "data": {"train": {"source": "digits", "split": "train", "size": 16},
             "test": {"source": "digits", "split": "test", "size": 16}},
    "stages": [{"objective": "mae", "steps": 4, "batch_size": 64,
                "optimizer": {"lr": 1e-3, "betas": [0.9, 0.95]},
                "schedule": {"warmup_epochs": 0.0},
                "options": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}}],
    "eval": [{"name": "knn", "k": [5, 10]}],
}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def dump_recipe(recipe: dict) -> str:
    """A recipe dict as TOML (tables inline where nested), for writing test variants."""
    lines = []
    for section in ("run", "backbone", "data"):
        if section in recipe:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in recipe[section].items()]
    for key in recipe:
        if key not in ("run", "backbone", "data", "stages", "eval"):
            lines.append(f"[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in recipe[key].items()]
    for stage in recipe.get("stages", []):
        lines.append("[[stages]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in stage.items()]
    for ev in recipe.get("eval", []):
        lines.append("[[eval]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in ev.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def tiny_recipe(tmp_path) -> dict:
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"]["output_dir"] = str(tmp_path / "runs")
    return recipe


@pytest.fixture
def write_recipe(tmp_path):
    def write(recipe: dict, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(dump_recipe(recipe))
        return path

    return write


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Feature and dataset caches go to the test's own folder."""
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))


def assert_declared(registry, kind: str, name: str, base: type):
    """A registered plugin class declares itself fully: the right base class, its own name, a description and a
    documented option each. Returns the class."""
    factory = registry.get(kind, name).factory
    assert issubclass(factory, base) and factory.name == name and factory.description
    for key, option in factory.options.items():
        assert option.doc, f"{kind} {name}: option {key} has no documentation"
    return factory


def sslbench_cmd() -> list[str]:
    return [sys.executable, "-m", "sslbench"]


def layer_types(module) -> list[type]:
    return [type(layer) for layer in module]


def linears(module) -> list:
    return [layer for layer in module if isinstance(layer, torch.nn.Linear)]


def kill_after_log_lines(argv: list[str], log, lines: int, env: dict, timeout: float = 180.0) -> None:
    """Start ``sslbench argv`` and SIGKILL it as soon as ``log`` holds ``lines`` lines; assert that it was killed
    (not finished) — as a pre-empted node or an out-of-memory kill would stop a run."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(sslbench_cmd() + argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and sum(1 for _ in log.open()) >= lines:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def stage_spec(**changes):
    """A validated stage as a run sees it (every key filled in by the recipe schema) with ``changes``; the
    ``optimizer`` and ``schedule`` tables given as dicts of their own changes."""
    from sslbench.core.options import validate_options
    from sslbench.training.recipe import OPTIMIZER, SCHEDULE, STAGE
    from sslbench.training.spec import OptimizerSpec, ScheduleSpec, StageSpec

    optimizer = validate_options(OPTIMIZER, {"lr": 1e-3, **changes.pop("optimizer", {})}, "optimizer")
    schedule = validate_options(SCHEDULE, changes.pop("schedule", {}), "schedule")
    stage = validate_options(STAGE, {"objective": "mae", "steps": 1, **changes}, "stage")
    return StageSpec(**{**stage, "name": stage["name"] or "stage0", "freeze": tuple(stage["freeze"]),
                        "optimizer": OptimizerSpec(**{**optimizer, "betas": tuple(optimizer["betas"])}),
                        "schedule": ScheduleSpec(**schedule)})


@pytest.fixture
def refused(capsys):
    """``refused(argv, *expected)``: the command exits 2 with exactly one ``error:`` line on stderr that contains
    every ``expected`` text, and raises no exception (an escaped exception would be a traceback)."""

    def check(argv: list[str], *expected: str) -> str:
        capsys.readouterr()
        from sslbench.cli import main

        code = main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, f"exit {code}, stderr: {err}"
        assert len(err) == 1 and err[0].startswith("error: "), err
        for text in expected:
            assert text in err[0], f"{text!r} not in {err[0]!r}"
        return err[0]

    return check
