"""`sslbench publish`: copy finished runs into the committed results folder, without what must not be committed.

A user's runs live in ``runs/`` (git-ignored), so running a recipe never touches the reference results a clone
ships with. Publishing a run copies what a reader needs to trust its numbers — the resolved recipe, the log, the
metrics and per-sample predictions, the per-block table and plot, the training-signals figure — and leaves checkpoints, feature caches, tracker
logs and temporary files behind. The copy is made in a temporary folder and renamed into place, so an interrupted
publish leaves no half-copied run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sslbench.core.errors import UserError

#: What a published run keeps.
KEPT = ("recipe.toml", "recipe.json", "log.jsonl", "metrics.csv", "predictions.npz", "per_block.csv",
        "per_block.png", "training.png")


def publish_runs(run_dirs: list[str], destination: str = "results", force: bool = False) -> list[Path]:
    """Copy each run folder's :data:`KEPT` files to ``destination/<run name>/``; returns the new folders."""
    from sslbench.core.io import atomic_directory
    from sslbench.training.run_folder import read_meta

    destination_root = Path(destination)
    sources = [Path(d) for d in run_dirs]
    for source in sources:                       # every problem is reported before anything is copied
        if not (source / "metrics.csv").is_file() or read_meta(source) is None:
            raise UserError(f"{source}: not a finished sslbench run (expected recipe.json and metrics.csv in it)")
        target = destination_root / source.name
        if target.resolve() == source.resolve():
            raise UserError(f"{source}: already in {destination_root}")
        if target.exists() and not force:
            raise UserError(f"{target}: a published run of this name exists; --force replaces it")
    published = []
    for source in sources:
        target = destination_root / source.name
        with atomic_directory(target) as staging:        # replaces an older copy (--force) in one rename
            for name in KEPT:
                if (source / name).is_file():
                    shutil.copy2(source / name, staging / name)
        published.append(target)
        print(f"published {source} → {target}")
    if published:
        print(f"refresh the committed leaderboard: sslbench leaderboard {destination_root} --plots && "
              f"sslbench report {destination_root}")
    return published
