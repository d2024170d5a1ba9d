"""TOML recipes → validated, resolved recipes with a canonical hash.

A recipe is the whole experiment: ``[run]``, ``[backbone]``, ``[data]``, one or more ``[[stages]]`` and the
``[[eval]]`` list. Every key is checked against a declared schema (``sslbench.core.options.Option``); objectives,
evaluators and data sources bring their own option schemas through the plugin registry. Problems raise
:class:`RecipeError` naming the key path (``stages[1].optimizer.lr``) and what is allowed.

A stage inherits every key it leaves out from the stage before it (its options too, when the objective is the
same), so a two-stage refinement recipe only writes what changes. The resolved recipe has everything filled in;
``recipe_hash`` identifies the run and ``protocol_hash`` the evaluation protocol (data, preprocessing, evaluators) —
leaderboard rows are comparable only when their protocol hashes match.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Sequence

from sslbench.core.errors import RecipeError, UserError
from sslbench.core.evaluator import FEATURE_OPTIONS
from sslbench.core.options import Option, validate_options
from sslbench.training.recipe_toml import load_toml, to_toml
from sslbench.training.spec import COSMETIC, COSMETIC_SECTIONS, Recipe, canonical_hash, hashed_form, protocol_hash, recipe_hash

# The hashes live with the typed recipe; they are part of this module's API too.
__all__ = ["resolve", "load_recipe", "load_toml", "to_toml", "check_run_name", "Recipe", "COSMETIC",
           "COSMETIC_SECTIONS", "canonical_hash",
           "hashed_form", "recipe_hash", "protocol_hash"]

RUN = {
    "name": Option(None, str, "run name: one folder name (letters, digits, _ . + = -); the run folder is "
                   "<output_dir>/<name>", required=True),
    "seed": Option(0, int, "seed of data order, augmentations, masks and initialisation", min=0),
    "output_dir": Option("runs", str, "folder that holds the run folders and their leaderboard (runs/ is "
                         "git-ignored; the committed reference results are in results/)"),
    "checkpoint_every": Option(0, int, "save a resumable checkpoint every N optimiser steps (0: stage ends only)",
                               min=0),
    "log_every": Option(10, int, "write a metrics-log line every N steps", min=1),
    "trackers": Option([], list, "Accelerate trackers to log to", item_type=str),
    "mixed_precision": Option("auto", str, "auto: bf16 on GPU, fp32 on CPU (bf16 is slow on CPUs without it)",
                              choices=("auto", "no", "bf16", "fp16")),
    "cpu": Option(False, bool, "force the CPU even when a GPU is present"),
    "evaluate": Option("end", str, "when to run the evaluations", choices=("end", "each_stage", "never")),
    "compile": Option(False, bool, "torch.compile the transformer blocks and MLP heads while training (docs/runs.md); "
                      "not bit-identical to eager, so part of the recipe hash when on"),
    "compile_mode": Option("default", str, "torch.compile mode when run.compile is on",
                           choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")),
}
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")

BACKBONE = {
    "model": Option(None, str, "timm VisionTransformer name, e.g. vit_large_patch16_224", required=True),
    "img_size": Option(None, int, "input resolution (default: the model's)", min=8, nullable=True),
    "patch_size": Option(None, int, "patch size (default: the model's)", min=1, nullable=True),
    "in_chans": Option(None, int, "input channels (default: the model's)", min=1, nullable=True),
    "embed_dim": Option(None, int, "width (default: the model's)", min=8, nullable=True),
    "depth": Option(None, int, "number of blocks (default: the model's)", min=1, nullable=True),
    "num_heads": Option(None, int, "attention heads (default: the model's)", min=1, nullable=True),
    "pos_embed": Option("learned", str, "position embedding (MAE and MiCL use fixed 2-D sin-cos)",
                        choices=("learned", "sincos")),
    "checkpoint": Option(None, str, "weights to start from (path)", nullable=True),
    "checkpoint_format": Option("timm", str, "format of the checkpoint (see `sslbench list`)"),
    "checkpoint_trusted": Option(False, bool, "load backbone.checkpoint even though it pickles Python objects "
                                              "besides tensors (fairseq's data2vec 2.0 files); unpickling runs "
                                              "code from the file: only for a file from a trusted source. Applies "
                                              "to this file only, never to one given on the command line"),
    "checkpoint_url": Option(None, str, "where to get backbone.checkpoint (a URL); said when the file is missing",
                             nullable=True),
    "model_args": Option({}, dict, "further arguments of timm's model constructor, e.g. a BEiT's "
                         "{ use_shared_rel_pos_bias = true, use_rel_pos_bias = false, use_abs_pos_emb = false, "
                         "init_values = 1e-5 } (docs/recipes.md)"),
}

# ``[stages.teacher]``: the architecture keys of [backbone] (so any backbone a recipe can build can teach) and the
# weights, which a teacher must have. Built by :mod:`sslbench.training.teacher`.
TEACHER = {
    **{k: v for k, v in BACKBONE.items() if k not in ("img_size", "in_chans", "checkpoint", "checkpoint_trusted",
                                                       "checkpoint_url")},
    "img_size": Option(None, int, "input resolution (default: the student's, backbone.img_size: the teacher sees "
                                  "the student's views)", min=8, nullable=True),
    "in_chans": Option(None, int, "input channels (default: the student's)", min=1, nullable=True),
    "checkpoint": Option(None, str, "the teacher's weights (path): any checkpoint format, e.g. an earlier run's "
                                    "checkpoints/backbone.pt as format sslbench or sslbench_ema", required=True),
    "checkpoint_trusted": Option(False, bool, "load teacher.checkpoint even though it pickles Python objects besides "
                                              "tensors; only for a file from a trusted source"),
    "checkpoint_url": Option(None, str, "where to get teacher.checkpoint (a URL); said when the file is missing",
                             nullable=True),
    "checkpoint_sha256": Option(None, str, "sha256 of the teacher's file, filled in from the file when the recipe "
                                           "is resolved and part of the recipe hash (a changed file is another "
                                           "recipe); give it to pin the file", nullable=True),
}
# keep [backbone]'s order of keys, then the hash, then model_args (optional in TeacherSpec, hence last)
TEACHER = {k: TEACHER[k] for k in [*(k for k in BACKBONE if k != "model_args"), "checkpoint_sha256", "model_args"]}

DATA = {
    "train": Option(None, dict, "training data: { source = ..., <source options> }", required=True),
    "test": Option(None, dict, "evaluation queries: { source = ..., <source options> }", required=True),
    "eval_train": Option(None, dict, "evaluation memory/training set (default: train)", nullable=True),
    "image_size": Option(None, int, "size of training views and evaluation images (default: backbone img_size)",
                         min=8, nullable=True),
    "mean": Option(None, list, "normalisation mean per channel (default: ImageNet's, or 0.5 for 1 channel)",
                   item_type=float, nullable=True),
    "std": Option(None, list, "normalisation std per channel", item_type=float, nullable=True),
    "eval_batch_size": Option(256, int, "batch size of feature extraction", min=1),
}

STAGE = {
    "name": Option(None, str, "stage name (default: stage<i>)", nullable=True),
    "objective": Option(None, str, "training objective (see `sslbench list`)", required=True),
    "epochs": Option(None, float, "length in epochs (or give steps)", min=0, nullable=True),
    "steps": Option(None, int, "length in optimiser steps (overrides epochs)", min=1, nullable=True),
    "batch_size": Option(256, int, "global batch size (all processes, all accumulation steps)", min=1),
    "grad_accum": Option(1, int, "gradient accumulation steps", min=1),
    "freeze": Option([], list, "frozen parts: backbone, stem, heads, blocks[:K], blocks[:P%], or name globs",
                     item_type=str),
    "layer_decay": Option(1.0, float, "layer-wise LR decay (block k: decay^(depth-k), stem: decay^(depth+1))",
                          min=0, max=1, min_exclusive=True),
    "ema_momentum": Option(0.0, float, "EMA of the backbone (0: off); evaluated when eval uses it", min=0, max=1),
    "clip_grad": Option(0.0, float, "gradient-norm clipping (0: off)", min=0),
    "optimizer": Option({}, dict, "optimizer table"),
    "schedule": Option({}, dict, "learning-rate schedule table"),
    "options": Option({}, dict, "the objective's own options"),
    "teacher": Option(None, dict, "a frozen teacher network for the objective ([stages.teacher]: the [backbone] "
                                  "keys and its checkpoint); only for objectives that learn from one (mimco)",
                      nullable=True),
}

OPTIMIZER = {
    "name": Option("adamw", str, "optimizer", choices=("adamw", "sgd")),
    "lr": Option(None, float, "base learning rate", min=0, min_exclusive=True, required=True),
    "betas": Option([0.9, 0.999], list, "AdamW betas", item_type=float, min=0, max=1),
    "eps": Option(1e-8, float, "AdamW epsilon", min=0, min_exclusive=True),
    "momentum": Option(0.9, float, "SGD momentum", min=0, max=1),
    "weight_decay": Option(0.05, float, "weight decay of the backbone's weights", min=0),
    "head_weight_decay": Option(None, float, "weight decay of heads/decoders (default: weight_decay)", min=0,
                                nullable=True),
    "scale_lr_by_batch": Option(False, bool, "multiply lr (and final_lr) by batch_size/256"),
}

SCHEDULE = {
    "kind": Option("cosine", str, "decay after warmup", choices=("cosine", "constant", "linear")),
    "warmup_epochs": Option(0.0, float, "linear warmup length in epochs", min=0),
    "warmup_fraction": Option(None, float, "linear warmup as a fraction of the stage (overrides warmup_epochs)",
                              min=0, max=1, nullable=True),
    "final_lr": Option(0.0, float, "learning rate at the end of a cosine/linear decay", min=0),
}

EVAL_COMMON = {
    "name": Option(None, str, "evaluator (see `sslbench list`)", required=True),
    "use_ema": Option(False, bool, "evaluate the EMA of the backbone (needs ema_momentum > 0 in the last stage)"),
}

MONITOR = {
    "every_epochs": Option(0.0, float, "online k-NN every N epochs of a stage (0: off; fractions allowed)", min=0),
    "every_steps": Option(0, int, "online k-NN every N optimiser steps of a stage (0: off; instead of every_epochs)",
                          min=0),
    "at_start": Option(True, bool, "also before the first training step, so the curve has a start"),
    "train_samples": Option(5000, int, "memory: images drawn once (fixed, whatever the seed) from data.eval_train "
                                       "(0: all of them)", min=0),
    "test_samples": Option(1000, int, "queries: images drawn once (fixed) from data.test (0: all of them)", min=0),
    "k": Option(20, int, "neighbours", min=1),
    "temperature": Option(0.07, float, "vote weight exp(sim/τ)", min=0, min_exclusive=True),
    "standardize": Option(False, bool, "standardise each dimension with the memory's mean/std first"),
    "use_ema": Option(False, bool, "monitor the EMA of the backbone in stages that keep one (ema_momentum > 0)"),
    **FEATURE_OPTIONS,
}

SECTIONS = {"run": RUN, "backbone": BACKBONE, "data": DATA, "monitor": MONITOR}
TOP_LEVEL = ("run", "backbone", "data", "monitor", "stages", "eval")


#: A run name is one path component: no separators, no "." or "..", nothing hidden, so a run folder always lies
#: directly inside run.output_dir and ``--force`` can only ever remove that folder.
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,127}")


def check_run_name(name: str, key: str = "run.name") -> str:
    """Return ``name`` if it is a safe run-folder name, else raise :class:`RecipeError` naming ``key``."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise RecipeError(key, f"got {name!r}, expected one folder name of 1-128 letters, digits and _ . + = - "
                               "(not starting with . or -)")
    return name


