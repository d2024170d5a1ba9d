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

__version__ = "0.1.0"

from .errors import PluginError, RecipeError, UserError
from .evaluator import Evaluator, MetricValue
from .hookspecs import hookimpl
from .objective import DataInfo, Objective, StageContext
from .options import Option

__all__ = ["__version__", "hookimpl", "Objective", "Evaluator", "MetricValue", "Option", "DataInfo",
           "StageContext", "UserError", "RecipeError", "PluginError"]
