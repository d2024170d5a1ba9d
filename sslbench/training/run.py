"""`sslbench run`: a recipe end to end — backbone, data, stages, checkpoints, evaluation, result rows.

A run lives in ``<run.output_dir>/<run.name>/``: ``recipe.toml`` and ``recipe.json`` (resolved), ``log.jsonl``
(one line per logged step), ``checkpoints/`` (``last.pt`` to resume, ``backbone.pt`` for downstream recipes; never
committed) and ``metrics.csv``. Only the main process writes.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sslbench.core.version import __version__
from sslbench.core.errors import RecipeError, TrainingDiverged
from sslbench.core.io import atomic_torch_save
from sslbench.evaluation.suite import evaluate_backbone
from sslbench.training.publish import metric_rows, publish_rows
from sslbench.core.modules import EMA
from sslbench.training.resume import load_resume_state, rng_state, save_resume_state, set_rng_state
from sslbench.training.run_folder import finished_run, open_run_folder, reopen_check, run_dir_of
from sslbench.training.context import RunContext
from sslbench.training.spec import Recipe
from sslbench.training.trainer import Progress, StageTrainer, append_jsonl, truncate_log

__all__ = ["Run", "run_recipe", "run_dir_of"]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)



def encoder_state(backbone) -> dict:
    """What ``backbone.pt`` keeps of a backbone: the ViT's weights in timm names, plus the pooling LayerNorm
    (``fc_norm.*``) when the backbone was loaded from a file that had one (a fine-tuned data2vec 2.0 release), so a
    later ``mean_fc_norm`` evaluation of this run's file uses the same norm as the evaluations inside the run."""
    state = dict(backbone.vit.state_dict())
    if getattr(backbone, "fc_norm", None) is not None:
        state.update({f"fc_norm.{k}": v for k, v in backbone.fc_norm.state_dict().items()})
    return state

