"""MIM-Refiner — contrastive ID heads on intermediate blocks of a pre-trained MIM encoder (Alkin et al. 2024,
arXiv 2402.10093). Implementation facts: ``docs/methods.md`` (MIM-Refiner).

**Heads.** One ID head on the encoder output (CLS after the final norm, ``output_head``) and one on the CLS token of
the *raw* residual stream (no norm) of each block in ``head_blocks`` (0-based, negatives count from the end). With
``head_blocks = []`` the blocks are placed proportionally, ``round(a·depth) .. round(b·depth)`` for
``head_block_range = [a, b]``; the default ``[16/24, 22/24]`` gives ViT-L/16's blocks 16..22 and blocks 8..11 of a
12-block ViT. A head is projector Linear(D→2048, no bias)–BN–GELU–Linear–BN–GELU–Linear(→256)–BN and predictor
Linear(256→4096)–BN–GELU–Linear–BN, Xavier init, with BatchNorm over the global batch of all processes
(:class:`sslbench.core.modules.GlobalBatchNorm1d`). All views of a step pass a head as one batch (BN statistics mix
the views). The loss is ``Σ_h head_weights[h] · loss_h`` (weights 1 by default; output head first, then blocks).

**Views.** ``global_views`` crops at the training size and ``local_views`` crops of ``local_size`` pixels
(``0``: 3/7 of the image size rounded to a multiple of the patch size — 96 px for 224/16, 98 for 224/14, 12 for
28/4), with the paper's augmentations (:func:`mimrefiner_views`). Local crops pass the same encoder
with the position embedding resized bicubically to their grid.

**Loss.** NNA (:func:`sslbench.core.losses.nna_loss`, τ = ``temperature``): the teacher vector z of a global view is the
projector output, detached; its neighbour q comes from the head's queue; the predictions of the other view are
gathered over processes with gradient. A head's loss is the mean of ℓ(i, j) over its view pairs:

* ``pairing = "all"`` (default, the paper's intent): every ordered pair of a global view i and any *other* view
  j ≠ i — G(G−1) + G·L pairs (22 for 2 + 10 views).
* ``pairing = "official"``: the official code's indexing, which takes the "local" students as views ``0 .. L−1``
  instead of ``G .. G+L−1``: with 2 + 10 views each global view is paired with global0, global1 (itself once more)
  and local0..7, never local8/9. The number of pairs is the same, G(G−1) + G·L.

**Queue.** Per head, ``queue_size`` raw projector outputs with their dataset ids (:class:`sslbench.core.modules.NNQueue`,
``normalize=False``); lookup by cosine similarity with same-id entries excluded, top-1 (``topk = 1``, stage 2) or a
uniform pick among the ``topk`` best (stage 3: 20). The pick is drawn from the step's per-sample keyed streams, so
N processes pick exactly what one process picks. After the lookup view 0's z, gathered over processes, is enqueued
(FIFO). Queues are buffers: saved with checkpoints and carried into the next stage of the same objective.

**Logged signals** per head besides ``loss_<head>``: ``<head>_nn_acc`` (how often the neighbour looked up for a
global view has the sample's class — the labels are read for this log only) and ``<head>_std_projected`` (the
per-dimension std of the L2-normalised projections × √d: ≈ 1 spread out, 0 collapsed).

**Stages** are recipe settings; two stages of one recipe share heads and queues::

    [[stages]]                 # stage 2 of the paper: heads only
    objective = "mim_refiner"
    epochs = 20
    freeze = ["backbone"]
    optimizer = { lr = 2e-4, betas = [0.9, 0.95], weight_decay = 1e-5, scale_lr_by_batch = true }
    schedule = { warmup_epochs = 4, final_lr = 1e-6 }
    [stages.options]
    head_blocks = [16, 17, 18, 19, 20, 21, 22]
    topk = 1
    [[stages]]                 # stage 3: everything, layer-wise decay, EMA of the encoder evaluated
    freeze = []
    layer_decay = 0.65
    ema_momentum = 0.9999      # evaluate it with [[eval]] use_ema = true
    optimizer = { lr = 4e-4, betas = [0.9, 0.95], weight_decay = 0.05, head_weight_decay = 1e-5, scale_lr_by_batch = true }
    [stages.options]
    topk = 20

With ``output_head = false`` the final norm (and blocks after the last head block) get no gradient: freeze them in
a stage that trains the encoder (DDP requires every trainable parameter to be used).
"""

from __future__ import annotations

import torch
from torch import nn

import sslbench
from sslbench.core import distributed
from sslbench.core.diagnostics import training_signals
from sslbench.core.distributed import ignore_in_ddp
from sslbench.core.losses import nna_loss
from sslbench.core.modules import NNQueue, convert_sync_batchnorm, mlp
from sslbench.core.objective import DataInfo, Objective
from sslbench.core.options import Option
from sslbench.data.views import (Compose, HorizontalFlip, MultiCrop, Normalize, RandomResizedCrop, crop_flip,
                                 strong_photometric)

PAIRINGS = ("all", "official")


# ------------------------------------------------------------------------------------- helpers (also for mae_ct)