def missing_checkpoint(path: str, url: str | None, recipe: str | None = None, key: str = "backbone.checkpoint") -> str:
    """What to say when ``backbone.checkpoint`` (or another checkpoint ``key``) is not on this machine: where to get
    it, and how to check or try the rest of the recipe without it."""
    get = (f"download it from {url} to that path (relative to the folder you launch from)" if url else
           f"set {key} to the weights file" + (", or remove it to train from scratch"
                                               if key == "backbone.checkpoint" else ""))
    recipe = recipe or "RECIPE"
    return (f"file not found: {path} (from {Path.cwd()}); {get}. Without the file, `sslbench check {recipe} "
            f"--allow-missing-files` validates the rest and `sslbench run {recipe} --dry-run` takes one step on "
            "random weights")


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _plugin(registry, kind: str, name: str, key: str):
    if name not in registry.entries[kind]:
        known = ", ".join(registry.names(kind)) or "(none registered)"
        raise RecipeError(key, f"unknown {kind.replace('_', ' ')} {name!r}; registered: {known}")
    return registry.entries[kind][name].factory


def _resolve_source(registry, table: dict, key: str) -> dict:
    table = dict(table)
    if "source" not in table:
        raise RecipeError(f"{key}.source", f"missing; expected one of {', '.join(registry.names('dataset'))}")
    source = table.pop("source")
    if not isinstance(source, str):
        raise RecipeError(f"{key}.source", f"got {source!r}, expected a string")
    data_source = _plugin(registry, "dataset", source, f"{key}.source")
    return {"source": source, **validate_options(data_source.options, table, key)}


