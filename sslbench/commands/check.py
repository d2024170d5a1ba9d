"""`sslbench check`: validate a recipe and show what a run would do — resolved recipe, hashes, parameter counts and
the stage plan — without loading data or training. Models are built on the ``meta`` device, so even a ViT-H
recipe checks in seconds and without memory."""

from __future__ import annotations

from typing import Sequence

import torch

from sslbench.core.errors import RecipeError
from sslbench.core.registry import get_registry
from sslbench.training.context import RunContext
from sslbench.training.optim import base_lr, frozen_names
from sslbench.training.recipe import load_recipe, to_toml


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def check_recipe(path: str, allow_missing: bool = False, overrides: Sequence[str] = ()) -> int:
    try:
        return _check(path, allow_missing, overrides)
    except RecipeError as exc:  # raised while building: name the recipe file
        raise (exc if exc.source else exc.with_source(str(path))) from None


def _check(path: str, allow_missing: bool, overrides: Sequence[str]) -> int:
    registry = get_registry()
    recipe = load_recipe(path, registry, check_files=not allow_missing, overrides=overrides)
    print(f"# {path}: valid")
    print(f"# recipe hash   {recipe.recipe_hash[:16]}")
    print(f"# protocol hash {recipe.protocol_hash[:16]}")
    print(to_toml(recipe))
    checkpoint = recipe.backbone.checkpoint
    from pathlib import Path

    if checkpoint and not Path(checkpoint).is_file():
        print(f"# warning: backbone.checkpoint {checkpoint} is not on this machine")
    for i, stage in enumerate(recipe.stages):
        if stage.teacher is not None and not Path(stage.teacher.checkpoint).is_file():
            print(f"# warning: stages[{i}].teacher.checkpoint {stage.teacher.checkpoint} is not on this machine")
    with torch.device("meta"):
        context = RunContext.build(recipe, registry, data="none", load_weights=False, accelerator=False)
        backbone = context.backbone
        print(f"Backbone {recipe.backbone.model}: {_millions(_count(backbone.parameters()))} parameters, "
              f"{backbone.depth} blocks, width {backbone.embed_dim}, {backbone.num_patches} patches")
        for i, objective, carried_over in context.stage_objectives():
            stage = recipe.stages[i]
            carried = " (carried over)" if carried_over else ""
            frozen = frozen_names(objective, stage.freeze, backbone.depth, f"stages[{i}].freeze")
            named = dict(objective.named_parameters())
            heads = _count(p for n, p in named.items() if not n.startswith("backbone."))
            trainable = _count(p for n, p in named.items() if n not in frozen)
            peak, final = base_lr(stage)
            length = f"{stage.steps} steps" if stage.steps else f"{stage.epochs:g} epochs"
            print(f"Stage {i} {stage.name!r}: {stage.objective}{carried}, {length}, batch {stage.batch_size}"
                  f" (accum {stage.grad_accum}), lr {peak:.3g} → {final:.3g} ({stage.schedule.kind}), "
                  f"layer decay {stage.layer_decay:g}, EMA {stage.ema_momentum:g}")
            print(f"    objective modules {_millions(heads)}; trainable {_millions(trainable)} of "
                  f"{_millions(_count(named.values()))}; frozen: {', '.join(stage.freeze) or 'nothing'}")
            if stage.teacher is not None and not carried_over:
                network = objective.teacher.network
                print(f"    teacher {stage.teacher.model}: {_millions(_count(network.parameters()))} parameters, "
                      f"{network.depth} blocks, width {network.embed_dim}, frozen (not trained, not in "
                      f"checkpoints); {stage.teacher.checkpoint} ({stage.teacher.checkpoint_format})")
    for e, evaluator in zip(recipe.eval, context.evaluators):
        opts = ", ".join(f"{k}={v}" for k, v in {"use_ema": e.use_ema, **e.options}.items())
        print(f"Evaluate {e.name}: {opts} ({len(evaluator.requests(backbone.depth))} feature request(s))")
    return 0
