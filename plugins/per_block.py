"""Layer-wise k-NN probe: k-NN accuracy of the CLS token of every block, raw and after the final norm.

``token`` pools every block another way (``mean``, or ``mean_fc_norm``: the patch mean through a LayerNorm, data2vec
2.0's feature); its rows then carry a ``token`` field (variant ``k=<k>,block=<i>,<stream>,<token>[,std]``).

The curve behind MIM-Refiner (Alkin et al. 2024, figure 1): a MIM model's representation peaks in an intermediate
block, a refined one at the end. The math is :func:`sslbench.evaluation.per_block` (DINO k-NN per block).

Rows: ``top1`` (and ``top5``) with the fields ``k``, ``block`` (numbered from 0), ``stream`` (raw or normed) and
``std`` (variant text ``k=<k>,block=<i>,<stream>[,std]``). The
evaluator only returns rows; whoever writes a run's rows (``sslbench.training.publish``) also writes the table
(``per_block.csv``) and the curve (``per_block.png``) beside its ``metrics.csv``, and ``sslbench leaderboard
--plots`` draws the curves of every run — so the plot is always made from exactly the rows that were recorded.

    [[eval]]
    name = "per_block"
    k = [10, 20]
    norm = "both"
"""

from __future__ import annotations

import sslbench
from sslbench.core.errors import UserError
from sslbench.core.evaluator import TOKENS, Evaluator, MetricValue, PerSample
from sslbench.evaluation import per_block
from sslbench.evaluation.knn import correct_in_top
from sslbench.core.evaluator import FeatureRequest
from sslbench.core.options import Option


class PerBlock(Evaluator):
    name = "per_block"
    description = "k-NN accuracy of every block's CLS token (raw and normed): where the representation peaks"
    options = {
        "k": Option([10, 20], list, "numbers of neighbours", item_type=int, min=1),
        "temperature": Option(0.07, float, "vote weight exp(sim/τ)", min=0, min_exclusive=True),
        "standardize": Option(False, bool, "standardise each dimension with the training mean/std first"),
        "norm": Option("both", str, "token stream: the raw residual stream, after the final norm, or both",
                       choices=("both", "raw", "normed")),
        "blocks": Option([], list, "blocks to probe (0-based, negatives from the end); empty: every block",
                         item_type=int),
        "token": Option("cls", str, "which token(s) of every block: CLS, the patch mean, both, or the patch mean "
                        "through a LayerNorm (mean_fc_norm)", choices=TOKENS, omit_default=True),
    }

    def requests(self, depth):
        norms = ["raw", "normed"] if self.opts["norm"] == "both" else [self.opts["norm"]]
        blocks = self.opts["blocks"] or list(range(depth))
        outside = [b for b in blocks if not -depth <= b < depth]
        if outside:
            raise UserError(f"blocks: {outside} outside -{depth}..{depth - 1} for a backbone with {depth} blocks")
        token = self.opts["token"]
        return [FeatureRequest(b, token, norm) for norm in norms for b in sorted({b % depth for b in blocks})]

    def check_data(self, train, test):
        if max(self.opts["k"]) > train.num_samples:
            raise UserError(f"k: got {max(self.opts['k'])} neighbours, but the evaluation training set has only "
                            f"{train.num_samples} images")

    def evaluate(self, train, test, requests):
        o = self.opts
        layout: dict[str, dict[int, FeatureRequest]] = {}
        for request in requests:                            # {norm: {block: request}}, in the requests' order
            layout.setdefault(request.norm, {})[request.block] = request
        # the token is named in the rows only when it is not the CLS, so the CLS rows keep their variants
        token = {} if o["token"] == "cls" else {"token": o["token"]}
        rows = []
        for norm, by_block in layout.items():
            scores, rankings = per_block({b: train.features[r] for b, r in by_block.items()}, train.labels,
                                         {b: test.features[r] for b, r in by_block.items()}, test.labels,
                                         k=tuple(o["k"]), temperature=o["temperature"],
                                         standardize=o["standardize"], return_predictions=True)
            for key, value in scores.items():            # "block3/top1@k=20"
                block, _, name = key.partition("/")
                metric, _, k = name.partition("@k=")
                block = int(block[len("block"):])
                correct = correct_in_top(rankings[block][int(k)], test.labels, int(metric[len("top"):]))
                rows.append(MetricValue(metric, value, {"k": int(k), "block": block, "stream": norm, **token,
                                                        "std": o["standardize"]},
                                        per_sample=PerSample("mean", correct.numpy())))
        return rows

    headline_fields = {"best block": "block"}

    @classmethod
    def headlines(cls, results):
        # The block where k-NN top-1 peaks (k = 20 where measured, else the largest; normed stream where measured):
        # MIM-Refiner's observation is that a MIM model peaks in the middle and a refined one at the end.
        ks = {f.get("k") for m, f, _ in results if m == "top1"}
        streams = {f.get("stream") for m, f, _ in results if m == "top1"}
        if not ks:
            return {}
        k = 20 if 20 in ks else max(ks)
        stream = "normed" if "normed" in streams else sorted(streams, key=str)[0]
        candidates = [i for i, (m, f, _) in enumerate(results)
                      if m == "top1" and f.get("k") == k and f.get("stream") == stream]
        return {"best block": max(candidates, key=lambda i: results[i][2])}      # ties: the first listed


@sslbench.hookimpl
def register_evaluators(register):
    register("per_block", PerBlock)
