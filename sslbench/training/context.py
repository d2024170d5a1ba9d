"""The run context: what a recipe names, built once and in one place for ``run``, ``eval``, ``check`` and
``--dry-run`` — the accelerator, the backbone with its checkpoint, the evaluators (checked against the backbone),
the data (real, synthetic, or none), and the objective of each stage, carried from stage to stage. ``sslbench
check``, for instance, builds the model on the meta device without data or accelerator::

    with torch.device("meta"):
        context = RunContext.build(recipe, registry, data="none", load_weights=False, accelerator=False)
        for index, objective, carried in context.stage_objectives():
            ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from sslbench.core.objective import DataInfo, StageContext
from sslbench.evaluation.suite import build_evaluators, preflight_evaluators
from sslbench.training.assembly import build_model, check_sources, data_info, load_datasets, make_accelerator
from sslbench.training.spec import Recipe
from sslbench.training.trainer import stage_length


def build_objective(registry, recipe: Recipe, backbone, index: int, previous, context: StageContext,
                    device: Any = None, teacher_weights: bool | str = True):
    """The objective of stage ``index``: ``previous`` carried over (heads, queues, teachers; ``start_stage`` takes
    the new options) when the stage names the same objective, else a new one. A new one is initialised from a
    seed of its own (``seed·1000 + index + 1``), so a resumed run builds exactly the same heads. A stage with a
    ``[stages.teacher]`` gets its frozen teacher built (and loaded, per ``teacher_weights``: see
    :func:`sslbench.training.teacher.build_teacher`) and passed as ``teacher=``. Returns ``(objective, carried)``."""
    stage = recipe.stages[index]
    if previous is not None and previous.name == stage.objective:
        previous.start_stage(dict(stage.options), context)
        return previous, True
    factory = registry.get("objective", stage.objective).factory
    extra = {}
    if stage.teacher is not None:
        from sslbench.training.teacher import build_teacher

        extra["teacher"] = build_teacher(stage.teacher, backbone, registry, f"stages[{index}].teacher",
                                         teacher_weights)
    torch.manual_seed(recipe.run.seed * 1000 + index + 1)
    objective = factory(backbone, dict(stage.options), context, **extra)
    return (objective.to(device) if device is not None else objective), False


@dataclass
class RunContext:
    """Everything a recipe names, built once. ``datasets`` is empty and ``data`` ``None`` without data;
    ``accelerator`` is ``None`` when not asked for (``check``)."""

    recipe: Recipe
    registry: Any
    backbone: Any
    load_report: Any = None
    accelerator: Any = None
    evaluators: list = field(default_factory=list)
    datasets: dict = field(default_factory=dict)
    data: DataInfo | None = None
    real_data: bool = False
    #: how stage teachers get their weights: True (load; the file must be there), "present" (if it is), False
    teacher_weights: bool | str = True

    @classmethod
    def build(cls, recipe: Recipe, registry, *, data: str = "load", load_weights: bool = True,
              accelerator: bool = True, synthetic=None, training: bool = True,
              teacher_weights: bool | str | None = None) -> "RunContext":
        """``data``: ``"load"`` (the recipe's sources; evaluators checked against them), ``"synthetic"``
        (``synthetic(recipe, backbone)`` builds the training set) or ``"none"``. ``training=False`` (``eval``)
        skips checking the stages against the data. ``teacher_weights`` (default: ``load_weights``) says how
        stage teachers are loaded (``"present"``: only files on this machine, as ``--dry-run`` does)."""
        if data == "load":   # a missing folder or an unreachable hub dataset fails before the model is built
            check_sources(recipe, registry)
        acc = make_accelerator(recipe) if accelerator else None
        backbone, report = build_model(recipe, registry, load_weights=load_weights)
        context = cls(recipe, registry, backbone, report, acc,
                      build_evaluators(registry, recipe.eval, backbone.depth),
                      teacher_weights=load_weights if teacher_weights is None else teacher_weights)
        if data == "load":
            context.datasets, context.real_data = load_datasets(recipe, registry, acc), True
            preflight_evaluators(recipe.eval, context.evaluators, context.datasets)
            for index, stage in enumerate(recipe.stages if training else ()):   # impossible batch sizes
                stage_length(stage, len(context.datasets["train"]), f"stages[{index}]")
            if training:
                from sslbench.training.monitor import preflight_monitor

                preflight_monitor(recipe, context.datasets, backbone.depth)
        elif data == "synthetic":
            context.datasets = {"train": synthetic(recipe, backbone)}
        if context.datasets:
            context.data = data_info(recipe, context.datasets["train"], backbone)
        return context

    def stage_context(self, index: int) -> StageContext:
        """Where stage ``index`` stands: its length in steps (1 without the recipe's data), the processes, the seed."""
        stage = self.recipe.stages[index]
        steps_per_epoch, total = (stage_length(stage, len(self.datasets["train"]), f"stages[{index}]")
                                  if self.real_data else (1, 1))
        acc = self.accelerator
        return StageContext(stage_index=index, steps_per_epoch=steps_per_epoch, total_steps=total,
                            num_processes=acc.num_processes if acc else 1,
                            process_index=acc.process_index if acc else 0, seed=self.recipe.run.seed)

    def objective(self, index: int, previous=None):
        """:func:`build_objective` for stage ``index`` on this context's backbone and device."""
        device = self.accelerator.device if self.accelerator is not None else None
        return build_objective(self.registry, self.recipe, self.backbone, index, previous, self.stage_context(index),
                               device, self.teacher_weights)

    def stage_objectives(self) -> Iterator[tuple[int, Any, bool]]:
        """``(index, objective, carried)`` for every stage, carrying objectives over as a run does."""
        objective = None
        for index in range(len(self.recipe.stages)):
            objective, carried = self.objective(index, objective)
            yield index, objective, carried
