"""The typed recipe: a frozen tree of dataclasses that validation builds once, with its hashes cached.

Code reads attributes (``recipe.run.seed``, ``stage.optimizer.lr``), never string keys. The fields mirror the
declared schemas of :mod:`sslbench.training.recipe` one to one (a test keeps them equal). Tables that plugins declare
— a stage's objective ``options``, an evaluator's options, a data source's options — stay read-only mappings, since
their keys belong to the plugin.

:meth:`Recipe.as_dict` gives back the canonical resolved form (plain dicts and lists), which is what is hashed,
written to ``recipe.toml``/``recipe.json`` and compared on resume; so the recipe and protocol hashes are exactly
those of the untyped recipe that came before, and committed results stay comparable. A changed recipe is a new
one: :meth:`Recipe.replace` builds it (and its hashes) from the canonical form.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

# Keys that do not change what is computed, left out of the recipe hash.
COSMETIC = {"run": ("output_dir", "checkpoint_every", "log_every", "trackers"),
            "backbone": ("checkpoint_trusted", "checkpoint_url")}
# The same keys of a stage's ``teacher`` table (``stages[i].teacher``) are cosmetic too. Its file's content is not:
# ``checkpoint_sha256`` is filled in from the file and hashed, so a changed teacher file is another recipe.
TEACHER_COSMETIC = ("checkpoint_trusted", "checkpoint_url")
# Whole sections left out of the recipe hash: ``[monitor]`` only watches training (tests/test_monitor.py proves that a
# monitored run trains bit-identically), and recipes written before it existed keep their hashes.
COSMETIC_SECTIONS = ("monitor",)
# Keys hashed only when ``run.compile`` is on: a compiled run is not bit-identical to an eager one (fused kernels round
# differently), so it is another recipe; off, they are left out, and every recipe written before they existed keeps
# its hash.
COMPILE_KEYS = ("compile", "compile_mode")


def drop_compile_off(run: dict) -> dict:
    """``run`` without :data:`COMPILE_KEYS` when compile is off (in place; returned)."""
    if isinstance(run, dict) and not run.get("compile"):
        for key in COMPILE_KEYS:
            run.pop(key, None)
    return run


def canonical_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _readonly(table: Mapping | None) -> Mapping | None:
    return None if table is None else MappingProxyType(copy.deepcopy(dict(table)))


def _teacher(table: Mapping | None) -> "TeacherSpec | None":
    if not table:
        return None
    return TeacherSpec(**{**table, "model_args": _readonly(table.get("model_args") or {})})


def _plain(value: Any) -> Any:
    """Back to plain, JSON-able containers: dataclasses and mappings to dicts, tuples to lists."""
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value) if not f.name.startswith("_")}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class RunSpec:
    name: str
    seed: int
    output_dir: str
    checkpoint_every: int
    log_every: int
    trackers: tuple[str, ...]
    mixed_precision: str
    cpu: bool
    evaluate: str
    # defaults: a resolved recipe written before these existed (an old recipe.json) still builds
    compile: bool = False
    compile_mode: str = "default"


@dataclass(frozen=True)
class BackboneSpec:
    model: str
    img_size: int | None
    patch_size: int | None
    in_chans: int | None
    embed_dim: int | None
    depth: int | None
    num_heads: int | None
    pos_embed: str
    checkpoint: str | None
    checkpoint_format: str
    checkpoint_trusted: bool
    checkpoint_url: str | None = None
    #: extra keyword arguments of timm's constructor (BEiT's relative position bias, layer scale, ...)
    model_args: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class TeacherSpec:
    """``[stages.teacher]``: a frozen network the stage's objective learns from (MimCo's contrastive teacher). The
    architecture keys are ``[backbone]``'s (``img_size`` and ``in_chans`` default to the student's); the weights are
    required, and ``checkpoint_sha256`` is the file's content hash (filled in when the recipe is resolved)."""

    model: str
    img_size: int | None
    patch_size: int | None
    in_chans: int | None
    embed_dim: int | None
    depth: int | None
    num_heads: int | None
    pos_embed: str
    checkpoint: str
    checkpoint_format: str
    checkpoint_trusted: bool
    checkpoint_url: str | None
    checkpoint_sha256: str | None
    model_args: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class DataSpec:
    train: Mapping[str, Any]
    test: Mapping[str, Any]
    eval_train: Mapping[str, Any] | None
    image_size: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    eval_batch_size: int


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    lr: float
    betas: tuple[float, float]
    eps: float
    momentum: float
    weight_decay: float
    head_weight_decay: float | None
    scale_lr_by_batch: bool