def _resolve_teacher(registry, objective, table: dict | None, key: str, check_files: bool,
                     source: str | None) -> dict | None:
    """A stage's teacher table validated, with ``checkpoint_sha256`` filled in from the file when it is here
    (a missing file is an error unless ``check_files`` is off: ``check --allow-missing-files``, ``--dry-run``)."""
    from sslbench.training.teacher import file_sha256

    needs = getattr(objective, "needs_teacher", False)
    if table is None:
        if needs:
            raise RecipeError(key, f"objective {objective.name!r} learns from a frozen teacher: add a "
                                   "[stages.teacher] table with its model, checkpoint and checkpoint_format")
        return None
    if not needs:
        raise RecipeError(key, f"objective {objective.name!r} takes no teacher; remove the [stages.teacher] table")
    teacher = validate_options(TEACHER, table, key)
    _plugin(registry, "checkpoint_format", teacher["checkpoint_format"], f"{key}.checkpoint_format")
    path = Path(teacher["checkpoint"])
    if path.is_file():
        digest = file_sha256(path)
        pinned = teacher["checkpoint_sha256"]
        if pinned is not None and pinned.lower() != digest:
            raise RecipeError(f"{key}.checkpoint_sha256", f"{path} has sha256 {digest}, the recipe pins {pinned}: "
                                                          "the teacher file changed; restore it or update the pin")
        teacher["checkpoint_sha256"] = digest
    elif check_files:
        message = missing_checkpoint(str(path), teacher["checkpoint_url"], source, f"{key}.checkpoint")
        if teacher["checkpoint_format"] in ("sslbench", "sslbench_ema"):
            message = message.replace("; set ", "; an sslbench run writes its checkpoints/backbone.pt when it ends: "
                                                "run the teacher's recipe first, or set ", 1)
        raise RecipeError(f"{key}.checkpoint", message)
    return teacher


