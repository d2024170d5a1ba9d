"""Linear probe (DINOv2 style): a sweep of linear heads on frozen features, the best chosen on held-out train rows.

The math is :func:`sslbench.evaluation.linear_probe` (all heads of a feature variant trained together, SGD with
momentum, cosine schedule, optional BatchNorm without affine); this plugin builds the feature variants from the
cached block outputs and names the rows.

Feature variants are DINOv2's (``n_last_blocks`` × ``avgpool``): the CLS tokens of the last 1 or 4 blocks,
concatenated, optionally followed by the mean of the last block's patch tokens. Variant names read ``last4+mean``.
A backbone with fewer blocks than asked uses all it has (``last4`` of a 2-block ViT is its 2 CLS tokens).
``pool = "mean_fc_norm"`` appends the patch mean through a LayerNorm instead (the checkpoint's ``fc_norm`` if it
has one: data2vec 2.0's feature, ``last4+mean_fc_norm``), and ``n_last_blocks = 0`` leaves the CLS tokens out —
``n_last_blocks = [0]``, ``avgpool = [true]``, ``pool = "mean_fc_norm"`` is data2vec 2.0's own linear probe
(variant ``mean_fc_norm``). A combination with neither CLS tokens nor a mean (0 blocks, no avgpool) is skipped.

Rows (``selection_split`` of every row names the held-out split that chose the head; the test set never does):

* ``top1`` / ``best``: test accuracy of the head with the best held-out accuracy over the whole sweep; its
  configuration (feature variant, BatchNorm, learning rate, held-out accuracy) is in ``extra``, written to the
  ``details`` column of ``metrics.csv``;
* ``val_top1`` / ``best``: that head's held-out accuracy;
* ``top1`` / ``<variant>``: for every feature variant, the test accuracy of its own best head (chosen the same way).

    [[eval]]
    name = "linear_probe"
    n_last_blocks = [1, 4]
    avgpool = [false, true]
    epochs = 30
"""

from __future__ import annotations

import itertools

import torch

import sslbench
from sslbench.core.evaluator import Evaluator, MetricValue, PerSample, pick
from sslbench.evaluation import linear_probe
from sslbench.evaluation.linear_probe import DINOV2_LRS
from sslbench.core.evaluator import FeatureRequest
from sslbench.core.options import Option


def variant_name(n_blocks: int, avgpool: bool, pool: str = "mean") -> str:
    """``last4+mean``; ``last1``; ``mean_fc_norm`` (no CLS tokens)."""
    if n_blocks == 0:
        return pool
    return f"last{n_blocks}" + (f"+{pool}" if avgpool else "")


