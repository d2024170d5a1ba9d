"""k-NN evaluation (DINO style): cosine similarity, the k nearest training samples vote with weight exp(sim/τ).

MIM-Refiner first standardises every feature dimension with the training set's statistics (``standardize``).
The math is :func:`sslbench.evaluation.knn`; this plugin maps recipe options to it and names the rows.

    [[eval]]
    name = "knn"
    k = [10, 20]
    temperature = 0.07
"""

from __future__ import annotations

import sslbench
from sslbench.core.errors import UserError
from sslbench.core.evaluator import (FEATURE_OPTIONS, Evaluator, FeatureRequest, MetricValue, PerSample,
                                     feature_request, pick)
from sslbench.evaluation import knn
from sslbench.evaluation.knn import correct_in_top
from sslbench.core.options import Option


class KNN(Evaluator):
    name = "knn"
    description = "weighted k-nearest-neighbour accuracy on frozen features"
    options = {
        "k": Option([10, 20], list, "numbers of neighbours", item_type=int, min=1),
        "temperature": Option(0.07, float, "vote weight exp(sim/τ)", min=0, min_exclusive=True),
        "standardize": Option(False, bool, "standardise each dimension with the training mean/std first"),
        **FEATURE_OPTIONS,
    }

    def requests(self, depth):
        return [feature_request(self.opts, depth)]

    def check_data(self, train, test):
        if max(self.opts["k"]) > train.num_samples:
            raise UserError(f"k: got {max(self.opts['k'])} neighbours, but the evaluation training set has only "
                            f"{train.num_samples} images")

    def evaluate(self, train, test, requests):
        request, = requests
        scores, rankings = knn(train.features[request], train.labels, test.features[request], test.labels,
                               k=tuple(self.opts["k"]), temperature=self.opts["temperature"],
                               standardize=self.opts["standardize"], return_predictions=True)
        rows = []
        for key, value in scores.items():                  # "top1@k=20"
            metric, _, k = key.partition("@k=")
            correct = correct_in_top(rankings[int(k)], test.labels, int(metric[len("top"):]))
            rows.append(MetricValue(metric, value, {"k": int(k), "feature": str(request),
                                                    "std": self.opts["standardize"]},
                                    per_sample=PerSample("mean", correct.numpy())))
        return rows

    @classmethod
    def headlines(cls, results):
        # DINO's and MIM-Refiner's k = 20 where measured (else the largest k), on the deepest block asked for
        def prefer(fields):
            block = FeatureRequest.parse(fields["feature"]).block if "feature" in fields else 0
            return fields.get("k") == 20, fields.get("k", 0), block, not fields.get("std", False)
        chosen = pick(results, "top1", prefer)
        return {} if chosen is None else {"k-NN top-1": chosen}


@sslbench.hookimpl
def register_evaluators(register):
    register("knn", KNN)
