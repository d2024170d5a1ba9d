"""Clustering of frozen features (MIM-Refiner's protocol): k-means with k = number of classes, scored by the labels.

The math is :func:`sslbench.evaluation.clustering`: k-means (``n_init`` k-means++ restarts, the lowest inertia
wins) on L2-normalised features; ACC through the Hungarian matching of clusters to classes (scipy), NMI, AMI and
ARI from scikit-learn (percent); with ``silhouette = true`` also the silhouette and Davies-Bouldin scores on a
seeded subsample. k-means uses no labels and nothing is tuned, so ``selection_split`` is ``"none"``.

Rows: ``acc``, ``nmi``, ``ami``, ``ari`` (and ``silhouette``, ``davies_bouldin``), variant ``<split>,<feature>``.

    [[eval]]
    name = "clustering"
    split = "test"
"""

from __future__ import annotations

import sslbench
from sslbench.core.errors import UserError
from sslbench.core.evaluator import FEATURE_OPTIONS, Evaluator, MetricValue, PerSample, feature_request, pick
from sslbench.evaluation import clustering
from sslbench.evaluation.clustering import hungarian_matched
from sslbench.core.options import Option


class Clustering(Evaluator):
    name = "clustering"
    description = "k-means (k = classes) on frozen features: ACC (Hungarian), NMI, AMI, ARI"
    options = {
        "split": Option("test", str, "which features are clustered (the test set is smaller; k-means sees no "
                        "labels either way)", choices=("test", "train")),
        "n_init": Option(10, int, "k-means++ restarts; the lowest inertia wins", min=1),
        "max_iter": Option(300, int, "Lloyd iterations per restart at most", min=1),
        "seed": Option(0, int, "seed of the k-means++ seeding and of the silhouette subsample", min=0),
        "l2_normalize": Option(True, bool, "L2-normalise the features first (cosine geometry, as k-NN)"),
        "silhouette": Option(False, bool, "also the silhouette and Davies-Bouldin scores (on a subsample)"),
        "subsample": Option(10000, int, "rows for silhouette / Davies-Bouldin (silhouette is quadratic)", min=2),
        **FEATURE_OPTIONS,
    }

    def requests(self, depth):
        return [feature_request(self.opts, depth)]

    def check_data(self, train, test):
        split = train if self.opts["split"] == "train" else test
        if split.num_classes > split.num_samples or split.num_classes < 1:
            raise UserError(f"split: the {self.opts['split']} split has {split.num_samples} labelled images for "
                            f"{split.num_classes} clusters (one per class)")
        if self.opts["silhouette"] and split.num_classes < 2:
            raise UserError("silhouette: needs at least 2 classes in the clustered split")

    def evaluate(self, train, test, requests):
        o, (request,) = self.opts, requests
        split = train if o["split"] == "train" else test
        scores, assignment = clustering(split.features[request], split.labels, n_init=o["n_init"], seed=o["seed"],
                                        max_iter=o["max_iter"], silhouette=o["silhouette"],
                                        subsample=o["subsample"], l2_normalize=o["l2_normalize"],
                                        return_assignment=True)
        # Per-sample records on the test set only (intervals and paired tests resample test samples): ACC's
        # correctness under the matching found on all samples, NMI from the cluster ids.
        records = {}
        if o["split"] == "test":
            ids, labels = assignment.numpy(), split.labels.numpy()
            records = {"acc": PerSample("mean", hungarian_matched(ids, labels) == labels),
                       "nmi": PerSample("partition", ids)}
        return [MetricValue(metric, value, {"split": o["split"], "feature": str(request)},
                            per_sample=records.get(metric))
                for metric, value in scores.items()]

    @classmethod
    def headlines(cls, results):
        chosen = {"cluster ACC": pick(results, "acc"), "cluster NMI": pick(results, "nmi")}
        return {label: i for label, i in chosen.items() if i is not None}


@sslbench.hookimpl
def register_evaluators(register):
    register("clustering", Clustering)
