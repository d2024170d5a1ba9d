"""`sslbench run RECIPE --dry-run`: build everything a run builds and take one real optimiser step per stage on a
tiny synthetic batch, on the CPU — so a paper-scale recipe is known to work before it is sent to a GPU cluster.

What is built is what ``sslbench run`` builds: the full-size backbone (random weights when the checkpoint is not on
this machine — its format and the architecture the format implies are still checked; a present checkpoint is
loaded for real), each stage's objective with its heads (carried over between stages of the same objective, as in
a run), the stage's optimiser with its parameter groups, layer decay and frozen parts, its EMA, and the objective's
own view pipeline. Each stage then runs **one** step of the real trainer (:class:`sslbench.training.trainer.StageTrainer`) on
2 synthetic images of the training data's stored size (batch 2, no accumulation; options such as queue sizes are
*not* shrunk), and the evaluators are instantiated with their options.

It prints parameter counts (backbone, heads, trainable per stage), the loss of each step, wall time and peak
memory (``ru_maxrss``), loads no data and writes nothing: the run folder, results and caches are left untouched.
"""

from __future__ import annotations

from typing import Sequence

import dataclasses
import resource
import tempfile
import time
from pathlib import Path

import torch

from sslbench.data.dataset import ImageDataset, InMemoryLoader
from sslbench.core.errors import RecipeError
from sslbench.core.registry import get_registry
from sslbench.training.recipe import load_recipe
from sslbench.data.geometry import image_size
from sslbench.training.context import RunContext
from sslbench.training.spec import Recipe, StageSpec
from sslbench.training.trainer import Progress, StageTrainer

