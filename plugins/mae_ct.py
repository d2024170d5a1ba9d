"""MAE-CT — contrastive tuning of a pre-trained MAE with an NNCLR head (Lehner et al. 2023, arXiv 2304.10520).
Implementation facts: ``docs/methods.md`` (MAE-CT).

**Head.** Projector Linear(D→2048, no bias)–BN–ReLU–Linear–BN–ReLU–Linear(→256)–BN and predictor
Linear(256→4096)–BN–ReLU–Linear(→256) (:func:`maect_projector` / ``maect_predictor``), on the CLS
token after the final norm (``pooling = "cls"``, ViT-L/H) or the mean of the final-normed patch tokens
(``pooling = "mean_patch"``, ViT-B). Each view passes the head separately (per-view BatchNorm statistics, taken over
the global batch of all processes).

**Views.** Two independent random-resized crops (0.08, 1) + flip, nothing else (:func:`maect_views`).

**Target projector and queue.** An EMA copy of the projector (``target_momentum``: 0.99 for B/L, 0.995 for H; kept
in train mode like the online one) projects both views for the nearest-neighbour lookup and for the queue. With
``target_momentum = 0`` the online projector's (detached) output is used instead — the official head-preparation
head — and the copy simply follows the projector, so a following stage starts its EMA from the prepared projector.
The copy's weights are buffers, not parameters: no optimiser, freeze pattern or DDP ever treats them as trainable.
The queue (:class:`sslbench.core.modules.NNQueue`, ``queue_size`` entries) stores L2-normalised target projections of
view 0, gathered over processes, with their dataset ids; same-id entries are excluded from the lookup; the neighbour
is the top-1 (``topk = 1``, head preparation) or a uniform pick among the top-20 (tuning), drawn from the step's
per-sample keyed streams so that N processes pick what one process picks.

**Loss.** Symmetric NNCLR (:func:`sslbench.core.losses.symmetric_nnclr_loss`): ½[CE(nn₁·p₀ᵀ/τ) + CE(nn₀·p₁ᵀ/τ)] with the
predictions gathered over processes with gradient; τ 0.15 (B), 0.2 (L), 0.3 (H).

**Logged signals** besides the loss: ``nn_acc`` (how often the looked-up neighbour has the sample's class — the
labels are read for this log only), ``std_features`` and ``std_projected`` (per-dimension std of the L2-normalised
encoder features and projections, × √d: ≈ 1 spread out, 0 collapsed).

**Stages** (phase 1 is the MAE pre-training, e.g. the ``mae`` objective or an official checkpoint)::

    [[stages]]                         # phase 2: head preparation, encoder frozen
    objective = "mae_ct"
    freeze = ["backbone"]
    [stages.options]
    target_momentum = 0.0
    topk = 1
    [[stages]]                         # phase 3: contrastive tuning
    freeze = ["blocks[:50%]"]          # the first half of the blocks and the stem (patch/CLS/position embeddings)
    layer_decay = 0.65
    optimizer = { lr = 1e-4, betas = [0.9, 0.95], weight_decay = 0.05 }
    schedule = { warmup_fraction = 0.2 }
    [stages.options]
    target_momentum = 0.99
    topk = 20

Deviation: our predictor's last Linear has a bias (the official code's has none).
"""

from __future__ import annotations

import torch
from torch import nn

import sslbench
from sslbench.core import distributed
from sslbench.core.diagnostics import training_signals
from sslbench.core.distributed import ignore_in_ddp
from sslbench.core.losses import symmetric_nnclr_loss
from sslbench.core.modules import EMA, NNQueue, convert_sync_batchnorm, mlp
from sslbench.core.objective import DataInfo, Objective
from sslbench.core.options import Option
from sslbench.data.views import Compose, IndependentCrops, Normalize, crop_flip

POOLINGS = ("cls", "mean_patch")


def maect_projector(in_dim: int, hidden: int = 2048, out: int = 256) -> nn.Sequential:
    """MAE-CT projector (Lehner et al. 2023): MIM-Refiner's layout with ReLU."""
    return mlp([in_dim, hidden, hidden, out], act=nn.ReLU)