class Run:
    """One run of a resolved recipe.

    Everything that can fail on bad input — the model and its checkpoint, the evaluators, the data, every stage's
    length, the first stage's objective, views and optimiser, the evaluators' checks against the data, the resume
    checkpoint — is built before the run folder is touched, so a failure leaves nothing behind.
    """

    def __init__(self, recipe: Recipe, registry, *, resume: bool = False, force: bool = False,
                 allow_optimizer_change: bool = False):
        self.recipe = recipe
        self.registry = registry
        _seed_everything(recipe.run.seed)
        self.context = RunContext.build(recipe, registry)
        self.accelerator = acc = self.context.accelerator
        self.backbone, self.load_report = self.context.backbone, self.context.load_report
        self.datasets, self.data_info = self.context.datasets, self.context.data
        self.run_dir = run_dir_of(recipe)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.log_path = self.run_dir / "log.jsonl"
        self.progress = Progress()
        self.ema = None
        self.resume_state = None
        last = self.ckpt_dir / "last.pt"
        if resume and last.exists() and not force:
            # another recipe's folder is refused before anything is read from it (its weights may not even fit)
            reopen_check(self.run_dir, recipe, resume=True, allow_optimizer_change=allow_optimizer_change)
            self.resume_state = load_resume_state(last)
            self.progress = Progress(**self.resume_state["meta"]["progress"])
            self.backbone.vit.load_state_dict(self.resume_state["backbone"])
        self.last_saved_step = self.progress.global_step if self.resume_state is not None else None
        self.monitor = None
        if recipe.monitor.enabled:
            from sslbench.training.monitor import Monitor

            self.monitor = Monitor(recipe, self.datasets, acc, self.backbone)
        # The first stage to train is built now (objective, views, optimiser), before any file is written.
        self.first_trainer = None
        if self.progress.stage < len(recipe.stages):
            self.first_trainer = self._build_trainer(self.progress.stage, None)
        if acc.is_main_process:
            open_run_folder(recipe, resume=resume, force=force, allow_optimizer_change=allow_optimizer_change)
            # Log lines past the checkpoint are written again by the resumed run (all of them without one).
            truncate_log(self.log_path, self.progress.global_step if self.resume_state is not None else -1)
        acc.wait_for_everyone()
        if recipe.run.trackers:
            flat = {"recipe_hash": recipe.recipe_hash, "objective": self.recipe.objective_chain()}
            acc.init_trackers(recipe.run.name, config=flat)

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            append_jsonl(self.log_path, {**record, "time": time.time()})
        if self.recipe.run.trackers:
            if record.get("kind") == "monitor":          # its own names, beside the training line of the same step
                tracked = {f"monitor/{k}": v for k, v in record.items()
                           if k.startswith("knn_") or k == "monitor_seconds"}
            else:
                tracked = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.accelerator.log(tracked, step=record["global_step"])

    def _save(self, trainer: StageTrainer, progress: Progress, reason: str) -> None:
        acc = self.accelerator
        trainer.check_state_finite(progress)
        acc.wait_for_everyone()
        if acc.is_main_process:
            objective = acc.unwrap_model(trainer.model)
            plain_rng, tensor_rng = rng_state()
            meta = {"reason": reason, "recipe_hash": self.recipe.recipe_hash, "progress": progress.as_dict(),
                    "objective_name": objective.name, "rng": plain_rng}
            save_resume_state(self.ckpt_dir / "last.pt", meta, {
                "objective": objective.state_dict(), "backbone": objective.backbone.vit.state_dict(),
                "trainer": trainer.state_dict() if reason == "periodic" else None,
                "ema": trainer.ema.module.state_dict() if trainer.ema is not None else None,
                "rng": tensor_rng})
        self.last_saved_step = progress.global_step
        acc.wait_for_everyone()

    def _build_trainer(self, index: int, previous) -> StageTrainer:
        objective, _ = self.context.objective(index, previous)
        return StageTrainer(self.accelerator, objective, self.recipe.stages[index], index, self.recipe,
                            self.datasets["train"], self.data_info, self._loader, self._log, monitor=self.monitor)

    def report(self, stage_name: str) -> list[dict]:
        """Evaluate the backbone (and its EMA where asked) after a stage; write ``metrics.csv`` and refresh the
        leaderboard beside the runs folder. Returns the rows (none on processes other than the main one)."""
        recipe, results = self.recipe, []
        for use_ema in (False, True):
            evals = [e for e in recipe.eval if e.use_ema == use_ema]
            if evals:
                results += evaluate_backbone(recipe, self.registry, self.eval_backbone(use_ema), self.datasets,
                                             self.accelerator, evals=evals)
        if not self.accelerator.is_main_process:
            return []
        start = recipe.backbone.checkpoint or "scratch"
        # Seeds of one recipe share a checkpoint label, so the leaderboard averages them.
        recipe_name = re.sub(r"-seed\d+$", "", self.run_dir.name)
        rows = metric_rows(recipe, results, run_id=self.run_dir.name, objective=self.recipe.objective_chain(),
                           stage=stage_name, checkpoint=f"{start} → {recipe_name}/{stage_name}")
        publish_rows(self.run_dir, rows, Path(recipe.run.output_dir), results, self.datasets["test"].labels)
        return rows

    def train(self, evaluate_stages: bool = False) -> None:
        """Train every stage (from where a resumed run stands); with ``evaluate_stages`` and ``run.evaluate =
        "each_stage"``, :meth:`report` after every stage but the last."""
        run = self.recipe.run
        objective = None
        if self.progress.finished and self.resume_state is not None:
            self._restore_final_ema(self.resume_state)
        for index in range(self.progress.stage, len(self.recipe.stages)):
            stage = self.recipe.stages[index]
            trainer, self.first_trainer = self.first_trainer or self._build_trainer(index, objective), None
            objective = trainer.objective
            state = self.resume_state
            if state is not None and state["meta"]["objective_name"] == objective.name:
                objective.load_state_dict(state["objective"])
            if state is not None and state.get("trainer") is not None and self.progress.stage == index:
                trainer.load_state_dict(state["trainer"])
                set_rng_state(state["meta"]["rng"], state["rng"])
            self.resume_state = None
            self.progress.stage = index
            try:
                trainer.run(self.progress, lambda p, reason: self._save(trainer, p, reason),
                            run.checkpoint_every, run.log_every)
                objective = self.accelerator.unwrap_model(trainer.model)
                self.ema = trainer.ema
                self.progress = Progress(stage=index + 1, step=0, global_step=self.progress.global_step,
                                         finished=index + 1 == len(self.recipe.stages))
                self._save(trainer, self.progress, "stage_end")
            except TrainingDiverged as exc:
                raise TrainingDiverged(f"{exc}; {self._resume_advice()}") from None
            if evaluate_stages and run.evaluate == "each_stage" and index + 1 < len(self.recipe.stages):
                self.report(stage.name)
        self.export_backbone()

    def _resume_advice(self) -> str:
        if self.last_saved_step is None:
            return ("no checkpoint was saved before it (set run.checkpoint_every to keep one); change the settings "
                    "and start over with --force")
        return (f"the last finite checkpoint is {self.ckpt_dir / 'last.pt'} (global step {self.last_saved_step}); "
                "lower stages[i].optimizer.lr (or change other optimizer / schedule / clip_grad settings) and "
                "continue with `sslbench run RECIPE --resume --allow-optimizer-change`")

    def _restore_final_ema(self, state: dict) -> None:
        """A resumed run that had finished training still evaluates the EMA it kept."""
        momentum = self.recipe.stages[-1].ema_momentum
        if state.get("ema") is not None and momentum > 0:
            self.ema = EMA(self.backbone, momentum).eval()
            self.ema.module.load_state_dict(state["ema"])

    def export_backbone(self) -> Path:
        """``checkpoints/backbone.pt``: the encoder (and its EMA) in sslbench's format, for downstream recipes."""
        path = self.ckpt_dir / "backbone.pt"
        if self.accelerator.is_main_process:
            ema = self.ema
            atomic_torch_save({"format": "sslbench", "backbone": encoder_state(self.backbone),
                               "ema": encoder_state(ema.module) if ema is not None else None,
                               "recipe_hash": self.recipe.recipe_hash,
                               "backbone_recipe": self.recipe.as_dict()["backbone"]},
                              path)
        return path

    def _loader(self, dataset, batch_size: int, seed: int, start_step: int):
        from sslbench.data.dataset import InMemoryLoader

        return InMemoryLoader(dataset, batch_size=batch_size, seed=seed,
                              num_processes=self.accelerator.num_processes,
                              process_index=self.accelerator.process_index, start_step=start_step)

    def eval_backbone(self, use_ema: bool):
        if use_ema and self.ema is not None:
            return self.ema.module
        return self.backbone

    def finish(self) -> None:
        if self.recipe.run.trackers:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()


