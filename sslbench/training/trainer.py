"""The Accelerate trainer: one code path for one process and for many.

A stage trains the objective (backbone + heads) for a number of optimiser steps. Everything random in a step —
data order, augmentations, masks — is a function of (seed, step, sample index) (``sslbench.core.rng``), so a run resumed
from a checkpoint and a run on N processes reproduce the uninterrupted single-process run with the same global batch.

Gradient accumulation is explicit: a global batch is split into ``grad_accum`` micro-batches, each sharded across
processes; gradients are synchronised only on the last one.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sslbench.core.errors import RecipeError, TrainingDiverged
from sslbench.core.modules import EMA
from sslbench.core.objective import Batch
from sslbench.core.progress import progress_bar
from sslbench.core.rng import KeyedRandom
from sslbench.training.compile import compiled, eager
from sslbench.training.optim import StageSchedule, build_optimizer, frozen_names, param_groups
from sslbench.training.spec import Recipe, StageSpec


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    stage: int = 0
    step: int = 0  # optimiser steps done in this stage
    global_step: int = 0  # optimiser steps done in the whole run
    finished: bool = False

    def as_dict(self) -> dict:
        return dict(stage=self.stage, step=self.step, global_step=self.global_step, finished=self.finished)


def stage_length(stage: StageSpec, num_samples: int, key: str = "stages[?]") -> tuple[int, int]:
    """(steps per epoch, total optimiser steps) of a stage; drop_last batching. ``key`` names the stage in errors."""
    steps_per_epoch = num_samples // stage.batch_size
    if steps_per_epoch == 0:
        raise RecipeError(f"{key}.batch_size",
                          f"{stage.batch_size} is larger than the {num_samples} training images")
    total = stage.steps if stage.steps is not None else max(1, round(stage.epochs * steps_per_epoch))
    return steps_per_epoch, total


def step_rng(seed: int, step: int, index: torch.Tensor) -> KeyedRandom:
    return KeyedRandom(seed, step, index)


def is_labelled(dataset) -> bool:
    """Whether every training image has a label. Labels reach the objective (for its diagnostics only) just then:
    an unlabelled dataset stores -1, and a Batch without labels logs no neighbour agreement instead of a NaN at
    every step."""
    labels = getattr(dataset, "labels", None)
    return labels is not None and len(labels) > 0 and bool((labels >= 0).all())


class StageTrainer:
    """Trains one stage. ``save`` is called with (progress, reason) when a checkpoint is due."""

    def __init__(self, accelerator, objective, stage: StageSpec, stage_index: int, recipe: Recipe, dataset, data_info,
                 loader_factory: Callable, log: Callable[[dict], None], monitor=None):
        self.accelerator = accelerator
        self.objective = objective
        self.stage = stage
        self.stage_index = stage_index
        self.recipe = recipe
        self.dataset = dataset
        self.data_info = data_info
        self.labelled = is_labelled(dataset)
        self.loader_factory = loader_factory
        self.log = log
        self.monitor = monitor  # sslbench.training.monitor.Monitor or None
        self.postfix: dict[str, str] = {}
        self.steps_per_epoch, self.total_steps = stage_length(stage, len(dataset), f"stages[{stage_index}]")
        backbone = objective.backbone
        self.frozen = frozen_names(objective, stage.freeze, backbone.depth, f"stages[{stage_index}].freeze")
        groups = param_groups(objective, backbone, stage, self.frozen)
        self.optimizer = build_optimizer(groups, stage, f"stages[{stage_index}]", fused=recipe.run.compile)
        self.schedule = StageSchedule(self.optimizer, stage, self.total_steps, self.steps_per_epoch)
        self.model, self.optimizer = accelerator.prepare(objective, self.optimizer)
        self.views = objective.views(data_info)
        self.ema = EMA(backbone, stage.ema_momentum).eval() if stage.ema_momentum > 0 else None
        self.trainable = [p for p in objective.parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema else None}

    def load_state_dict(self, state: dict) -> None:
        # torch restores each group's settings from the file; the recipe's win (the schedule sets lr every step),
        # so a resume with --allow-optimizer-change really uses the changed weight decay, betas or eps.
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, fresh in zip(self.optimizer.param_groups, settings):
            group.update(fresh)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])

    def run(self, progress: Progress, save: Callable[[Progress, str], None], checkpoint_every: int,
            log_every: int) -> None:
        acc = self.accelerator
        # Each stage walks its own sequence of epochs (seeded by run seed and stage), resumable mid-epoch.
        data_seed = self.recipe.run.seed * 1009 + self.stage_index
        micro_global = self.stage.batch_size // self.stage.grad_accum
        loader = self.loader_factory(self.dataset, micro_global, data_seed, progress.step * self.stage.grad_accum)
        batches = iter(loader)
        bar = progress_bar(acc.is_main_process, total=self.total_steps, initial=progress.step,
                           desc=self.stage.name, leave=True)
        run = self.recipe.run
        try:
            # run.compile: the objective's blocks and heads compiled in place for this stage, eager again after it
            with compiled(self.objective, enabled=run.compile, mode=run.compile_mode):
                self._loop(batches, bar, progress, save, checkpoint_every, log_every)
        finally:
            bar.close()

    def _loop(self, batches, bar, progress: Progress, save, checkpoint_every: int, log_every: int) -> None:
        acc = self.accelerator
        seed = self.recipe.run.seed
        self.model.train()
        if self.monitor is not None and self.monitor.spec.at_start and progress.global_step == 0:
            self._monitor(progress, bar)                  # the curve's start: the weights before any step
        window_images, window_start = 0, time.perf_counter()
        while progress.step < self.total_steps:
            lr = self.schedule.set(progress.step)
            micro = [next(batches) for _ in range(self.stage.grad_accum)]
            loss_sum, logs_sum = 0.0, {}
            for i, batch in enumerate(micro):
                loaded = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
                images = loaded["images"].float().div_(255)
                # Keyed by the optimiser step, not the micro-step: each sample occurs once per global batch, so
                # its augmentations and masks are the same whatever the accumulation or the number of processes.
                # The views' draws are made on the host (keys: the loader's CPU indices) and reach the device in
                # one copy; the objective's masks continue the same streams on the device.
                host_rng = step_rng(seed, progress.global_step, batch["index"].cpu())
                views = self.views(images, host_rng)
                rng = host_rng.to(acc.device)
                batch = Batch(index=loaded["index"], rng=rng, images=images,
                              labels=loaded.get("labels") if self.labelled else None)
                last = i == len(micro) - 1
                context = acc.no_sync(self.model) if not last else nullcontext()
                with context, acc.autocast():
                    out = self.model(views, batch)
                    loss = out["loss"] / len(micro)
                acc.backward(loss)
                loss_sum += loss.detach()
                for k, v in out.get("logs", {}).items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) / len(micro)
                window_images += images.shape[0] * acc.num_processes
            grads_finite = norms_finite([p.grad for p in self.trainable])     # before clipping turns inf into NaN
            if self.stage.clip_grad > 0:
                acc.clip_grad_norm_(self.trainable, self.stage.clip_grad)
            self.optimizer.step()
            # Checked after the step, before anything (EMA, queues, a checkpoint) can keep what it produced; the
            # gradients are released only after the check, which may need to look at them again.
            self._check_finite(loss_sum, grads_finite, norms_finite(self.trainable), progress, lr)
            self.optimizer.zero_grad(set_to_none=True)
            unwrapped = acc.unwrap_model(self.model)
            unwrapped.after_step(progress.step)
            if self.ema is not None:
                self.ema.update(unwrapped.backbone)
            progress.step += 1
            progress.global_step += 1
            if progress.step % log_every == 0 or progress.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                record = {"stage": self.stage_index, "stage_name": self.stage.name, "step": progress.step,
                          "global_step": progress.global_step, "epoch": progress.step / self.steps_per_epoch,
                          "loss": float(acc.reduce(loss_sum, "mean")),
                          "lr": lr, "images_per_s": window_images / max(elapsed, 1e-9)}
                logged = {k: float(acc.reduce(torch.as_tensor(v, device=acc.device), "mean"))
                          for k, v in logs_sum.items()}
                # An objective's diagnostic that could not be measured this step is NaN (e.g. a neighbour agreement
                # on an empty queue): left out of the line, which stays valid JSON. The loss is checked above.
                record.update({k: v for k, v in logged.items() if math.isfinite(v)})
                self.log(record)
                self.postfix.update(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                bar.set_postfix(self.postfix)
                window_images, window_start = 0, time.perf_counter()
            # Before the step's checkpoint: a resume from it keeps this line and does not measure the step again.
            if self.monitor is not None and self.monitor.due(progress.step, self.total_steps, self.steps_per_epoch):
                window_start += self._monitor(progress, bar)          # not training time: out of images_per_s
            bar.update(1)
            if checkpoint_every and progress.global_step % checkpoint_every == 0 and progress.step < self.total_steps:
                save(progress, "periodic")

    def _monitor(self, progress: Progress, bar) -> float:
        """Measure the online k-NN (``[monitor]``) and log it as a ``"kind": "monitor"`` line; returns the seconds
        it took. The backbone's EMA is measured instead where asked for and kept by this stage."""
        use_ema = self.monitor.spec.use_ema and self.ema is not None
        backbone = self.ema.module if use_ema else self.objective.backbone
        with eager():                   # other batch sizes, no grad: compiling them would cost more than it saves
            scores, seconds = self.monitor.measure(backbone, keep=[self.objective])
        self.log({"kind": "monitor", "stage": self.stage_index, "stage_name": self.stage.name, "step": progress.step,
                  "global_step": progress.global_step, "epoch": progress.step / self.steps_per_epoch, **scores,
                  "ema": use_ema, "monitor_seconds": seconds})
        if "knn_top1" in scores:
            self.postfix["knn"] = f"{scores['knn_top1']:.1f}"
            bar.set_postfix(self.postfix)
        return seconds

    def _check_finite(self, loss: torch.Tensor, grads_finite: torch.Tensor, params_finite: torch.Tensor,
                      progress: Progress, lr: float) -> None:
        """Stop on a non-finite loss, gradient or weight (one flag reduction per step, so that every process stops
        at the same step instead of hanging). The step's weights are never saved: the caller raises past them.

        The per-step flags come from :func:`norms_finite`, which needs no host round trip but also fires for finite
        values above ~1e19; only then (every process together, since the reduced flags agree) is the exact test run.
        """
        def reduced(grads_ok: torch.Tensor, params_ok: torch.Tensor) -> torch.Tensor:
            flags = torch.stack([~torch.isfinite(loss.detach()).all(), ~grads_ok, ~params_ok]).float()
            return self.accelerator.reduce(flags.to(self.accelerator.device), "sum")

        flags = reduced(grads_finite, params_finite)
        if float(flags.sum()) == 0:
            return
        flags = reduced(all_finite([p.grad for p in self.trainable]), all_finite(self.trainable))
        if float(flags.sum()) == 0:
            return
        bad_loss, bad_grads, _ = (bool(f > 0) for f in flags)
        what = ("the loss became non-finite" if bad_loss else
                "the gradients became non-finite" if bad_grads else
                "the weights became non-finite after the optimiser step")
        raise TrainingDiverged(
            f"{what} at stage {self.stage.name!r} step {progress.step + 1} (global step "
            f"{progress.global_step + 1}; loss {float(loss.detach()):.6g}, lr {lr:.3g}); nothing from this step "
            "was saved")

    def check_state_finite(self, progress: Progress) -> None:
        """Before a checkpoint: the optimiser's state must be finite too. Adam's second moment overflows to inf when
        a squared gradient exceeds the float range while the weights stay finite (its update is then 0), and a run
        resumed from such a state would never update those weights again."""
        tensors = [t for state in self.optimizer.state.values() for t in state.values()
                   if torch.is_tensor(t) and t.is_floating_point()]
        flag = (~all_finite(tensors)).float().reshape(1).to(self.accelerator.device)
        if float(self.accelerator.reduce(flag, "sum")) > 0:
            raise TrainingDiverged(
                f"the optimiser state became non-finite by stage {self.stage.name!r} step {progress.step} "
                f"(global step {progress.global_step}; a squared gradient overflowed); it was not saved")


