"""The run folder on disk: created whole, reopened only for the same recipe, removed only when it is ours.

``<run.output_dir>/<run.name>/`` is the one place a run writes. Three promises protect what is already there:

* **created whole** — the folder appears (atomically, by rename) with its ``recipe.toml`` and ``recipe.json`` only
  after the run's data, model and first stage are built, so bad input leaves nothing behind;
* **reopened only for the same recipe** — a different recipe is refused; ``--resume --allow-optimizer-change``
  accepts a recipe that differs only in optimiser settings (``stages[i].optimizer`` / ``schedule`` /
  ``clip_grad``, e.g. a lower learning rate after a divergence) and records the change in ``recipe.json``'s
  ``history``;
* **removed only when it is ours** — ``--force`` deletes a folder only if it lies directly inside
  ``run.output_dir`` and holds an sslbench ``recipe.json``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from sslbench.core.version import __version__
from sslbench.core.errors import UserError
from sslbench.core.io import atomic_directory, atomic_write_text, remove_stale_temp_files
from sslbench.training.recipe import to_toml
from sslbench.training.spec import Recipe, hashed_form

META = "recipe.json"
# Keys a resume may change with --allow-optimizer-change: they steer the optimiser, not what is trained.
_RESUMABLE = re.compile(r"stages\[\d+\]\.(optimizer\.(lr|betas|eps|momentum|weight_decay|head_weight_decay|"
                        r"scale_lr_by_batch)|schedule(\.\w+)?|clip_grad)$")


def run_dir_of(recipe: Recipe) -> Path:
    return Path(recipe.run.output_dir) / recipe.run.name


def read_meta(run_dir: Path) -> dict | None:
    """The folder's ``recipe.json`` as a dict with a ``recipe_hash``, or ``None`` if it has no such file."""
    try:
        meta = json.loads((run_dir / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("recipe_hash"), str) else None


def write_meta(run_dir: Path, recipe: Recipe, **extra: Any) -> None:
    """``recipe.toml`` (resolved) and ``recipe.json`` (hashes, version, ``extra``, the recipe) in ``run_dir``."""
    atomic_write_text(run_dir / "recipe.toml", to_toml(recipe))
    atomic_write_text(run_dir / META, json.dumps({"recipe_hash": recipe.recipe_hash,
                                                  "protocol_hash": recipe.protocol_hash,
                                                  "sslbench_version": __version__,
                                                  **({"overrides": list(recipe.overrides)}
                                                     if recipe.overrides else {}), **extra,
                                                  "recipe": recipe.as_dict()},
                                                 indent=2))


def remove_run_folder(run_dir: Path, output_dir: Path) -> None:
    """Delete ``run_dir`` for ``--force`` — only an sslbench run folder directly inside ``output_dir``."""
    _check_removable(run_dir, output_dir)
    shutil.rmtree(run_dir)


def _check_removable(run_dir: Path, output_dir: Path) -> None:
    root = Path(output_dir).resolve()
    if run_dir.is_symlink() or run_dir.resolve().parent != root:
        raise UserError(f"{run_dir}: --force removes only run folders directly inside run.output_dir ({root}); "
                        "this is not one")
    if read_meta(run_dir) is None:
        raise UserError(f"{run_dir}: not an sslbench run folder (no readable {META}); --force will not delete it. "
                        "Choose another run.name or move the folder away yourself")


def recipe_changes(old: dict | Recipe, new: dict | Recipe) -> list[tuple[str, Any, Any]]:
    """``(key path, old value, new value)`` for every key whose value differs between two resolved recipes,
    ignoring the keys left out of the recipe hash."""
    changes: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and key in ("stages", "eval"):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{key}[{i}]")
        elif a != b:
            changes.append((key, a, b))

    walk(hashed_form(old), hashed_form(new), "")
    return changes


def _listing(changes: list[tuple[str, Any, Any]], limit: int = 3) -> str:
    shown = ", ".join(f"{k} {a!r} → {b!r}" for k, a, b in changes[:limit])
    return shown + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def reopen_check(run_dir: Path, recipe: Recipe, *, resume: bool, allow_optimizer_change: bool) -> dict | None:
    """Check that ``recipe`` may write into the existing ``run_dir``. Returns the history entry to record when a
    resume changes optimiser settings, else ``None``. Raises :class:`UserError` otherwise."""
    meta = read_meta(run_dir)
    if meta is None:
        if any(run_dir.iterdir()):
            raise UserError(f"{run_dir}: exists and is not an sslbench run folder; choose another run.name")
        return None
    has_state = (run_dir / "checkpoints" / "last.pt").exists()
    if has_state and not resume:
        raise UserError(f"{run_dir}: a run with this name exists; pass --resume to continue it or --force to start "
                        "over")
    if meta["recipe_hash"] == recipe.recipe_hash:
        return None
    old = meta.get("recipe")
    changes = recipe_changes(old, recipe) if isinstance(old, dict) else []
    resumable = bool(changes) and all(_RESUMABLE.fullmatch(key) for key, _, _ in changes)
    if resume and has_state and resumable and allow_optimizer_change:
        return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "previous_recipe_hash": meta["recipe_hash"],
                "changes": [{"key": k, "old": a, "new": b} for k, a, b in changes]}
    what = f" ({_listing(changes)})" if changes else ""
    if resume and has_state and resumable:
        hint = "pass --allow-optimizer-change to resume with these optimiser settings (recorded in recipe.json)"
    else:
        hint = "rename run.name, or pass --force to start over"
    given = meta.get("overrides") or []
    if given and list(given) != list(recipe.overrides):
        hint = f"it was run with the command-line overrides {' '.join(given)} (give them again), or {hint}"
    raise UserError(f"{run_dir}: holds a run of a different recipe{what}; {hint}")