@dataclass(frozen=True)
class ScheduleSpec:
    kind: str
    warmup_epochs: float
    warmup_fraction: float | None
    final_lr: float


@dataclass(frozen=True)
class StageSpec:
    name: str
    objective: str
    epochs: float | None
    steps: int | None
    batch_size: int
    grad_accum: int
    freeze: tuple[str, ...]
    layer_decay: float
    ema_momentum: float
    clip_grad: float
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    options: Mapping[str, Any]
    # default: a resolved recipe written before teachers existed (an old recipe.json) still builds
    teacher: TeacherSpec | None = None


@dataclass(frozen=True)
class EvalSpec:
    """One ``[[eval]]`` table: the evaluator ``name``, whether it scores the EMA, and the evaluator's own options."""

    name: str
    use_ema: bool
    options: Mapping[str, Any]


@dataclass(frozen=True)
class MonitorSpec:
    """``[monitor]``: the online k-NN on a fixed held-out subset (:mod:`sslbench.training.monitor`). The defaults
    equal the schema's (``MONITOR`` in :mod:`sslbench.training.recipe`; a test keeps them equal), so a recipe dict
    written before the section existed (an old ``recipe.json``) still builds."""

    every_epochs: float = 0.0
    every_steps: int = 0
    at_start: bool = True
    train_samples: int = 5000
    test_samples: int = 1000
    k: int = 20
    temperature: float = 0.07
    standardize: bool = False
    use_ema: bool = False
    block: int = -1
    token: str = "cls"
    norm: str = "normed"

    @property
    def enabled(self) -> bool:
        return self.every_epochs > 0 or self.every_steps > 0


def _tuple(value):
    return None if value is None else tuple(value)


@dataclass(frozen=True)
class Recipe:
    """A validated, resolved recipe (build it with :func:`sslbench.training.recipe.resolve`)."""

    run: RunSpec
    backbone: BackboneSpec
    data: DataSpec
    stages: tuple[StageSpec, ...]
    eval: tuple[EvalSpec, ...]
    monitor: MonitorSpec = field(default_factory=MonitorSpec)
    recipe_hash: str = field(default="", compare=False)
    protocol_hash: str = field(default="", compare=False)
    #: the command-line overrides (``KEY=VALUE``) it was resolved with; their effect is in the sections above
    overrides: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_dict(cls, resolved: Mapping[str, Any]) -> "Recipe":
        """The typed form of a resolved recipe dict (every key present, as validation leaves it)."""
        run, backbone, data = resolved["run"], resolved["backbone"], resolved["data"]
        stages = tuple(StageSpec(**{**s, "freeze": tuple(s["freeze"]),
                                    "optimizer": OptimizerSpec(**{**s["optimizer"],
                                                                  "betas": tuple(s["optimizer"]["betas"])}),
                                    "schedule": ScheduleSpec(**s["schedule"]), "options": _readonly(s["options"]),
                                    "teacher": _teacher(s.get("teacher"))})
                       for s in resolved["stages"])
        evals = tuple(EvalSpec(e["name"], e["use_ema"],
                               _readonly({k: v for k, v in e.items() if k not in ("name", "use_ema")}))
                      for e in resolved["eval"])
        recipe = cls(RunSpec(**{**run, "trackers": tuple(run["trackers"])}),
                     BackboneSpec(**{**backbone, "model_args": _readonly(backbone.get("model_args") or {})}),
                     DataSpec(**{**data, "train": _readonly(data["train"]), "test": _readonly(data["test"]),
                                 "eval_train": _readonly(data["eval_train"]), "mean": _tuple(data["mean"]),
                                 "std": _tuple(data["std"])}),
                     stages, evals, MonitorSpec(**(resolved.get("monitor") or {})))
        canonical = recipe.as_dict()
        object.__setattr__(recipe, "recipe_hash", recipe_hash(canonical))
        object.__setattr__(recipe, "protocol_hash", protocol_hash(canonical))
        return recipe

    def as_dict(self) -> dict[str, Any]:
        """The canonical resolved form: plain dicts and lists, an ``[[eval]]`` table flat as in the file."""
        out = {name: _plain(getattr(self, name)) for name in ("run", "backbone", "data", "stages")}
        for stage in out["stages"]:       # no teacher, no key: recipes written before teachers keep their form
            if stage.get("teacher") is None:
                stage.pop("teacher", None)
        out["eval"] = [{"name": e.name, "use_ema": e.use_ema, **_plain(e.options)} for e in self.eval]
        out["monitor"] = _plain(self.monitor)
        return out

    def replace(self, **sections: Mapping[str, Any]) -> "Recipe":
        """A new recipe with some keys changed, e.g. ``recipe.replace(run={"seed": 1})`` or
        ``replace(eval=[...])``; each section given is merged into the canonical form, and the hashes follow."""
        resolved = self.as_dict()
        for name, changes in sections.items():
            if isinstance(changes, Mapping):
                resolved[name] = {**resolved[name], **copy.deepcopy(dict(changes))}
            else:
                resolved[name] = _plain(changes)
        return Recipe.from_dict(resolved).with_overrides(self.overrides)

    def with_overrides(self, overrides: tuple[str, ...]) -> "Recipe":
        """The same recipe, recording the command-line overrides it came from (not hashed: their effect is)."""
        recipe = copy.copy(self)
        object.__setattr__(recipe, "overrides", tuple(overrides))
        return recipe

    def objective_chain(self) -> str:
        """The stages' objectives, consecutive repeats once: ``"mae_ct"``, ``"mae+mim_refiner"``."""
        names: list[str] = []
        for stage in self.stages:
            if not names or names[-1] != stage.objective:
                names.append(stage.objective)
        return "+".join(names)


