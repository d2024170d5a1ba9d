"""Building the pieces a recipe names: the Accelerator, the backbone (with its checkpoint) and the datasets."""

from __future__ import annotations

import os

import torch

from sslbench.core.errors import RecipeError, UserError
from sslbench.core.objective import DataInfo
from sslbench.data.geometry import image_size, normalisation
from sslbench.training.spec import Recipe

def make_accelerator(recipe: Recipe):
    """An Accelerator for the recipe: bf16 on GPU and fp32 on CPU under ``mixed_precision = "auto"``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    run = recipe.run
    cpu = run.cpu or not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in (
        "1", "true", "yes")
    precision = run.mixed_precision
    if precision == "auto":
        precision = "no" if cpu else "bf16"
    log_with = list(run.trackers) or None
    project_dir = os.path.join(run.output_dir, run.name, "trackers")
    return Accelerator(cpu=cpu, mixed_precision=precision, log_with=log_with, project_dir=project_dir,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])


def backbone_kwargs(recipe: Recipe, registry) -> dict:
    """build_backbone arguments: the recipe's overrides plus what the checkpoint format implies."""
    spec = recipe.backbone
    fmt = registry.get("checkpoint_format", spec.checkpoint_format).factory
    kwargs = {k: getattr(spec, k) for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")}
    kwargs["pos_embed"] = spec.pos_embed
    kwargs["model_args"] = dict(spec.model_args)
    if spec.checkpoint:
        kwargs.update(fmt.architecture)
    return kwargs


def build_model(recipe: Recipe, registry, load_weights: bool = True):
    """The backbone of a recipe, with its checkpoint loaded. Returns (backbone, load report or None).

    A checkpoint that pickles Python objects (fairseq's data2vec 2.0 files) is refused unless the recipe sets
    ``backbone.checkpoint_trusted = true``: unpickling runs code from the file.
    """
    from sslbench.core.backbone import build_backbone
    from sslbench.core.checkpoints import UntrustedPickle, load_checkpoint

    spec = recipe.backbone
    backbone = build_backbone(spec.model, **backbone_kwargs(recipe, registry))
    report = None
    if spec.checkpoint and load_weights:
        fmt = registry.get("checkpoint_format", spec.checkpoint_format).factory
        try:
            report = load_checkpoint(backbone, spec.checkpoint, fmt, allow_pickle=spec.checkpoint_trusted)
        except UntrustedPickle as exc:
            raise RecipeError("backbone.checkpoint_trusted",
                              f"{exc.path} pickles Python objects besides tensors ({exc.found}); loading it runs "
                              "code from the file. If you trust its source, set backbone.checkpoint_trusted = true "
                              "in the recipe (or re-save just its state dict)") from None
    return backbone, report


def load_source(table, registry, key: str):
    source = registry.get("dataset", table["source"]).factory
    options = {k: v for k, v in table.items() if k != "source"}
    try:
        return source.load(**options)
    except UserError as exc:
        raise UserError(f"{key}: {exc}") from None


def check_sources(recipe: Recipe, registry) -> None:
    """Each data source's quick check (a folder exists, the hub has the dataset and lets us in), before anything
    slow — building a large model, decoding images — is started."""
    data = recipe.data
    for key, table in (("data.train", data.train), ("data.test", data.test), ("data.eval_train", data.eval_train)):
        if table is None:
            continue
        source = registry.get("dataset", table["source"]).factory
        if getattr(source, "check", None) is not None:
            source.check(key, **{k: v for k, v in table.items() if k != "source"})


def load_datasets(recipe: Recipe, registry, accelerator=None) -> dict:
    """train, test and eval_train datasets (eval_train is train unless the recipe names another).

    The main process loads (and caches) first so that other processes read the cache instead of decoding again.
    """
    data = recipe.data

    def load_all():
        out = {"train": load_source(data.train, registry, "data.train"),
               "test": load_source(data.test, registry, "data.test")}
        out["eval_train"] = (load_source(data.eval_train, registry, "data.eval_train")
                             if data.eval_train else out["train"])
        return out

    if accelerator is None or accelerator.num_processes == 1:
        datasets = load_all()
    else:
        with accelerator.main_process_first():
            datasets = load_all()
    channels = recipe.backbone.in_chans
    for name, dataset in datasets.items():
        if channels is not None and dataset.channels != channels:
            raise RecipeError(f"data.{name}", f"images have {dataset.channels} channel(s) but backbone.in_chans is "
                                              f"{channels}; set the source's `channels` option")
    return datasets


def data_info(recipe: Recipe, dataset, backbone=None) -> DataInfo:
    mean, std = normalisation(recipe, dataset.channels)
    return DataInfo(image_size=image_size(recipe, backbone) or dataset.images.shape[-1], channels=dataset.channels,
                    mean=mean, std=std, num_samples=len(dataset))
