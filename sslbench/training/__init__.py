"""Training: the validated recipe, building what it names (accelerator, backbone, data), the optimiser and
schedules, the Accelerate trainer, resume checkpoints, the run folder, the :class:`Run` that ties them together,
and publishing a run's rows. Imports the layers below it.
"""