def _resolve_stages(registry, stages: Any, check_files: bool = True, source: str | None = None) -> list[dict]:
    if not isinstance(stages, list) or not stages:
        raise RecipeError("stages", "expected at least one [[stages]] table")
    resolved, previous = [], None
    for i, raw in enumerate(stages):
        key = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise RecipeError(key, "expected a table")
        if previous is not None:
            inherited = {k: v for k, v in previous.items() if k not in ("name", "options", "teacher")}
            if raw.get("objective", previous["objective"]) == previous["objective"]:
                inherited["options"] = previous["options"]
                if "teacher" not in raw:          # a table given is taken whole, never merged with the last one
                    inherited["teacher"] = previous["teacher"]
            raw = _merge(inherited, raw)
        stage = validate_options(STAGE, raw, key)
        stage["name"] = stage["name"] or f"stage{i}"
        if stage["steps"] is None and not stage["epochs"]:
            raise RecipeError(f"{key}.epochs", "give the stage's length as epochs > 0 or steps >= 1")
        stage["optimizer"] = validate_options(OPTIMIZER, stage["optimizer"], f"{key}.optimizer")
        if len(stage["optimizer"]["betas"]) != 2:
            raise RecipeError(f"{key}.optimizer.betas", "expected a list of two numbers in [0, 1]")
        stage["schedule"] = validate_options(SCHEDULE, stage["schedule"], f"{key}.schedule")
        objective = _plugin(registry, "objective", stage["objective"], f"{key}.objective")
        stage["options"] = validate_options(objective.options, stage["options"], f"{key}.options")
        stage["teacher"] = _resolve_teacher(registry, objective, stage["teacher"], f"{key}.teacher", check_files,
                                            source)
        if (previous is not None and previous["objective"] == stage["objective"]
                and previous["teacher"] != stage["teacher"]):
            raise RecipeError(f"{key}.teacher", f"cannot change while the {stage['objective']!r} objective carries "
                                                "over from the previous stage (its heads are fitted to the teacher)")
        if stage["batch_size"] % stage["grad_accum"]:
            raise RecipeError(f"{key}.grad_accum", f"must divide batch_size {stage['batch_size']}")
        resolved.append(stage)
        previous = stage
    return resolved


def _resolve_evals(registry, evals: Any) -> list[dict]:
    if evals is None:
        return []
    if not isinstance(evals, list):
        raise RecipeError("eval", "expected a list of [[eval]] tables")
    out = []
    for i, raw in enumerate(evals):
        key = f"eval[{i}]"
        if not isinstance(raw, dict):
            raise RecipeError(key, "expected a table")
        name = raw.get("name")
        if not isinstance(name, str):
            raise RecipeError(f"{key}.name", f"missing; expected one of {', '.join(registry.names('evaluator'))}")
        evaluator = _plugin(registry, "evaluator", name, f"{key}.name")
        schema = {**EVAL_COMMON, **evaluator.options}
        out.append(validate_options(schema, raw, key))
    return out


