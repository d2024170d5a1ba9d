"""`sslbench eval RECIPE --checkpoint PATH`: score an existing checkpoint with a recipe's ``[[eval]]`` section.

Nothing is trained: the recipe's backbone is built, the checkpoint is loaded in the given format (an official MAE /
data2vec 2.0 / timm file, or an sslbench run's ``checkpoints/backbone.pt``), the recipe's evaluation data are
loaded and every ``[[eval]]`` runs on the cached features — exactly as after training, so the rows carry the same
protocol hash as the recipe's own runs and sit beside them in the leaderboard.

The rows go to ``<run.output_dir>/<name>/metrics.csv`` with stage ``eval`` and the checkpoint file in the
``checkpoint`` column; the folder also holds ``recipe.toml``/``recipe.json`` (the resolved recipe with the
checkpoint filled in). The objective column is the objective chain of the run that wrote the checkpoint when the
file is ``<run>/checkpoints/*.pt`` next to that run's ``recipe.json``, else ``pretrained:<format>``.
"""

from __future__ import annotations

from typing import Sequence

import json
import re
from pathlib import Path

from sslbench.core.errors import RecipeError, UserError

#: The stage label of rows written by ``sslbench eval``.
EVAL_STAGE = "eval"


def sslbench_header(path: Path) -> dict | None:
    """The entries of a file that says it is an sslbench ``backbone.pt`` (``format``, ``backbone``, ``ema``,
    ``backbone_recipe``, ...), else ``None``. The file is memory-mapped, so looking costs no read of the weights."""
    import torch

    if path.suffix == ".safetensors":
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:          # unreadable here: the real load reports it properly
        return None
    if isinstance(obj, dict) and obj.get("format") == "sslbench" and isinstance(obj.get("backbone"), dict):
        return obj
    return None


def sniff_format(path: Path) -> str | None:
    """``"sslbench"`` for a file that says it is an sslbench ``backbone.pt``, else ``None``."""
    return "sslbench" if sslbench_header(path) is not None else None


def source_run(path: Path) -> dict | None:
    """The ``recipe.json`` of the sslbench run that wrote ``path`` (``<run>/checkpoints/<file>``), if any."""
    meta = path.resolve().parent.parent / "recipe.json"
    if path.resolve().parent.name != "checkpoints" or not meta.is_file():
        return None
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("recipe"), dict) else None


def objective_label(path: Path, fmt: str) -> str:
    """The objective chain of the run that wrote the checkpoint, else ``pretrained:<format>``."""
    meta = source_run(path)
    if meta is not None and "evaluated_checkpoint" not in meta:
        names: list[str] = []
        for stage in meta["recipe"].get("stages", []):
            if isinstance(stage, dict) and (not names or names[-1] != stage.get("objective")):
                names.append(str(stage.get("objective")))
        if names:
            return "+".join(names)
    return f"pretrained:{fmt}"


def default_name(path: Path) -> str:
    """``eval-<file stem>``, or ``eval-<run>`` for a run's ``checkpoints/backbone.pt``."""
    stem = path.stem
    if source_run(path) is not None:
        stem = path.resolve().parent.parent.name + ("" if stem == "backbone" else f"-{stem}")
    return "eval-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_")[:100] or "checkpoint")


def plain_evals(evals: list[dict]) -> list[dict]:
    """The evaluations without ``use_ema`` (a checkpoint file holds one set of weights: the EMA of an sslbench run
    is evaluated with ``--format sslbench_ema``); evaluations that become identical are kept once."""
    out: list[dict] = []
    for table in evals:
        table = {**table, "use_ema": False}
        if table not in out:
            out.append(table)
    return out


def _check_dir(run_dir: Path) -> None:
    """Refuse an output folder that holds a training run: its rows would be mixed with the evaluation's."""
    meta = run_dir / "recipe.json"
    if meta.is_file():
        try:
            previous = json.loads(meta.read_text())
        except ValueError:
            previous = {}
        if "evaluated_checkpoint" not in previous:
            raise UserError(f"{run_dir}: holds a training run; choose another --name for the evaluation")


def evaluate_checkpoint(recipe_path: str, checkpoint: str, fmt: str | None = None, name: str | None = None,
                        progress: bool = True, trust_checkpoint: bool = False,
                        overrides: Sequence[str] = ()) -> Path | None:
    """Evaluate ``checkpoint`` with the recipe's evaluations; returns the output folder (``None`` on processes
    other than the main one). Input problems raise :class:`UserError`.

    The recipe's ``backbone.checkpoint_trusted`` is about the recipe's own checkpoint file and is never passed on
    to ``checkpoint``: a file named here may unpickle Python objects only with ``trust_checkpoint``
    (``--trust-checkpoint``), which the resolved recipe records."""
    from sslbench.core.registry import get_registry
    from sslbench.evaluation.suite import evaluate_backbone
    from sslbench.training.context import RunContext
    from sslbench.training.publish import dataset_label, metric_rows, publish_rows
    from sslbench.training.recipe import check_run_name, load_recipe
    from sslbench.training.run_folder import write_meta

    registry = get_registry()
    # The recipe's own checkpoint is replaced, so it need not exist here.
    recipe = load_recipe(recipe_path, registry, check_files=False, overrides=overrides)
    if not recipe.eval:
        raise UserError(f"{recipe_path}: has no [[eval]] section; nothing to evaluate")
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"--checkpoint: file not found: {checkpoint}")
    fmt = fmt or sniff_format(path) or recipe.backbone.checkpoint_format
    registry.get("checkpoint_format", fmt)                      # unknown format → one-line error naming the known
    name = check_run_name(name, "--name") if name is not None else default_name(path)

    recipe = recipe.replace(backbone={"checkpoint": str(path), "checkpoint_format": fmt,
                                      "checkpoint_trusted": trust_checkpoint},
                            run={"name": name, "trackers": []}, eval=plain_evals(recipe.as_dict()["eval"]))
    run_dir = Path(recipe.run.output_dir) / name
    _check_dir(run_dir)
    try:   # a wrong format or shape, or data the evaluators cannot use, fails here, before any file
        context = RunContext.build(recipe, registry, training=False)
    except RecipeError as exc:
        if exc.key != "backbone.checkpoint_trusted":
            raise (exc if exc.source else exc.with_source(recipe_path)) from None
        raise UserError(f"--checkpoint: {path} pickles Python objects besides tensors, and loading it would run "
                        "code from the file; if you trust its source, pass --trust-checkpoint (the recipe's "
                        "checkpoint_trusted does not apply to a file named on the command line)") from None
    accelerator, backbone, datasets = context.accelerator, context.backbone, context.datasets
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_meta(run_dir, recipe, evaluated_checkpoint={"path": str(path), "format": fmt,
                                                          "trusted": trust_checkpoint})
    results = evaluate_backbone(recipe, registry, backbone, datasets, accelerator, progress=progress)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    label = str(path) + (" (ema)" if fmt == "sslbench_ema" else "")
    rows = metric_rows(recipe, results, run_id=name, objective=objective_label(path, fmt), stage=EVAL_STAGE,
                       checkpoint=label)
    print(f"{name}: {path} ({fmt}) on {dataset_label(recipe)}")
    publish_rows(run_dir, rows, Path(recipe.run.output_dir), results, datasets["test"].labels)
    return run_dir
