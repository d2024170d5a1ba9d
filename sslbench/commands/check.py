"""`sslbench check`: validate a recipe and show what a run would do — resolved recipe, hashes, parameter counts and
the stage plan — without loading data or training. Models are built on the ``meta`` device, so even a ViT-H
recipe checks in seconds and without memory."""

from __future__ import annotations

import torch

from sslbench.evaluation.suite import build_evaluators
from sslbench.core.objective import StageContext
from sslbench.training.optim import base_lr, frozen_names
from sslbench.core.registry import get_registry
from sslbench.training.recipe import load_recipe, protocol_hash, recipe_hash, to_toml
from sslbench.training.assembly import build_model


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def check_recipe(path: str, allow_missing: bool = False) -> int:
    registry = get_registry()
    recipe = load_recipe(path, registry, check_files=not allow_missing)
    print(f"# {path}: valid")
    print(f"# recipe hash   {recipe_hash(recipe)[:16]}")
    print(f"# protocol hash {protocol_hash(recipe)[:16]}")
    print(to_toml(recipe))
    checkpoint = recipe["backbone"]["checkpoint"]
    from pathlib import Path

    if checkpoint and not Path(checkpoint).is_file():
        print(f"# warning: backbone.checkpoint {checkpoint} is not on this machine")
    with torch.device("meta"):
        backbone, _ = build_model(recipe, registry, load_weights=False)
        print(f"Backbone {recipe['backbone']['model']}: {_millions(_count(backbone.parameters()))} parameters, "
              f"{backbone.depth} blocks, width {backbone.embed_dim}, {backbone.num_patches} patches")
        objective = None
        for i, stage in enumerate(recipe["stages"]):
            context = StageContext(i, 1, 1, 1, 0, recipe["run"]["seed"])
            if objective is not None and objective.name == stage["objective"]:
                objective.start_stage(stage["options"], context)
                carried = " (carried over)"
            else:
                factory = registry.get("objective", stage["objective"]).factory
                objective = factory(backbone, stage["options"], context)
                carried = ""
            frozen = frozen_names(objective, stage["freeze"], backbone.depth, f"stages[{i}].freeze")
            named = dict(objective.named_parameters())
            heads = _count(p for n, p in named.items() if not n.startswith("backbone."))
            trainable = _count(p for n, p in named.items() if n not in frozen)
            peak, final = base_lr(stage)
            length = f"{stage['steps']} steps" if stage["steps"] else f"{stage['epochs']:g} epochs"
            print(f"Stage {i} {stage['name']!r}: {stage['objective']}{carried}, {length}, batch {stage['batch_size']}"
                  f" (accum {stage['grad_accum']}), lr {peak:.3g} → {final:.3g} ({stage['schedule']['kind']}), "
                  f"layer decay {stage['layer_decay']:g}, EMA {stage['ema_momentum']:g}")
            print(f"    objective modules {_millions(heads)}; trainable {_millions(trainable)} of "
                  f"{_millions(_count(named.values()))}; frozen: {', '.join(stage['freeze']) or 'nothing'}")
    evaluators = build_evaluators(registry, recipe["eval"], backbone.depth, source=str(path))
    for e, evaluator in zip(recipe["eval"], evaluators):
        opts = ", ".join(f"{k}={v}" for k, v in e.items() if k != "name")
        print(f"Evaluate {e['name']}: {opts} ({len(evaluator.requests(backbone.depth))} feature request(s))")
    return 0
