"""The core: the three interfaces (backbone, objective, evaluator), the plugin hooks and registry, and what
every layer above shares — errors, declared options, atomic files, keyed randomness, masks, pure losses, modules
(queues, EMA, gathers) and checkpoint formats. Imports nothing from the other subpackages.
"""
