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
from sslbench.core.evaluator import Evaluator, MetricValue, PerSample
from sslbench.core.hookspecs import hookimpl
from sslbench.core.objective import Batch, DataInfo, Objective, StageContext
from sslbench.core.options import Option
from sslbench.core.version import __version__

__all__ = ["__version__", "hookimpl", "Objective", "Evaluator", "MetricValue", "PerSample", "Option", "DataInfo",
           "Batch", "StageContext", "UserError", "RecipeError", "PluginError"]
