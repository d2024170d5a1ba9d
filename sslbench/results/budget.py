"""What a run spent: epochs, images seen and training time, read from its folder (``recipe.json``, ``log.jsonl``).

A leaderboard compares like with like only when the reader sees the budget behind each row. Everything is derived
from files every run writes, so older runs get a budget too:

* **images seen** — per stage, the last logged step × the stage's (global) ``batch_size``;
* **epochs** — the last logged ``epoch`` per stage (logged since 2026-11-29), else the stage's ``epochs`` setting
  when it has one;
* **training time** — per logged window, its steps × batch size ÷ its measured images/s. Time between windows
  (evaluation, checkpoints, an interrupted run waiting for ``--resume``) is not counted, so the figure is the time
  spent training, also for a resumed run.

Online-monitoring lines (``"kind": "monitor"``, :mod:`sslbench.training.monitor`) are not training: they count for
none of the three (the trainer also leaves their seconds out of the next window's images/s).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Budget", "run_budget", "read_log", "format_budget", "format_count", "format_duration"]


@dataclass(frozen=True)
class Budget:
    epochs: float | None
    images: int
    seconds: float | None
    steps: int


def read_log(run_dir: str | Path) -> list[dict] | None:
    """The lines of ``run_dir/log.jsonl`` that parse as JSON objects (a line cut by a kill is skipped: the rest is
    still good); ``None`` without a readable file."""
    lines = []
    try:
        with open(Path(run_dir) / "log.jsonl", encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    lines.append(record)
    except OSError:
        return None
    return lines


def run_epochs(lines: list[dict]) -> dict[int, float]:
    """Per stage that appears in ``lines`` (training or monitor lines), the epoch at which it starts when the epochs
    are counted over the whole run: the sum of the last logged training epochs of the stages before it."""
    ended: dict[int, float] = {}
    stages = set()
    for record in lines:
        if isinstance(record.get("epoch"), (int, float)):
            stage = int(record.get("stage", 0))
            stages.add(stage)
            if record.get("kind", "train") == "train":
                ended[stage] = max(ended.get(stage, 0.0), float(record["epoch"]))
    return {stage: sum(e for s, e in ended.items() if s < stage) for stage in stages}


def run_budget(run_dir: str | Path) -> Budget | None:
    """The budget of the run in ``run_dir``; ``None`` for a folder without training (``sslbench eval``)."""
    from sslbench.results.metrics import run_recipe

    run_dir = Path(run_dir)
    stages = run_recipe(run_dir).get("stages") or []
    lines = read_log(run_dir)
    if lines is None:
        return None
    if not stages or not lines:
        return None
    last: dict[int, dict] = {}
    seconds, timed, previous = 0.0, True, {}
    for record in lines:
        if record.get("kind", "train") != "train":
            continue
        stage = int(record.get("stage", 0))
        if stage >= len(stages):
            continue
        step = int(record.get("step", 0))
        batch = int(stages[stage].get("batch_size") or 0)
        window = step - previous.get(stage, 0)
        rate = record.get("images_per_s")
        if isinstance(rate, (int, float)) and rate > 0 and window > 0:
            seconds += window * batch / rate
        elif window > 0:
            timed = False
        previous[stage] = step
        last[stage] = record
    images = sum(int(r.get("step", 0)) * int(stages[s].get("batch_size") or 0) for s, r in last.items())
    epochs = 0.0
    for s, record in last.items():
        if isinstance(record.get("epoch"), (int, float)):
            epochs += float(record["epoch"])
        elif stages[s].get("epochs") is not None:
            epochs += float(stages[s]["epochs"])
        else:
            epochs = math.nan
    return Budget(None if math.isnan(epochs) else epochs, images, seconds if timed else None,
                  sum(int(r.get("step", 0)) for r in last.values()))


def format_count(n: float) -> str:
    """``240000`` → ``"240k"``, ``1500000`` → ``"1.5M"``."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def format_duration(seconds: float) -> str:
    """``95`` → ``"1.6 min"``, ``7200`` → ``"2.0 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_budget(budget: Budget | None) -> str:
    """``"40 ep · 57.6k img · 3.4 min"``; ``"eval only"`` without training."""
    if budget is None:
        return "eval only"
    parts = [f"{budget.epochs:.3g} ep" if budget.epochs is not None else f"{budget.steps} steps",
             f"{format_count(budget.images)} img"]
    if budget.seconds is not None:
        parts.append(format_duration(budget.seconds))
    return " · ".join(parts)
