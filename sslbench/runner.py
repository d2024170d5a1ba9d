"""`sslbench run`: a recipe end to end — backbone, data, stages, checkpoints, evaluation, result rows.

A run lives in ``<run.output_dir>/<run.name>/``: ``recipe.toml`` and ``recipe.json`` (resolved), ``log.jsonl``
(one line per logged step), ``checkpoints/`` (``last.pt`` to resume, ``backbone.pt`` for downstream recipes; never
committed) and ``metrics.csv``. Only the main process writes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import RecipeError, UserError
from .evaluate import build_evaluators
from .io import atomic_torch_save, atomic_write_text
from .objective import DataInfo, StageContext
from .recipe import protocol_hash, recipe_hash, to_toml
from .setup import build_model, data_info, load_datasets, make_accelerator
from .train import Progress, StageTrainer, append_jsonl, stage_length, truncate_log


def run_dir_of(recipe: dict) -> Path:
    return Path(recipe["run"]["output_dir"]) / recipe["run"]["name"]


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def prepare_run_dir(recipe: dict, resume: bool, force: bool, is_main: bool) -> Path:
    """Create (or reopen, when resuming) the run folder; refuse to clobber a different or finished run."""
    run_dir = run_dir_of(recipe)
    meta = run_dir / "recipe.json"
    digest = recipe_hash(recipe)
    if run_dir.exists() and not force:
        if meta.exists():
            previous = json.loads(meta.read_text())
            if previous.get("recipe_hash") != digest:
                raise UserError(f"{run_dir}: holds a run of a different recipe (hash {previous.get('recipe_hash', '?')[:12]}"
                                f" ≠ {digest[:12]}); rename run.name or pass --force to start over")
        has_state = (run_dir / "checkpoints" / "last.pt").exists()
        if has_state and not resume:
            raise UserError(f"{run_dir}: a run with this name exists; pass --resume to continue it or --force to "
                            "start over")
    if is_main:
        if force and run_dir.exists():
            shutil.rmtree(run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.toml", to_toml(recipe))
        atomic_write_text(meta, json.dumps({"recipe_hash": digest, "protocol_hash": protocol_hash(recipe),
                                            "sslbench_version": __version__, "recipe": recipe}, indent=2))
    return run_dir


class Run:
    """One run of a resolved recipe."""

    def __init__(self, recipe: dict, registry, *, resume: bool = False, force: bool = False):
        self.recipe = recipe
        self.registry = registry
        self.accelerator = make_accelerator(recipe)
        acc = self.accelerator
        seed = recipe["run"]["seed"]
        _seed_everything(seed)
        self.backbone, self.load_report = build_model(recipe, registry)
        build_evaluators(registry, recipe["eval"], self.backbone.depth)     # bad blocks fail before training
        # The run folder only once the model and evaluators are known to build: bad input leaves nothing behind.
        self.run_dir = prepare_run_dir(recipe, resume, force, acc.is_main_process)
        acc.wait_for_everyone()
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.log_path = self.run_dir / "log.jsonl"
        self.datasets = load_datasets(recipe, registry, acc)
        self.data_info: DataInfo = data_info(recipe, self.datasets["train"], self.backbone)
        self.progress = Progress()
        self.ema = None
        self.resume_state = None
        last = self.ckpt_dir / "last.pt"
        if resume and last.exists():
            self.resume_state = torch.load(last, map_location="cpu", weights_only=False)
            self.progress = Progress(**self.resume_state["progress"])
            self.backbone.vit.load_state_dict(self.resume_state["backbone"])
            if acc.is_main_process:
                truncate_log(self.log_path, self.progress.global_step)
        if recipe["run"]["trackers"]:
            flat = {"recipe_hash": recipe_hash(recipe), "objective": self.objective_chain()}
            acc.init_trackers(recipe["run"]["name"], config=flat)

    def objective_chain(self) -> str:
        names = []
        for stage in self.recipe["stages"]:
            if not names or names[-1] != stage["objective"]:
                names.append(stage["objective"])
        return "+".join(names)

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            append_jsonl(self.log_path, {**record, "time": time.time()})
        if self.recipe["run"]["trackers"]:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                                 step=record["global_step"])

    def _save(self, trainer: StageTrainer, progress: Progress, reason: str) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            objective = acc.unwrap_model(trainer.model)
            state = {"format": "sslbench", "reason": reason, "recipe_hash": recipe_hash(self.recipe),
                     "progress": progress.as_dict(), "objective_name": objective.name,
                     "objective": objective.state_dict(), "backbone": objective.backbone.vit.state_dict(),
                     "trainer": trainer.state_dict() if reason == "periodic" else None,
                     "ema": trainer.ema.module.state_dict() if trainer.ema is not None else None,
                     "rng": _rng_state()}
            atomic_torch_save(state, self.ckpt_dir / "last.pt")
        acc.wait_for_everyone()

    def _build_objective(self, index: int, previous):
        stage = self.recipe["stages"][index]
        steps_per_epoch, total = stage_length(stage, len(self.datasets["train"]))
        context = StageContext(stage_index=index, steps_per_epoch=steps_per_epoch, total_steps=total,
                               num_processes=self.accelerator.num_processes,
                               process_index=self.accelerator.process_index, seed=self.recipe["run"]["seed"])
        if previous is not None and previous.name == stage["objective"]:
            previous.start_stage(stage["options"], context)
            return previous
        # Heads are initialised from a seed of their own, so a resumed run builds the same ones.
        torch.manual_seed(self.recipe["run"]["seed"] * 1000 + index + 1)
        factory = self.registry.get("objective", stage["objective"]).factory
        return factory(self.backbone, stage["options"], context).to(self.accelerator.device)

    def train(self, evaluate_stage=None) -> None:
        acc = self.accelerator
        run = self.recipe["run"]
        objective = None
        if self.progress.finished and self.resume_state is not None:
            self._restore_final_ema(self.resume_state)
        for index in range(self.progress.stage, len(self.recipe["stages"])):
            stage = self.recipe["stages"][index]
            objective = self._build_objective(index, objective)
            state = self.resume_state
            if state is not None and state["objective_name"] == objective.name:
                objective.load_state_dict(state["objective"])
            trainer = StageTrainer(acc, objective, stage, index, self.recipe, self.datasets["train"],
                                   self.data_info, self._loader, self._log)
            if state is not None and state.get("trainer") is not None and self.progress.stage == index:
                trainer.load_state_dict(state["trainer"])
                _set_rng_state(state["rng"])
            self.resume_state = None
            self.progress.stage = index
            trainer.run(self.progress, lambda p, reason: self._save(trainer, p, reason),
                        run["checkpoint_every"], run["log_every"])
            objective = acc.unwrap_model(trainer.model)
            self.ema = trainer.ema
            self.progress = Progress(stage=index + 1, step=0, global_step=self.progress.global_step,
                                     finished=index + 1 == len(self.recipe["stages"]))
            self._save(trainer, self.progress, "stage_end")
            if evaluate_stage is not None and run["evaluate"] == "each_stage" and index + 1 < len(self.recipe["stages"]):
                evaluate_stage(stage["name"])
        self.export_backbone()

    def _restore_final_ema(self, state: dict) -> None:
        """A resumed run that had finished training still evaluates the EMA it kept."""
        from .train import EMABackbone

        momentum = self.recipe["stages"][-1]["ema_momentum"]
        if state.get("ema") is not None and momentum > 0:
            self.ema = EMABackbone(self.backbone, momentum)
            self.ema.module.load_state_dict(state["ema"])

    def export_backbone(self) -> Path:
        """``checkpoints/backbone.pt``: the encoder (and its EMA) in sslbench's format, for downstream recipes."""
        path = self.ckpt_dir / "backbone.pt"
        if self.accelerator.is_main_process:
            ema = self.ema
            atomic_torch_save({"format": "sslbench", "backbone": self.backbone.vit.state_dict(),
                               "ema": ema.module.vit.state_dict() if ema is not None else None,
                               "recipe_hash": recipe_hash(self.recipe), "backbone_recipe": self.recipe["backbone"]},
                              path)
        return path

    def _loader(self, dataset, batch_size: int, seed: int, start_step: int):
        from .data import InMemoryLoader

        return InMemoryLoader(dataset, batch_size=batch_size, seed=seed,
                              num_processes=self.accelerator.num_processes,
                              process_index=self.accelerator.process_index, start_step=start_step)

    def eval_backbone(self, use_ema: bool):
        if use_ema and self.ema is not None:
            return self.ema.module
        return self.backbone

    def finish(self) -> None:
        if self.recipe["run"]["trackers"]:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()


def environment_banner() -> str:
    return f"sslbench {__version__}, torch {torch.__version__}, pid {os.getpid()}"


def run_recipe(path: str, *, resume: bool = False, force: bool = False, seed: int | None = None) -> Path:
    """Train and evaluate a recipe file; returns the run folder."""
    from .plugins import get_registry
    from .recipe import load_recipe
    from .report import report_run

    registry = get_registry()
    recipe = load_recipe(path, registry)
    if seed is not None:
        recipe["run"]["seed"] = seed
        recipe["run"]["name"] = f"{recipe['run']['name']}-seed{seed}"
    try:
        run = Run(recipe, registry, resume=resume, force=force)
    except RecipeError as exc:  # raised while building (e.g. backbone.checkpoint_trusted): name the recipe file
        raise (exc if exc.source else exc.with_source(str(path))) from None
    try:
        run.train(evaluate_stage=lambda stage_name: report_run(run, stage_name))
        report_run(run, recipe["stages"][-1]["name"])
    finally:
        run.finish()
    return run.run_dir