SYNTHETIC_IMAGES = 2
# Formats whose official files pickle Python objects (fairseq stores its config): refused unless trusted.
PICKLED_FORMATS = ("data2vec2",)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def peak_memory_gb() -> float:
    """Peak resident memory of this process so far (``ru_maxrss`` is in KiB on Linux), in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def stored_size(recipe: Recipe, backbone) -> int:
    """Side of the training images as the data source stores them (its ``resize``/``size``), else the view size."""
    train = recipe.data.train
    return train.get("resize") or train.get("size") or image_size(recipe, backbone) or backbone.img_size


def synthetic_dataset(recipe: Recipe, backbone, n: int = SYNTHETIC_IMAGES) -> ImageDataset:
    """``n`` random ``uint8`` images with the backbone's channels and the training data's stored size."""
    size = stored_size(recipe, backbone)
    generator = torch.Generator().manual_seed(recipe.run.seed)
    images = torch.randint(0, 256, (n, backbone.in_chans, size, size), dtype=torch.uint8, generator=generator)
    return ImageDataset(images, torch.arange(n), [str(i) for i in range(n)], "synthetic", "synthetic")


def _checkpoint_note(recipe: Recipe, registry, backbone) -> str:
    """Load a present checkpoint; for an absent one, say what was checked (format, architecture, trust)."""
    spec = recipe.backbone
    if not spec.checkpoint:
        return "no checkpoint (random initialisation)"
    where = f"checkpoint {spec.checkpoint} (format {spec.checkpoint_format})"
    if Path(spec.checkpoint).is_file():
        return f"{where}: loaded"
    fmt = registry.get("checkpoint_format", spec.checkpoint_format).factory
    implied = getattr(fmt, "architecture", {})
    wrong = {k: v for k, v in implied.items() if k in backbone.architecture and backbone.architecture[k] != v}
    if wrong:  # cannot happen through build_model, which applies the format's architecture; kept as a guard
        raise RecipeError("backbone.checkpoint_format", f"the backbone was built with {backbone.architecture}, "
                                                        f"the format needs {wrong}")
    note = f"{where}: not on this machine — format and implied architecture checked, weights random"
    if spec.checkpoint_format in PICKLED_FORMATS and not spec.checkpoint_trusted:
        note += (f"\n# warning: {spec.checkpoint_format} files usually pickle their config; the run will refuse "
                 "the file unless backbone.checkpoint_trusted = true")
    return note


def _one_step_stage(stage: StageSpec, n: int) -> StageSpec:
    return dataclasses.replace(stage, batch_size=n, grad_accum=1, steps=1, epochs=None)


def dry_run_recipe(path: str, seed: int | None = None, overrides: Sequence[str] = ()) -> int:
    """Validate ``path``, build everything and take one optimiser step per stage; print the figures."""
    start = time.perf_counter()
    registry = get_registry()
    recipe = load_recipe(path, registry, check_files=False, overrides=overrides)
    if seed is not None:
        recipe = recipe.replace(run={"seed": seed})
    with tempfile.TemporaryDirectory(prefix="sslbench-dry-run-") as scratch:
        recipe = recipe.replace(run={"output_dir": scratch, "cpu": True, "mixed_precision": "no", "trackers": []})
        try:
            _dry_run(recipe, registry, path, start)
        except RecipeError as exc:
            raise (exc if exc.source else exc.with_source(str(path))) from None
    return 0


def _dry_run(recipe: Recipe, registry, path: str, start: float) -> None:
    torch.manual_seed(recipe.run.seed)
    context = RunContext.build(recipe, registry, data="synthetic", synthetic=synthetic_dataset,
                               load_weights=Path(recipe.backbone.checkpoint or "").is_file(),
                               teacher_weights="present")
    backbone, accelerator = context.backbone, context.accelerator
    note = _checkpoint_note(recipe, registry, backbone)
    dataset, info = context.datasets["train"], context.data
    print(f"# dry run of {path}: CPU, fp32, {len(dataset)} synthetic {info.channels}x{dataset.size[0]}x"
          f"{dataset.size[1]} images, one optimiser step per stage; nothing is written")
    backbone_params = sum(p.numel() for p in backbone.parameters())
    print(f"Backbone {recipe.backbone.model}: {_millions(backbone_params)} parameters, {backbone.depth} "
          f"blocks, width {backbone.embed_dim}, {backbone.num_patches} patches of {backbone.patch_size} px; {note}")
    records: list[dict] = []

    def loader(data, batch_size, data_seed, start_step):
        return InMemoryLoader(data, batch_size=batch_size, seed=data_seed, start_step=start_step)

    objective, progress = None, Progress()
    for index, stage in enumerate(recipe.stages):
        began = time.perf_counter()
        objective, carried = context.objective(index, objective)
        trainer = StageTrainer(accelerator, objective, _one_step_stage(stage, len(dataset)), index, recipe,
                               dataset, info, loader, records.append)
        views = [tuple(v.shape[1:]) for v in trainer.views(dataset.images.float() / 255, _probe_rng(dataset))]
        progress = Progress(stage=index, step=0, global_step=progress.global_step)
        trainer.run(progress, lambda *_: None, checkpoint_every=0, log_every=1)
        objective = accelerator.unwrap_model(trainer.model)
        named = dict(objective.named_parameters())
        heads = sum(p.numel() for n, p in named.items() if not n.startswith("backbone."))
        trainable = sum(p.numel() for p in trainer.trainable)
        ema = f", EMA {stage.ema_momentum:g}" if trainer.ema is not None else ""
        print(f"Stage {index} {stage.name!r}: {stage.objective}{' (carried over)' if carried else ''}, "
              f"{len(views)} view(s) {_shapes(views)}; heads {_millions(heads)}, trainable {_millions(trainable)} "
              f"of {_millions(sum(p.numel() for p in named.values()))}{ema}; "
              f"{len(trainer.optimizer.param_groups)} param groups; loss {records[-1]['loss']:.4f}; "
              f"{time.perf_counter() - began:.1f} s")
        if stage.teacher is not None and not carried:
            teacher = stage.teacher
            size = _millions(sum(p.numel() for p in objective.teacher.network.parameters()))
            loaded = "loaded" if Path(teacher.checkpoint).is_file() else "not on this machine, weights random"
            print(f"    teacher {teacher.model}: {size} parameters, frozen; checkpoint {teacher.checkpoint} "
                  f"(format {teacher.checkpoint_format}): {loaded}")
        trainer = None
    for e, evaluator in zip(recipe.eval, context.evaluators):
        print(f"Evaluate {e.name}{' (EMA)' if e.use_ema else ''}: built, "
              f"{len(evaluator.requests(backbone.depth))} feature request(s)")
    print(f"Dry run passed: wall time {time.perf_counter() - start:.1f} s, peak memory (max RSS) "
          f"{peak_memory_gb():.2f} GB")


def _probe_rng(dataset: ImageDataset):
    from sslbench.training.trainer import step_rng

    return step_rng(0, 0, torch.arange(len(dataset)))


def _shapes(views: list[tuple]) -> str:
    counts: dict[tuple, int] = {}
    for shape in views:
        counts[shape] = counts.get(shape, 0) + 1
    return ", ".join(f"{c}x{'x'.join(map(str, s))}" for s, c in counts.items())