def open_run_folder(recipe: Recipe, *, resume: bool, force: bool, allow_optimizer_change: bool = False) -> Path:
    """Create the run folder whole (or reopen it for a resume); main process only. Returns its path."""
    run_dir = run_dir_of(recipe)
    output_dir = Path(recipe.run.output_dir)
    history_entry = None
    if run_dir.exists() or run_dir.is_symlink():
        if force:
            remove_run_folder(run_dir, output_dir)
        else:
            history_entry = reopen_check(run_dir, recipe, resume=resume,
                                         allow_optimizer_change=allow_optimizer_change)
    if not run_dir.exists():
        with atomic_directory(run_dir) as tmp:
            (tmp / "checkpoints").mkdir()
            write_meta(tmp, recipe)
        return run_dir
    # Reopened: clear what killed writers left behind, and record an accepted change of optimiser settings.
    for folder in (run_dir, run_dir / "checkpoints"):
        remove_stale_temp_files(folder)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    previous = read_meta(run_dir) or {}
    history = list(previous.get("history", []))
    if history_entry is not None:
        history.append(history_entry)
    write_meta(run_dir, recipe, **({"history": history} if history else {}))
    return run_dir


def finished_run(recipe: Recipe) -> Path | None:
    """The run folder of ``recipe`` when it holds this very recipe (same hash) run to the end — its last stage
    evaluated, or, without ``[[eval]]``, its backbone exported — else ``None``."""
    run_dir = run_dir_of(recipe)
    meta = read_meta(run_dir) if run_dir.is_dir() and not run_dir.is_symlink() else None
    if meta is None or meta["recipe_hash"] != recipe.recipe_hash:
        return None
    if not recipe.eval:
        return run_dir if (run_dir / "checkpoints" / "backbone.pt").is_file() else None
    from sslbench.results.metrics import read_metrics

    try:
        rows = read_metrics(run_dir / "metrics.csv")
    except (OSError, UserError):
        return None
    return run_dir if (rows["stage"] == recipe.stages[-1].name).any() else None