def environment_banner() -> str:
    return f"sslbench {__version__}, torch {torch.__version__}, pid {os.getpid()}"


def run_recipe(path: str, *, resume: bool = False, force: bool = False, seed: int | None = None,
               allow_optimizer_change: bool = False, overrides: Sequence[str] = ()) -> Path:
    """Train and evaluate a recipe file, with command-line ``overrides`` (``KEY=VALUE``); returns the run
    folder."""
    from sslbench.core.registry import get_registry
    from sslbench.training.recipe import check_run_name, load_recipe

    registry = get_registry()
    recipe = load_recipe(path, registry, overrides=overrides)
    if seed is not None:
        recipe = recipe.replace(run={"seed": seed,
                                     "name": check_run_name(f"{recipe.run.name}-seed{seed}", "--seed")})
    done = None if resume or force else finished_run(recipe)
    if done is not None:
        _report_finished(done, recipe)
        return done
    existed = run_dir_of(recipe).exists()
    try:
        run = Run(recipe, registry, resume=resume, force=force, allow_optimizer_change=allow_optimizer_change)
    except RecipeError as exc:  # raised while building (e.g. backbone.checkpoint_trusted): name the recipe file
        raise (exc if exc.source else exc.with_source(str(path))) from None
    try:
        run.train(evaluate_stages=True)
        run.report(recipe.stages[-1].name)
    except BaseException:
        if not existed and run.accelerator.is_main_process:
            _remove_if_unstarted(run.run_dir, recipe)
        raise
    finally:
        run.finish()
    return run.run_dir


def _report_finished(run_dir: Path, recipe: Recipe) -> None:
    """A second `sslbench run` of a finished recipe trains nothing: it says where the results are."""
    from sslbench.results.metrics import read_metrics
    from sslbench.results.summary import run_summary

    rows = read_metrics(run_dir / "metrics.csv").to_dict("records") if recipe.eval else []
    leaderboard = Path(recipe.run.output_dir) / "leaderboard.md"
    print(f"{run_dir}: this recipe already ran to the end (same recipe hash), so nothing was trained. Pass --force "
          "to run it again, or --seed N for another seed.")
    print(run_summary(run_dir, rows, leaderboard=leaderboard if leaderboard.exists() else None,
                      verb="Already finished"))


def _remove_if_unstarted(run_dir: Path, recipe: Recipe) -> None:
    """A folder this invocation created and that holds no step yet (no log line, no checkpoint) goes again."""
    from sslbench.training.run_folder import remove_run_folder

    log = run_dir / "log.jsonl"
    if (log.exists() and log.stat().st_size) or (run_dir / "checkpoints" / "last.pt").exists():
        return
    remove_run_folder(run_dir, Path(recipe.run.output_dir))