def view_pairs(num_global: int, num_local: int, pairing: str = "all") -> list[tuple[int, int]]:
    """Ordered (teacher i, student j) view pairs; views are numbered globals first. See the module docstring.

    >>> len(view_pairs(2, 10)), view_pairs(2, 1, "official")
    (22, [(0, 1), (1, 0), (0, 0), (1, 0)])
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    pairs = [(i, j) for i in range(num_global) for j in range(num_global) if j != i]
    first_local = num_global if pairing == "all" else 0
    pairs += [(i, first_local + j) for i in range(num_global) for j in range(num_local)]
    return pairs


def proportional_blocks(depth: int, start: float, end: float) -> list[int]:
    """Blocks ``round(start·depth) .. round(end·depth)`` (inclusive), clamped to the backbone.

    >>> proportional_blocks(24, 16 / 24, 22 / 24), proportional_blocks(12, 16 / 24, 22 / 24)
    ([16, 17, 18, 19, 20, 21, 22], [8, 9, 10, 11])
    """
    lo = min(max(round(start * depth), 0), depth - 1)
    hi = min(max(round(end * depth), lo), depth - 1)
    return list(range(lo, hi + 1))


class IDHead(nn.Module):
    """Projector, predictor and nearest-neighbour queue of one MIM-Refiner head."""

    def __init__(self, in_dim: int, hidden: int, out: int, pred_hidden: int, queue_size: int):
        super().__init__()
        self.projector = convert_sync_batchnorm(mimrefiner_projector(in_dim, hidden, out))
        self.predictor = convert_sync_batchnorm(mimrefiner_predictor(out, pred_hidden))
        self.queue = NNQueue(queue_size, out, normalize=False)


def mimrefiner_projector(in_dim: int, hidden: int = 2048, out: int = 256) -> nn.Sequential:
    """MIM-Refiner ID-head projector: Linear–BN–GELU–Linear–BN–GELU–Linear–BN (Alkin et al. 2024)."""
    return mlp([in_dim, hidden, hidden, out], act=nn.GELU)

def mimrefiner_predictor(dim: int = 256, hidden: int = 4096) -> nn.Sequential:
    """MIM-Refiner predictor: Linear–BN–GELU–Linear–BN."""
    return mlp([dim, hidden, dim], act=nn.GELU)

def mimrefiner_views(global_size: int = 224, local_size: int = 96, global_n: int = 2, local_n: int = 10,
                     mean=None, std=None) -> MultiCrop:
    """MIM-Refiner (Alkin et al. 2024): global RRC(0.25, 1) bicubic + flip + jitter/grey, blur always on even
    global views (view 1 in the paper's counting) and p 0.1 on odd ones, which are also solarised with p 0.2;
    local RRC(0.05, 0.25) + flip + jitter/grey + blur p 0.5."""
    globals_ = [Compose([RandomResizedCrop(global_size, (0.25, 1.0)), HorizontalFlip(0.5),
                         *strong_photometric(blur_p=1.0 if i % 2 == 0 else 0.1,
                                              solarize_p=0.0 if i % 2 == 0 else 0.2), Normalize(mean, std)])
                for i in range(global_n)]
    local = Compose([*crop_flip(local_size, (0.05, 0.25)), *strong_photometric(blur_p=0.5, solarize_p=0.0),
                     Normalize(mean, std)])
    return MultiCrop(global_n, globals_, local_n, local)


class MIMRefiner(Objective):
    name = "mim_refiner"
    description = "MIM-Refiner: NNA ID heads on intermediate blocks of a MIM encoder (Alkin et al. 2024)"
    options = {
        "head_blocks": Option([], list, "blocks whose raw CLS gets a head (0-based, negatives from the end); "
                              "empty: proportional placement by head_block_range", item_type=int),
        "head_block_range": Option([16 / 24, 22 / 24], list, "used when head_blocks is empty: heads on blocks "
                                   "round(a*depth)..round(b*depth) (ViT-L/16: 16..22)", item_type=float, min=0,
                                   max=1),
        "output_head": Option(True, bool, "a head on the encoder output (CLS after the final norm)"),
        "head_weights": Option([], list, "loss weight per head, output head first (empty: all 1)",
                               item_type=float, min=0),
        "proj_hidden": Option(2048, int, "projector hidden width", min=1),
        "proj_out": Option(256, int, "projector output width", min=1),
        "pred_hidden": Option(4096, int, "predictor hidden width", min=1),
        "queue_size": Option(65536, int, "nearest-neighbour queue length per head", min=1),
        "temperature": Option(0.2, float, "NNA temperature (ViT-L 0.2, ViT-H 0.3, ViT-2B 0.35)", min=0,
                              min_exclusive=True),
        "topk": Option(1, int, "neighbour = uniform pick among the top-k (stage 2: 1, stage 3: 20)", min=1),
        "global_views": Option(2, int, "global crops at the training size", min=1),
        "local_views": Option(10, int, "local crops", min=0),
        "local_size": Option(0, int, "local crop size in pixels (0: 3/7 of the image size, a multiple of the "
                             "patch size)", min=0),
        "pairing": Option("all", str, "view pairs: all = G(G-1)+G*L intended pairs, official = the official "
                          "code's local indexing", choices=PAIRINGS),
    }
    fixed_options = ("head_blocks", "head_block_range", "output_head", "proj_hidden", "proj_out", "pred_hidden",
                     "queue_size")

    def __init__(self, backbone, opts, context):
        super().__init__(backbone, opts, context)
        depth = backbone.depth
        if opts["head_blocks"]:
            try:
                self.blocks = sorted(set(backbone.block_indices(opts["head_blocks"])))
            except sslbench.UserError as exc:
                raise self.option_error("head_blocks", str(exc)) from None
        else:
            if len(opts["head_block_range"]) != 2 or opts["head_block_range"][0] > opts["head_block_range"][1]:
                raise self.option_error("head_block_range", "expected [start, end] with start <= end")
            self.blocks = proportional_blocks(depth, *opts["head_block_range"])
        names = (["out"] if opts["output_head"] else []) + [f"block{k}" for k in self.blocks]
        if not names:
            raise self.option_error("output_head", "no heads: set output_head or head_blocks")
        self.heads = nn.ModuleDict({name: IDHead(backbone.embed_dim, opts["proj_hidden"], opts["proj_out"],
                                                 opts["pred_hidden"], opts["queue_size"]) for name in names})
        self._check_stage_options(opts)
        ignore_in_ddp(self, [n for n, _ in self.named_buffers() if ".queue." in n])

    def _check_stage_options(self, opts) -> None:
        weights = opts["head_weights"]
        if weights and len(weights) != len(self.heads):
            raise self.option_error("head_weights", f"{len(weights)} weights for {len(self.heads)} heads "
                                                    f"({', '.join(self.heads)})")
        if not view_pairs(opts["global_views"], opts["local_views"], opts["pairing"]):
            raise self.option_error("global_views", "one global view and no local view make no pair")

    def start_stage(self, opts, context) -> None:
        super().start_stage(opts, context)
        self._check_stage_options(opts)

    def local_size(self, image_size: int) -> int:
        p = self.backbone.patch_size
        return self.opts["local_size"] or max(p, round(image_size * 3 / 7 / p) * p)

    def views(self, data: DataInfo):
        o = self.opts
        return mimrefiner_views(data.image_size, self.local_size(data.image_size), o["global_views"],
                                o["local_views"], data.mean, data.std)

    def head_inputs(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per head, the CLS vectors of all views stacked view-major, ``(V·B, D)``."""
        g = self.opts["global_views"]
        groups = [torch.cat(views[:g])] + ([torch.cat(views[g:])] if len(views) > g else [])
        final = "out" in self.heads
        outs = [self.backbone(x, blocks=self.blocks, out="raw", final=final) for x in groups]
        inputs = {}
        for name in self.heads:
            if name == "out":
                inputs[name] = torch.cat([o.tokens[:, 0] for o in outs])
            else:
                inputs[name] = torch.cat([o.raw[int(name[len("block"):])][:, 0] for o in outs])
        return inputs

    def forward(self, views, batch):
        o = self.opts
        g, batch_size = o["global_views"], views[0].shape[0]
        if len(views) != g + o["local_views"]:
            raise ValueError(f"expected {g} + {o['local_views']} views, got {len(views)}")
        ids = batch.index
        pairs = view_pairs(g, len(views) - g, o["pairing"])
        uniform = None
        if o["topk"] > 1:
            uniform = batch.rng.rand(len(self.heads), g).to(views[0].device)     # (B, heads, G)
        weights = o["head_weights"] or [1.0] * len(self.heads)
        total, logs = 0.0, {}
        for h, (name, x) in enumerate(self.head_inputs(views).items()):
            head = self.heads[name]
            z = head.projector(x)
            p = head.predictor(z)
            anchor = z[:g * batch_size].detach()                                    # teachers: global views
            u = uniform[:, h].T.reshape(-1) if uniform is not None else None       # view-major, like anchor
            neighbour, neighbour_labels = head.queue.lookup(anchor, ids, topk=o["topk"], uniform=u,
                                                            return_labels=True)
            # (V·B, d) → (B, V, d), gathered over processes with gradient → (W·B, V, d)
            predictions = distributed.gather_with_grad(p.view(len(views), batch_size, -1).transpose(0, 1).contiguous())
            loss = sum(nna_loss(anchor[i * batch_size:(i + 1) * batch_size],
                                neighbour[i * batch_size:(i + 1) * batch_size], predictions[:, j],
                                o["temperature"]) for i, j in pairs) / len(pairs)
            if self.training:
                head.queue.enqueue(distributed.gather(anchor[:batch_size]), distributed.gather(ids),
                                   None if batch.labels is None else distributed.gather(batch.labels))
            total = total + weights[h] * loss
            logs[f"loss_{name}"] = loss.detach()
            logs.update(training_signals(neighbour_labels, batch.labels, prefix=f"{name}_", projected=z))
        return {"loss": total, "logs": logs}


@sslbench.hookimpl
def register_objectives(register):
    register("mim_refiner", MIMRefiner)
