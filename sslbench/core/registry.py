"""Plugin discovery (pluggy + entry points) and the four registries built from it.

Every objective, evaluator, checkpoint format and data source, first-party or not, arrives through the entry-point
group ``sslbench``. A plugin that fails to import is remembered with its error (``sslbench list`` shows it) and the
others keep working; two plugins registering one name is an error naming both.

``SSLBENCH_PLUGINS=mae,knn`` restricts loading to the named entry points (useful to isolate a broken plugin);
``SSLBENCH_PLUGINS=`` (empty) loads none.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from sslbench.core import hookspecs
from sslbench.core.errors import PluginError

ENTRY_POINT_GROUP = "sslbench"
KINDS = {
    "objective": "register_objectives",
    "evaluator": "register_evaluators",
    "checkpoint_format": "register_checkpoint_formats",
    "dataset": "register_datasets",
}


@dataclass
class Registered:
    name: str
    kind: str
    factory: Any
    plugin: str  # the entry-point (or module) name that registered it


@dataclass
class FailedPlugin:
    name: str
    value: str  # the entry point's target, e.g. "my_pkg.plugin"
    error: str  # one line
    details: str  # full traceback, for --debug


@dataclass
class Registry:
    """All names of all kinds, plus the plugins that failed to load."""

    entries: dict[str, dict[str, Registered]] = field(default_factory=lambda: {k: {} for k in KINDS})
    plugins: list[str] = field(default_factory=list)
    failed: list[FailedPlugin] = field(default_factory=list)

    def get(self, kind: str, name: str) -> Registered:
        try:
            return self.entries[kind][name]
        except KeyError:
            known = ", ".join(sorted(self.entries[kind])) or "(none registered)"
            raise PluginError(f"unknown {kind} {name!r}; registered: {known}") from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])


def _selected(name: str) -> bool:
    only = os.environ.get("SSLBENCH_PLUGINS")
    if only is None:
        return True
    return name in {n.strip() for n in only.split(",") if n.strip()}


def build_registry(extra_modules: dict[str, object] | None = None) -> Registry:
    """Load every entry point of the ``sslbench`` group and collect what each registers.

    ``extra_modules`` maps a plugin name to an already imported module or object with hook implementations
    (used by tests and by code that registers plugins programmatically).
    """
    manager = pluggy.PluginManager("sslbench")
    manager.add_hookspecs(hookspecs)
    registry = Registry()
    loaded: list[tuple[str, object]] = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if not _selected(ep.name) or ep.name in registry.plugins:
            continue
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            registry.failed.append(FailedPlugin(ep.name, ep.value, f"{type(exc).__name__}: {exc}",
                                                traceback.format_exc()))
            continue
        loaded.append((ep.name, module))
    loaded.extend((extra_modules or {}).items())

    for plugin_name, module in loaded:
        try:
            manager.register(module, name=plugin_name)
        except ValueError as exc:  # pluggy refuses a module registered twice under two names
            registry.failed.append(FailedPlugin(plugin_name, repr(module), str(exc), traceback.format_exc()))
            continue
        registry.plugins.append(plugin_name)

    for kind, hook_name in KINDS.items():
        table = registry.entries[kind]
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            plugin_name = manager.get_name(impl.plugin)

            def register(name: str, factory: Any, _plugin=plugin_name, _kind=kind, _table=table) -> None:
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {_plugin!r} registered a {_kind} with an invalid name {name!r}")
                if name in _table:
                    raise PluginError(f"{_kind} {name!r} is registered by two plugins: "
                                      f"{_table[name].plugin!r} and {_plugin!r}")
                _table[name] = Registered(name, _kind, factory, _plugin)

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:
                registry.failed.append(FailedPlugin(plugin_name, hook_name, f"{type(exc).__name__}: {exc}",
                                                    traceback.format_exc()))
    return registry


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = build_registry()
    return _REGISTRY
