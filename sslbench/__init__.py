"""sslbench — benchmark and refine self-supervised vision pre-training, fairly.

Same backbone, same data, same evaluation protocol for every objective: MAE, MIM-Refiner, MAE-CT, ConMIM,
MimCo-style and MiCL ship as plugins, and a third-party objective registers the same way.

Plugin authors import from here::

    import sslbench

    @sslbench.hookimpl
    def register_objectives(register):
        register("my_objective", MyObjective)
"""

from __future__ import annotations

from sslbench.core.errors import PluginError, RecipeError, UserError
from sslbench.core.hookspecs import hookimpl
from sslbench.core.version import __version__

# The rest of the public API imports torch (seconds); it is loaded on first use, so `sslbench --help` and
# `--version` answer at once (PEP 562 module __getattr__).
_LAZY = {"Evaluator": "sslbench.core.evaluator", "MetricValue": "sslbench.core.evaluator",
         "PerSample": "sslbench.core.evaluator", "Batch": "sslbench.core.objective",
         "DataInfo": "sslbench.core.objective", "Objective": "sslbench.core.objective",
         "StageContext": "sslbench.core.objective", "Option": "sslbench.core.options"}

__all__ = ["__version__", "hookimpl", "Objective", "Evaluator", "MetricValue", "PerSample", "Option", "DataInfo",
           "Batch", "StageContext", "UserError", "RecipeError", "PluginError"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sslbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
