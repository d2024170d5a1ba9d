"""The objective interface: what every training method (first-party or plugin) implements.

An objective is an ``nn.Module`` built from the shared backbone and its validated options. It declares the views it
needs from data, computes ``{"loss", "logs"}`` from the views and a :class:`Batch`, and may act after each optimiser
step (EMA teachers, queues). The whole contract — what the trainer guarantees and what an objective must keep
(randomness only from ``batch.rng``, losses as pure functions, its own views and heads) — is in
``docs/objective-contract.md``.

A minimal objective::

    class MyObjective(Objective):
        name = "my_objective"
        options = {"temperature": Option(0.2, float, "softmax temperature", min=0, min_exclusive=True)}

        def views(self, data):
            return IndependentCrops(2, ...)

        def forward(self, views, batch):
            a = self.backbone(views[0]).tokens[:, 0]
            b = self.backbone(views[1]).tokens[:, 0]
            return {"loss": my_loss(a, b, self.opts["temperature"]), "logs": {}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sslbench.core.errors import RecipeError
from sslbench.core.options import Option
from sslbench.core.rng import KeyedRandom


@dataclass(frozen=True)
class DataInfo:
    """What an objective may know about the training data when it declares its views."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_samples: int


@dataclass(frozen=True)
class Batch:
    """What :meth:`Objective.forward` gets besides the views, for the samples of this process's micro-batch.

    ``index`` (B,): the samples' dataset indices (queue keys, self-exclusion ids). ``rng``: the keyed random streams
    of this optimiser step and these samples — every mask, noise or pick an objective draws must come from it, so
    that 1 or N processes, any gradient accumulation and a resumed run draw the same numbers per sample.
    ``images`` (B, C, H, W) in [0, 1], before the views. ``labels`` are there for diagnostics only (``None``
    when the training data is unlabelled): a self-supervised objective never reads them in its loss.
    """

    index: torch.Tensor
    rng: KeyedRandom
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None


@dataclass(frozen=True)
class StageContext:
    """Where in training the objective is: for schedules (EMA momentum, queue top-k) and distributed gathers."""

    stage_index: int
    steps_per_epoch: int
    total_steps: int
    num_processes: int
    process_index: int
    seed: int


class Objective(nn.Module):
    """Base class of training objectives. Subclasses set ``name``, ``options`` and implement ``views``/``forward``.

    ``fixed_options`` names options that shape modules (head widths, blocks): when two consecutive stages use the
    same objective, the objective and its state (heads, queues, teachers) carry over and only the other options
    may change.

    ``needs_teacher = True`` declares that the objective learns from a frozen pre-trained network, which the
    recipe names in ``[stages.teacher]`` (a recipe without one is refused, and so is a teacher for an objective
    that does not declare this). The trainer then builds it and passes it as ``teacher=`` — a
    :class:`sslbench.core.teacher.FrozenTeacher`, available as ``self.teacher``: frozen, in eval mode, run without
    gradient, outside the optimiser and the checkpoints.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    fixed_options: ClassVar[tuple[str, ...]] = ()
    needs_teacher: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module, opts: dict[str, Any], context: StageContext,
                 teacher: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.opts = dict(opts)
        self.context = context
        if self.needs_teacher:
            if teacher is None:
                raise RecipeError(f"stages[{context.stage_index}].teacher",
                                  f"objective {self.name!r} learns from a frozen teacher; none was given")
            self.teacher = teacher
        elif teacher is not None:
            raise RecipeError(f"stages[{context.stage_index}].teacher", f"objective {self.name!r} takes no teacher")

    # --- what the objective needs -------------------------------------------------------------------------
    def views(self, data: DataInfo):
        """The view pipeline: a callable ``(images_float, rng) -> list[Tensor]`` from ``sslbench.data.views``."""
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], batch: Batch) -> dict[str, Any]:
        """Return ``{"loss": scalar tensor, "logs": {name: float or 0-d tensor}}``."""
        raise NotImplementedError

    # --- hooks the trainer calls --------------------------------------------------------------------------
    def after_step(self, step: int) -> None:
        """Called after every optimiser step with the stage-local step (EMA updates, schedules)."""

    def start_stage(self, opts: dict[str, Any], context: StageContext) -> None:
        """A following stage reuses this objective: take its options, refusing changes to ``fixed_options``."""
        for key in self.fixed_options:
            if opts.get(key) != self.opts.get(key):
                raise self.option_error(key, f"cannot change from {self.opts.get(key)!r} to {opts.get(key)!r} while "
                                             f"the {self.name!r} objective carries over from the previous stage (it "
                                             "shapes its modules)", context)
        self.opts = dict(opts)
        self.context = context

    def option_error(self, option: str, message: str, context: StageContext | None = None) -> RecipeError:
        """The error for a bad value of one of this objective's options, naming its recipe key
        (``stages[i].options.<option>``); raise it."""
        stage = (context or self.context).stage_index
        return RecipeError(f"stages[{stage}].options.{option}", message)

    def no_weight_decay(self) -> set[str]:
        """Extra parameter names (of this module) that get no weight decay, beyond biases, norms and tokens."""
        return set()