def resolve(raw: dict, registry, source: str | None = None, check_files: bool = True) -> Recipe:
    """Validate a parsed recipe and fill in every default; returns the typed :class:`Recipe` (hashes cached).
    Raises :class:`RecipeError` naming ``source``."""
    try:
        unknown = sorted(set(raw) - set(TOP_LEVEL))
        if unknown:
            raise RecipeError(unknown[0], f"unknown section; allowed: {', '.join(TOP_LEVEL)}")
        recipe = {name: validate_options(schema, raw.get(name), name) for name, schema in SECTIONS.items()}
        check_run_name(recipe["run"]["name"])
        for i, tracker in enumerate(recipe["run"]["trackers"]):
            if tracker not in TRACKERS:
                raise RecipeError(f"run.trackers[{i}]", f"got {tracker!r}, expected one of {', '.join(TRACKERS)}")
        backbone = recipe["backbone"]
        _plugin(registry, "checkpoint_format", backbone["checkpoint_format"], "backbone.checkpoint_format")
        if check_files and backbone["checkpoint"] and not Path(backbone["checkpoint"]).is_file():
            raise RecipeError("backbone.checkpoint", missing_checkpoint(backbone["checkpoint"],
                                                                        backbone["checkpoint_url"], source))
        data = recipe["data"]
        for split in ("train", "test", "eval_train"):
            if data[split] is not None:
                data[split] = _resolve_source(registry, data[split], f"data.{split}")
        for name in ("mean", "std"):
            if data[name] is not None and backbone["in_chans"] and len(data[name]) != backbone["in_chans"]:
                raise RecipeError(f"data.{name}", f"expected {backbone['in_chans']} values (backbone.in_chans)")
        recipe["stages"] = _resolve_stages(registry, raw.get("stages"), check_files, source)
        recipe["eval"] = _resolve_evals(registry, raw.get("eval"))
        if any(e["use_ema"] for e in recipe["eval"]) and not recipe["stages"][-1]["ema_momentum"]:
            i = next(i for i, e in enumerate(recipe["eval"]) if e["use_ema"])
            raise RecipeError(f"eval[{i}].use_ema", "the last stage keeps no EMA: set its ema_momentum > 0")
        _check_monitor(recipe["monitor"], recipe["stages"])
    except RecipeError as exc:
        raise exc.with_source(source) if source else exc
    return Recipe.from_dict(recipe)


def _check_monitor(monitor: dict, stages: list[dict]) -> None:
    """What ``[monitor]`` can be checked for without data (the data-dependent checks are
    :func:`sslbench.training.monitor.preflight_monitor`)."""
    if monitor["every_epochs"] > 0 and monitor["every_steps"] > 0:
        raise RecipeError("monitor.every_steps", "give every_epochs or every_steps, not both")
    if monitor["train_samples"] and monitor["k"] > monitor["train_samples"]:
        raise RecipeError("monitor.k", f"got {monitor['k']} neighbours, but monitor.train_samples is "
                                       f"{monitor['train_samples']}")
    if monitor["use_ema"] and not any(stage["ema_momentum"] for stage in stages):
        raise RecipeError("monitor.use_ema", "no stage keeps an EMA: set a stage's ema_momentum > 0")


def load_recipe(path: str | os.PathLike, registry=None, check_files: bool = True,
                overrides: Sequence[str] = ()) -> Recipe:
    """Read, validate and resolve a recipe file, with command-line ``overrides`` (``KEY=VALUE``,
    :mod:`sslbench.training.overrides`) applied to its contents first. An error in an overridden key names the
    override along with the file."""
    from sslbench.core.registry import get_registry
    from sslbench.training.overrides import apply_overrides, overrides_touching, parse_override

    registry = registry or get_registry()
    raw = load_toml(path)
    try:
        parsed = [parse_override(text) for text in overrides]
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    try:
        raw = apply_overrides(raw, parsed)
        recipe = resolve(raw, registry, source=str(path), check_files=check_files)
    except RecipeError as exc:
        touching = overrides_touching(exc.key, parsed)
        where = f"{path} with " + " ".join(o.text for o in touching) if touching else str(path)
        raise exc.with_source(where) from None
    return recipe.with_overrides(tuple(o.text for o in parsed)) if parsed else recipe
