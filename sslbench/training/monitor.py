"""Online monitoring (``[monitor]``): a k-NN on a fixed held-out subset every few epochs (or steps) of training.

A 20-epoch refinement otherwise runs blind until its final evaluation. With ``[monitor] every_epochs = 1`` the
trainer extracts frozen features of a fixed subset — ``train_samples`` images of ``data.eval_train`` as the memory,
``test_samples`` images of ``data.test`` as the queries — and writes the weighted k-NN accuracy (DINO protocol,
:func:`sslbench.evaluation.knn`) to ``log.jsonl`` as a line of its own::

    {"kind": "monitor", "stage": 0, "stage_name": "mae", "step": 44, "global_step": 44, "epoch": 4.0,
     "knn_top1": 71.3, "knn_top5": 96.2, "ema": false, "monitor_seconds": 1.8, "time": ...}

and to the run's trackers (``monitor/knn_top1``, ...). ``sslbench report`` draws these lines as a learning curve.

What it promises:

* **the same images everywhere** — the subsets are drawn by a generator of a fixed seed, independent of
  ``run.seed``, so the curves of all runs and seeds on one dataset are measured on the same images;
* **it changes nothing that training computes** — it consumes no random number (the global torch, NumPy and Python
  random states are restored around it, although nothing in it draws from them), puts back every module's train/eval
  mode, runs under ``torch.inference_mode`` and never touches the objective's state, so a monitored run trains
  bit-identically to an unmonitored one (tests/test_monitor.py); the whole section is therefore left out of the
  recipe hash;
* **a resume rewrites it exactly** — a monitor line of step ``s`` is written before any checkpoint of step ``s``,
  so the log a resumed run keeps (lines up to its checkpoint) and writes again equals an uninterrupted run's;
* **its time is not training time** — the monitor's seconds are left out of the next training line's
  ``images_per_s``, so the budget (``sslbench.results.budget``) counts training only.

Features are extracted as the evaluation does (:func:`sslbench.evaluation.features.extract_features`: each process
a contiguous shard, gathered in order) but never cached, since the weights change; the k-NN runs on the main
process. The cost is one forward pass over ``train_samples + test_samples`` images (docs/runs.md, "Online
monitoring", gives a measured ratio to an epoch of training).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from sslbench.core.errors import RecipeError, UserError
from sslbench.core.evaluator import feature_request

__all__ = ["Monitor", "preflight_monitor", "subset_indices", "SUBSET_SEEDS"]

#: Seeds of the subsets' generator: fixed, so every run and every seed monitors the same images.
SUBSET_SEEDS = {"memory": 20261205, "queries": 20261206}


def subset_indices(num_samples: int, samples: int, seed: int) -> torch.Tensor:
    """``samples`` distinct indices of ``range(num_samples)`` (all of them for 0), sorted, from a generator of its
    own (the global random state is not touched)."""
    if samples == 0 or samples >= num_samples:
        return torch.arange(num_samples)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_samples, generator=generator)[:samples].sort().values


def preflight_monitor(recipe, datasets: dict, depth: int) -> None:
    """The checks of ``[monitor]`` that need the data and the backbone, before the run folder is made; a problem is
    a :class:`RecipeError` naming the key."""
    spec = recipe.monitor
    if not spec.enabled:
        return
    try:
        feature_request({"block": spec.block, "token": spec.token, "norm": spec.norm}, depth)
    except UserError as err:
        raise RecipeError("monitor.block", str(err).removeprefix("block: ")) from None
    for key, split, source in (("train_samples", "eval_train", "data.eval_train" if recipe.data.eval_train
                                else "data.train"), ("test_samples", "test", "data.test")):
        dataset = datasets[split]
        if int((dataset.labels < 0).sum()):
            raise RecipeError(f"monitor.{key}", f"the k-NN needs labels, but {source} ({dataset.name}) has none")
        wanted = getattr(spec, key)
        if wanted > len(dataset):
            raise RecipeError(f"monitor.{key}", f"got {wanted}, but {source} has only {len(dataset)} images "
                                                f"(0: all of them)")
    memory = spec.train_samples or len(datasets["eval_train"])
    if spec.k > memory:
        raise RecipeError("monitor.k", f"got {spec.k} neighbours, but the memory has only {memory} images")


@contextmanager
def untouched(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Restore the global random states and every module's train/eval mode afterwards."""
    from sslbench.training.resume import rng_state, set_rng_state

    modes = [(m, m.training) for module in modules for m in module.modules()]
    plain, tensors = rng_state()
    try:
        yield
    finally:
        set_rng_state(plain, tensors)
        for module, mode in modes:
            module.training = mode


class Monitor:
    """The online k-NN of a recipe's ``[monitor]`` (build only when ``recipe.monitor.enabled``)."""

    def __init__(self, recipe, datasets: dict, accelerator, backbone):
        from sslbench.data.geometry import image_size, normalisation
        from sslbench.data.views import EvalTransform

        self.spec = spec = recipe.monitor
        preflight_monitor(recipe, datasets, backbone.depth)
        self.accelerator = accelerator
        self.request = feature_request({"block": spec.block, "token": spec.token, "norm": spec.norm}, backbone.depth)
        train, test = datasets["eval_train"], datasets["test"]
        self.memory = train.subset(subset_indices(len(train), spec.train_samples, SUBSET_SEEDS["memory"]))
        self.queries = test.subset(subset_indices(len(test), spec.test_samples, SUBSET_SEEDS["queries"]))
        mean, std = normalisation(recipe, test.channels)
        self.transform = EvalTransform(image_size(recipe, backbone), mean=mean, std=std)
        self.batch_size = recipe.data.eval_batch_size

    def interval(self, steps_per_epoch: int) -> int:
        """Optimiser steps between two measurements in a stage of ``steps_per_epoch`` steps an epoch."""
        if self.spec.every_steps:
            return self.spec.every_steps
        return max(1, round(self.spec.every_epochs * steps_per_epoch))

    def due(self, step: int, total_steps: int, steps_per_epoch: int) -> bool:
        """Whether to measure after ``step`` steps of a stage: every interval, and at the stage's last step."""
        return step % self.interval(steps_per_epoch) == 0 or step == total_steps

    def measure(self, backbone: nn.Module, keep: Iterable[nn.Module] = ()) -> tuple[dict[str, float], float]:
        """``({"knn_top1": .., "knn_top5": ..}, seconds)`` of ``backbone`` (an empty dict on processes other than
        the main one); every process must call it. ``keep``: modules whose modes are restored besides the
        backbone's (the objective)."""
        from sslbench.evaluation.features import extract_features
        from sslbench.evaluation.knn import knn

        start = time.perf_counter()
        acc = self.accelerator
        with untouched([backbone, *keep]):
            kwargs = dict(transform=self.transform, batch_size=self.batch_size, accelerator=acc, cache_dir=None,
                          progress=False)                       # no cache: the weights change every step
            memory = extract_features(backbone, self.memory, [self.request], **kwargs)[self.request]
            queries = extract_features(backbone, self.queries, [self.request], **kwargs)[self.request]
            scores = {}
            if acc is None or acc.is_main_process:
                k = self.spec.k
                values = knn(memory, self.memory.labels, queries, self.queries.labels, k=(k,),
                             temperature=self.spec.temperature, standardize=self.spec.standardize)
                scores = {f"knn_{metric.partition('@')[0]}": value for metric, value in values.items()}
        return scores, time.perf_counter() - start
