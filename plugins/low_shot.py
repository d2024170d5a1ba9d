"""Low-shot classification (MSN protocol, as in MIM-Refiner): a few labelled images per class, several splits.

The math is :func:`sslbench.evaluation.low_shot`: multinomial logistic regression without intercept on frozen
features that are centred and L2-normalised, L2 penalty λ = ``lam``/n, solved exactly with L-BFGS; the same seeded,
nested splits for every model. Nothing is tuned, so ``selection_split`` is ``"none"``.

Rows per setting (``1shot``, ``2shot``, ``5shot``, ``1pct``): ``top1`` (mean over the splits) and ``top1_std``
(sample standard deviation, 0 for one split), variant ``<setting>,<feature>``.

    [[eval]]
    name = "low_shot"
    shots = [1, 2, 5]
    fractions = [0.01]
    splits = 3
"""

from __future__ import annotations

import re

import sslbench
from sslbench.core.evaluator import FEATURE_OPTIONS, Evaluator, MetricValue, PerSample, feature_request, pick
from sslbench.evaluation import low_shot
from sslbench.core.options import Option


class LowShot(Evaluator):
    name = "low_shot"
    description = "logistic regression on k images per class / a fraction of labels, mean and std over splits"
    options = {
        "shots": Option([1, 2, 5], list, "labelled images per class", item_type=int, min=1),
        "fractions": Option([0.01], list, "fractions of the labels (stratified)", item_type=float, min=0, max=1,
                            min_exclusive=True),
        "splits": Option(3, int, "random splits per setting", min=1),
        "seed": Option(0, int, "seed of the splits", min=0),
        "lam": Option(0.00025, float, "L2 penalty λ·n (the penalty on the mean loss is lam/n)", min=0,
                      min_exclusive=True),
        "max_iter": Option(1000, int, "L-BFGS iterations at most", min=1),
        **FEATURE_OPTIONS,
    }

    def requests(self, depth):
        return [feature_request(self.opts, depth)]

    def evaluate(self, train, test, requests):
        o, (request,) = self.opts, requests
        scores, per_sample = low_shot(train.features[request], train.labels, test.features[request], test.labels,
                                      shots=o["shots"], fractions=o["fractions"], splits=o["splits"],
                                      seed=o["seed"], lam=o["lam"], max_iter=o["max_iter"], return_per_sample=True)
        rows = []
        for key, value in scores.items():
            setting, metric = key.split("_", 1)           # "1shot_top1_std" → ("1shot", "top1_std")
            record = PerSample("mean", per_sample[setting].numpy()) if metric == "top1" else None
            rows.append(MetricValue(metric, value, {"setting": setting, "feature": str(request)},
                                    extra={"splits": o["splits"]}, per_sample=record))
        return rows

    @classmethod
    def headlines(cls, results):
        # The smallest label fraction and the most shots asked for: MIM-Refiner's 1% and 5-shot columns by default
        settings = {f["setting"] for m, f, _ in results if m == "top1" and "setting" in f}
        shots = {int(s[:-len("shot")]): s for s in settings if re.fullmatch(r"\d+shot", s)}
        fractions = {float(s[:-len("pct")]): s for s in settings if re.fullmatch(r"[\d.]+pct", s)}
        chosen = {}
        if fractions:
            smallest = min(fractions)
            chosen[f"{smallest:g}% labels"] = pick(results, "top1", setting=fractions[smallest])
        if shots:
            chosen[f"{max(shots)}-shot"] = pick(results, "top1", setting=shots[max(shots)])
        return chosen


@sslbench.hookimpl
def register_evaluators(register):
    register("low_shot", LowShot)
