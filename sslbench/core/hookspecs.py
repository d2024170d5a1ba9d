"""The hooks a plugin implements. Each receives a ``register(name, factory)`` callback.

A plugin module (first-party in ``plugins/`` or any installed package) declares an entry point in the ``sslbench``
group and implements any of these with ``@sslbench.hookimpl``. Registering through a callback, rather than returning
values, lets the core name *both* plugins when two register the same name.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("sslbench")
hookimpl = pluggy.HookimplMarker("sslbench")


@hookspec
def register_objectives(register):
    """Register training objectives: ``register(name, objective_class)`` (a subclass of ``sslbench.Objective``)."""


@hookspec
def register_evaluators(register):
    """Register evaluators: ``register(name, evaluator_class)`` (a subclass of ``sslbench.Evaluator``)."""


@hookspec
def register_checkpoint_formats(register):
    """Register checkpoint formats: ``register(name, CheckpointFormat)`` to load official weights into a backbone."""


@hookspec
def register_datasets(register):
    """Register data sources: ``register(name, DataSource)`` usable as ``source = "<name>"`` in a recipe."""