def norms_finite(tensors) -> torch.Tensor:
    """A boolean tensor, without a host round trip: whether the 2-norm of every tensor (``None`` skipped) is finite
    (one fused ``_foreach_norm``). True means every element is finite; False can also mean finite values above
    ~1e19, whose squares overflow — :func:`all_finite` tells."""
    tensors = [t.detach() for t in tensors if t is not None]
    if not tensors:
        return torch.tensor(True)
    return torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(tensors)])).all()


def all_finite(tensors) -> torch.Tensor:
    """A boolean tensor: whether every element of every tensor (``None`` skipped) is finite, exactly: the fast
    :func:`norms_finite`, and where it fails the largest magnitude, which NaN propagates through and which cannot
    overflow."""
    finite = norms_finite(tensors)
    if bool(finite):
        return finite
    tensors = [t.detach() for t in tensors if t is not None]
    return torch.isfinite(torch.stack([p.float() for p in torch._foreach_norm(tensors, float("inf"))])).all()


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, global_step: int) -> None:
    """Drop log lines past ``global_step`` (a resumed run writes them again); -1 drops every line (a run started
    over, which also measures ``[monitor]``'s step 0 again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("global_step", 0) <= global_step]
    from sslbench.core.io import atomic_write_text

    atomic_write_text(path, "\n".join(keep) + ("\n" if keep else ""))
