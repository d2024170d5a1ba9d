"""MiCL — masked image contrastive learning (Yang & Xu 2024, arXiv 2411.09858; renamed OCL in its v2).

No teacher, projector, predictor or decoder: each image is cropped once (random-resized crop + flip), a random permutation of its patch tokens
keeps ``int(N·(1 − r)) // 2 · 2`` of them (r = ``mask_ratio``, 0.9 by default), and the first half and the second
half of the kept tokens become two *disjoint* views of the image, each encoded as its own sequence with its own CLS
token. The loss contrasts the two final-norm CLS outputs against the other images of the local batch with the
bent similarity ``s(c) = 0.5(1 + c) / (1 + κ(1 − c)) / τ`` (:func:`sslbench.core.losses.micl_loss`). The paper adds
fixed 2-D sin-cos position embeddings to the patch embeddings: build the backbone with ``pos_embed = "sincos"``.

    [[stages]]
    objective = "micl"
    [stages.options]
    mask_ratio = 0.9      # 0.8 is the paper's other setting
    temperature = 0.07
    kappa = 0.015625      # 1/64

The permutation comes from the step's keyed random streams, so it depends only on (seed, step, sample).
Negatives are local to each process, as in the paper (no gather across GPUs).
"""

from __future__ import annotations

import sslbench
from sslbench.core.losses import micl_loss
from sslbench.core.masks import split_mask_from_noise, split_size
from sslbench.core.objective import DataInfo, Objective
from sslbench.core.options import Option
from sslbench.data.views import Compose, IndependentCrops, Normalize, crop_flip


def micl_views(size: int, mean=None, std=None, scale: tuple[float, float] = (0.2, 1.0),
               flip: bool = True) -> IndependentCrops:
    """MiCL (Yang & Xu 2024): one RRC(0.2, 1) + flip view; its two views are disjoint token subsets of it,
    made by the objective, not here."""
    return IndependentCrops(1, Compose([*crop_flip(size, scale, flip), Normalize(mean, std)]))


class MiCL(Objective):
    name = "micl"
    description = "Masked image contrastive learning: two disjoint patch subsets of one image, CLS contrast " \
                  "(Yang & Xu 2024)"
    options = {
        "mask_ratio": Option(0.9, float, "fraction of patch tokens dropped; the rest is split into two views",
                             min=0, max=1),
        "temperature": Option(0.07, float, "τ of the similarity", min=0, min_exclusive=True),
        "kappa": Option(1 / 64, float, "κ, the bend of the similarity near cosine 1", min=0),
        "crop_scale": Option([0.2, 1.0], list, "random-resized-crop area range", item_type=float, min=0, max=1),
        "flip": Option(True, bool, "random horizontal flip"),
    }

    def __init__(self, backbone, opts, context):
        super().__init__(backbone, opts, context)
        # Fail when the recipe is checked, not at the first step: each view needs at least one patch.
        if opts["mask_ratio"] >= 1 or split_size(backbone.num_patches, opts["mask_ratio"], 2) < 1:
            raise self.option_error("mask_ratio", f"{opts['mask_ratio']} leaves fewer than 2 of the "
                                                  f"{backbone.num_patches} patches, but each of the two views needs one")

    def views(self, data: DataInfo):
        return micl_views(data.image_size, data.mean, data.std, tuple(self.opts["crop_scale"]), self.opts["flip"])

    def forward(self, views, batch):
        images = views[0]
        noise = batch.rng.rand(self.backbone.num_patches).to(images.device)
        mask = split_mask_from_noise(noise, self.opts["mask_ratio"], 2)
        cls = self.backbone(images, mask=mask).cls                # (2B, D), split-major: view 1 then view 2
        first, second = cls.chunk(2)
        loss = micl_loss(first, second, self.opts["temperature"], self.opts["kappa"])
        return {"loss": loss, "logs": {"tokens_per_view": float(mask.groups.shape[2])}}


@sslbench.hookimpl
def register_objectives(register):
    register("micl", MiCL)