def maect_predictor(dim: int = 256, hidden: int = 4096) -> nn.Sequential:
    """MAE-CT predictor: Linear–BN–ReLU–Linear, no final BN (so the last Linear keeps its bias)."""
    return mlp([dim, hidden, dim], act=nn.ReLU, last_bn=False)

def maect_views(size: int, mean=None, std=None) -> IndependentCrops:
    """MAE-CT (Lehner et al. 2023): two independent views, RRC(0.08, 1) + flip only."""
    return IndependentCrops(2, Compose([*crop_flip(size, (0.08, 1.0)), Normalize(mean, std)]))


class MAECT(Objective):
    name = "mae_ct"
    description = "MAE-CT: NNCLR contrastive tuning of a MAE encoder with an EMA target projector (Lehner et al. 2023)"
    options = {
        "pooling": Option("cls", str, "head input: CLS after the final norm, or the mean of the patch tokens",
                          choices=POOLINGS),
        "proj_hidden": Option(2048, int, "projector hidden width", min=1),
        "proj_out": Option(256, int, "projector output width", min=1),
        "pred_hidden": Option(4096, int, "predictor hidden width", min=1),
        "queue_size": Option(65536, int, "nearest-neighbour queue length", min=1),
        "temperature": Option(0.15, float, "NNCLR temperature (B 0.15, L 0.2, H 0.3)", min=0, min_exclusive=True),
        "topk": Option(1, int, "neighbour = uniform pick among the top-k (head preparation 1, tuning 20)", min=1),
        "target_momentum": Option(0.99, float, "EMA momentum of the target projector used for the lookup and the "
                                  "queue (0: the online projector, as in head preparation)", min=0, max=1),
    }
    fixed_options = ("proj_hidden", "proj_out", "pred_hidden", "queue_size")

    def __init__(self, backbone, opts, context):
        super().__init__(backbone, opts, context)
        self.projector = convert_sync_batchnorm(maect_projector(backbone.embed_dim, opts["proj_hidden"],
                                                                opts["proj_out"]))
        self.predictor = convert_sync_batchnorm(maect_predictor(opts["proj_out"], opts["pred_hidden"]))
        self.target_projector = EMA(self.projector, opts["target_momentum"])
        self.queue = NNQueue(opts["queue_size"], opts["proj_out"], normalize=True)
        ignore_in_ddp(self, [n for n, _ in self.named_buffers() if n.startswith(("queue.", "target_projector."))])

    def views(self, data: DataInfo):
        return maect_views(data.image_size, data.mean, data.std)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.opts["pooling"] == "cls":
            return tokens[:, 0]
        return tokens[:, self.backbone.num_prefix_tokens:].mean(dim=1)

    def forward(self, views, batch):
        o = self.opts
        if len(views) != 2:
            raise ValueError(f"MAE-CT takes 2 views, got {len(views)}")
        features = self.pool(self.backbone(torch.cat(views)).tokens).chunk(2)   # the encoder has no BN: one pass
        projected = [self.projector(f) for f in features]                        # the head: one pass per view
        predicted = [distributed.gather_with_grad(self.predictor(z)) for z in projected]
        with torch.no_grad():
            if o["target_momentum"] > 0:
                targets = [self.target_projector(f.detach()) for f in features]
            else:
                targets = [z.detach() for z in projected]
        ids = batch.index
        uniform = batch.rng.rand(2) if o["topk"] > 1 else None                          # (B, 2)
        (nn0, labels0), (nn1, labels1) = (
            self.queue.lookup(t, ids, topk=o["topk"], uniform=None if uniform is None else uniform[:, v],
                              return_labels=True) for v, t in enumerate(targets))
        loss = symmetric_nnclr_loss(nn0, nn1, predicted[0], predicted[1], o["temperature"])
        if self.training:
            self.queue.enqueue(distributed.gather(targets[0]), distributed.gather(ids),
                               None if batch.labels is None else distributed.gather(batch.labels))
        return {"loss": loss, "logs": training_signals(torch.cat([labels0, labels1]), batch.labels,
                                                       features=torch.cat(features), projected=torch.cat(projected))}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Move the target projector towards the projector (a plain copy when ``target_momentum`` is 0)."""
        self.target_projector.update(self.projector, self.opts["target_momentum"])


@sslbench.hookimpl
def register_objectives(register):
    register("mae_ct", MAECT)
