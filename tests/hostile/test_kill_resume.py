"""``kill -9`` at the awkward moments — before the first checkpoint and in the middle of writing one — then
``--resume``: the run ends exactly as an uninterrupted one, its log holds every step once, and no temporary file
is left behind."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest

from ..conftest import TINY_RECIPE, dump_recipe, kill_after_log_lines, sslbench_cmd

STEPS = 40

# Runs sslbench with torch.save replaced: the second checkpoint write puts a few bytes into its temporary file and
# then the process SIGKILLs itself, exactly as an out-of-memory kill in the middle of a save would.
DIE_MID_WRITE = """
import os, signal, sys, torch
real_save, calls = torch.save, [0]
def dying_save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
from sslbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _recipe(output_dir, checkpoint_every: int) -> dict:
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"].update(name="victim", output_dir=str(output_dir), checkpoint_every=checkpoint_every)
    recipe["stages"][0].update(steps=STEPS, batch_size=32)
    return recipe


def _env(tmp_path):
    return {**os.environ, "TQDM_DISABLE": "1", "SSLBENCH_CACHE": str(tmp_path / "cache")}


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _metrics(run_dir):
    frame = pd.read_csv(run_dir / "metrics.csv")
    return sorted(zip(frame["metric"], frame["variant"], frame["value"]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (the kill tests differ only in run.checkpoint_every, which changes no number)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    path = tmp_path / "reference.toml"
    path.write_text(dump_recipe(_recipe(tmp_path / "runs", 0)))
    done = subprocess.run(sslbench_cmd() + ["run", str(path)], capture_output=True, text=True, env=_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "victim"
    return _log(run_dir), _metrics(run_dir)


def _resume_and_compare(path, run_dir, tmp_path, reference):
    resumed = subprocess.run(sslbench_cmd() + ["run", str(path), "--resume"], capture_output=True, text=True,
                             env=_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = _log(run_dir)
    assert [r["global_step"] for r in log] == list(range(1, STEPS + 1))       # every step exactly once
    assert [r["loss"] for r in log] == [r["loss"] for r in reference[0]]
    assert _metrics(run_dir) == reference[1]
    leftovers = [p.name for p in run_dir.rglob(".tmp-*")]
    assert leftovers == []


def test_kill_before_the_first_checkpoint(tmp_path, reference):
    path = tmp_path / "victim.toml"
    path.write_text(dump_recipe(_recipe(tmp_path / "runs", 0)))
    run_dir = tmp_path / "runs" / "victim"
    kill_after_log_lines(["run", str(path)], run_dir / "log.jsonl", 5, _env(tmp_path))
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    _resume_and_compare(path, run_dir, tmp_path, reference)


def test_kill_in_the_middle_of_a_checkpoint_write(tmp_path, reference):
    path = tmp_path / "victim.toml"
    path.write_text(dump_recipe(_recipe(tmp_path / "runs", 7)))
    run_dir = tmp_path / "runs" / "victim"
    died = subprocess.run([sys.executable, "-c", DIE_MID_WRITE, "run", str(path)], capture_output=True, text=True,
                          env=_env(tmp_path))
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    stale = list((run_dir / "checkpoints").glob(".tmp-last.pt-*"))
    assert len(stale) == 1, "the kill should have left a half-written temporary file"
    from sslbench.training.resume import load_resume_state

    assert load_resume_state(run_dir / "checkpoints" / "last.pt")["meta"]["progress"]["global_step"] == 7
    _resume_and_compare(path, run_dir, tmp_path, reference)
