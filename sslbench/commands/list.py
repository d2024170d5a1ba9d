"""`sslbench list`: every registered name, the plugin that gave it, and the plugins that failed to load."""

from __future__ import annotations

from sslbench.core.registry import KINDS, get_registry


def _summary(factory) -> str:
    text = getattr(factory, "description", "") or (factory.__doc__ or "").strip().splitlines()[0:1]
    return text if isinstance(text, str) else (text[0] if text else "")


def print_listing(options: bool = False) -> int:
    registry = get_registry()
    titles = {"objective": "Objectives", "evaluator": "Evaluators", "checkpoint_format": "Checkpoint formats",
              "dataset": "Datasets"}
    for kind in KINDS:
        print(f"{titles[kind]}:")
        for name in registry.names(kind):
            entry = registry.entries[kind][name]
            print(f"  {name:<20} [plugin: {entry.plugin}]  {_summary(entry.factory)}")
            if options:
                for key, option in getattr(entry.factory, "options", {}).items():
                    default = "" if option.required else f" = {option.default!r}"
                    print(f"      {key}{default}: {option.doc} ({option.describe()})")
        print()
    if registry.failed:
        print("Plugins that failed to load:")
        for failed in registry.failed:
            print(f"  {failed.name} ({failed.value}): {failed.error}")
    return 0