class LinearProbe(Evaluator):
    name = "linear_probe"
    description = "linear heads on frozen features, lr × feature-variant sweep, chosen on a held-out part of train"
    options = {
        "n_last_blocks": Option([1, 4], list, "feature variants: CLS tokens of the last n blocks, concatenated "
                                "(0: none, the pooled patch feature alone)", item_type=int, min=0),
        "avgpool": Option([False, True], list, "feature variants: without / with the mean of the last block's "
                          "patch tokens appended", item_type=bool),
        "pool": Option("mean", str, "what avgpool appends: the patch mean (DINOv2) or the patch mean through a "
                       "LayerNorm (data2vec 2.0; the checkpoint's fc_norm if it has one)",
                       choices=("mean", "mean_fc_norm"), omit_default=True),
        "norm": Option("normed", str, "tokens after the final norm (DINOv2) or the raw residual stream",
                       choices=("normed", "raw")),
        "lrs": Option(list(DINOV2_LRS), list, "learning rates (DINOv2's 13-value grid), × batch_size/256 when "
                      "scale_lr_by_batch", item_type=float, min=0),
        "scale_lr_by_batch": Option(True, bool, "multiply every lr by batch_size/256"),
        "batchnorm": Option([True], list, "BatchNorm(affine=False) before the head (MAE protocol); [true, false] "
                            "sweeps both", item_type=bool),
        "epochs": Option(30, int, "passes over the fitting rows", min=1),
        "batch_size": Option(256, int, "rows per SGD step", min=1),
        "val_fraction": Option(0.1, float, "stratified fraction of train held out to choose the head", min=0, max=0.5,
                               min_exclusive=True),
        "seed": Option(0, int, "seed of the held-out split, the initialisation and the batch order", min=0),
    }

    def _variants(self) -> list[tuple[int, bool]]:
        pairs = itertools.product(self.opts["n_last_blocks"], self.opts["avgpool"])
        return list(dict.fromkeys((n, avgpool) for n, avgpool in pairs if n > 0 or avgpool))

    def check_data(self, train, test):
        from sslbench.core.errors import UserError

        # The same rule as stratified_holdout: round(f·n_c) rows of each class with ≥ 2 images, at least 1.
        held_out = sum(min(max(1, round(c * self.opts["val_fraction"])), c - 1) for c in train.class_counts if c >= 2)
        if held_out == 0:
            raise UserError(f"val_fraction: {self.opts['val_fraction']} of the {train.num_samples} evaluation "
                            "training images leaves no held-out images to choose the head (every class needs ≥ 2)")

    def layout(self, depth: int) -> dict[str, list[FeatureRequest]]:
        """Each feature variant's name and the requests it concatenates, for a backbone of ``depth`` blocks."""
        norm, pool = self.opts["norm"], self.opts["pool"]
        layout: dict[str, list[FeatureRequest]] = {}
        for n_blocks, avgpool in self._variants():
            parts = [FeatureRequest(b, "cls", norm) for b in range(max(0, depth - n_blocks), depth)]
            if avgpool:
                parts.append(FeatureRequest(depth - 1, pool, norm))
            layout[variant_name(n_blocks, avgpool, pool)] = parts
        if not layout:
            from sslbench.core.errors import UserError

            raise UserError("linear_probe: n_last_blocks and avgpool give no feature variant (each must list at "
                            "least one value; n_last_blocks = 0 needs avgpool = true)")
        return layout

    def requests(self, depth):
        return sorted({r for parts in self.layout(depth).values() for r in parts}, key=str)

    def evaluate(self, train, test, requests):
        depth = 1 + max(r.block for r in requests)          # every variant ends at the last block
        variants = {name: (torch.cat([train.features[r] for r in parts], dim=1),
                           torch.cat([test.features[r] for r in parts], dim=1))
                    for name, parts in self.layout(depth).items()}
        o = self.opts
        _, result = linear_probe(None, train.labels, None, test.labels, variants=variants, lrs=o["lrs"],
                                 epochs=o["epochs"], batch_size=o["batch_size"], batchnorm=o["batchnorm"],
                                 val_fraction=o["val_fraction"], seed=o["seed"],
                                 scale_lr_by_batch=o["scale_lr_by_batch"], return_result=True)
        split, chosen, norm = result.selection_split, result.chosen, o["norm"]
        config = {"variant": chosen.variant, "batchnorm": chosen.batchnorm, "lr": chosen.lr,
                  "val_top1": round(chosen.val_top1, 4)}
        rows = [MetricValue("top1", chosen.test_top1, {"head": "best", "stream": norm}, split, config,
                            per_sample=_per_sample(chosen)),
                MetricValue("val_top1", chosen.val_top1, {"head": "best", "stream": norm}, split, config)]
        for name in variants:
            heads = [h for h in result.heads if h.variant == name]
            best = max(heads, key=lambda h: h.val_top1)          # first of equal values, like the overall choice
            rows.append(MetricValue("top1", best.test_top1, {"head": name, "stream": norm}, split,
                                    {"batchnorm": best.batchnorm, "lr": best.lr, "val_top1": round(best.val_top1, 4)},
                                    per_sample=_per_sample(best)))
        return rows

    @classmethod
    def headlines(cls, results):
        chosen = pick(results, "top1", head="best")
        return {} if chosen is None else {"linear top-1": chosen}


def _per_sample(head) -> PerSample | None:
    return None if head.test_correct is None else PerSample("mean", head.test_correct.numpy())


@sslbench.hookimpl
def register_evaluators(register):
    register("linear_probe", LinearProbe)