def hashed_form(recipe: Mapping[str, Any] | Recipe) -> dict:
    """The recipe without its cosmetic keys (output folder, logging cadence, trust) and sections (``[monitor]``):
    what the recipe hash covers."""
    stripped = copy.deepcopy(recipe.as_dict() if isinstance(recipe, Recipe) else _plain(recipe))
    for section in COSMETIC_SECTIONS:
        stripped.pop(section, None)
    for section, keys in COSMETIC.items():
        for key in keys:
            stripped.get(section, {}).pop(key, None)
    for stage in stripped.get("stages", []):
        if not stage.get("teacher"):
            stage.pop("teacher", None)
            continue
        for key in TEACHER_COSMETIC:
            stage["teacher"].pop(key, None)
        if not stage["teacher"].get("model_args", True):
            stage["teacher"].pop("model_args")
    drop_compile_off(stripped.get("run", {}))
    # no model_args: hashed as before the key existed, so earlier recipes keep their hashes
    if not stripped.get("backbone", {}).get("model_args", True):
        stripped["backbone"].pop("model_args")
    return stripped


def recipe_hash(recipe: Mapping[str, Any] | Recipe) -> str:
    """Identifies what a run computes: everything except cosmetic keys (output folder, logging cadence)."""
    if isinstance(recipe, Recipe) and recipe.recipe_hash:
        return recipe.recipe_hash
    return canonical_hash(hashed_form(recipe))


def protocol_hash(recipe: Mapping[str, Any] | Recipe) -> str:
    """Identifies the evaluation protocol: evaluation data, preprocessing and evaluators with their options."""
    if isinstance(recipe, Recipe):
        if recipe.protocol_hash:
            return recipe.protocol_hash
        recipe = recipe.as_dict()
    data = recipe["data"]
    protocol = {
        "eval_train": data["eval_train"] or data["train"],
        "test": data["test"],
        "image_size": data["image_size"] or recipe["backbone"]["img_size"],
        "mean": data["mean"], "std": data["std"],
        "eval": [{k: v for k, v in e.items() if k != "use_ema"} for e in recipe["eval"]],
    }
    return canonical_hash(protocol)
