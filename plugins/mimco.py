"""MimCo-style — masked image modelling against a frozen contrastive teacher (Zhou et al., ACM MM 2022,
arXiv 2209.03063). There is no public code: every choice the paper does not pin down is an option, and its default
is documented here and in docs/methods.md.

A pre-trained contrastive model (the paper: MoCo v3 ViT-S) is a **frozen teacher**, declared in the recipe's
``[stages.teacher]`` and built by the trainer (:class:`sslbench.core.teacher.FrozenTeacher`). One random-resized
crop + flip is seen twice: the student gets it with ``mask_ratio`` of its patches replaced by a learned mask token
(ConMIM's official mask generators), the teacher gets it unmasked. Two light heads map the student's final
patch tokens and CLS to the teacher's width. The loss is

* **patch level** — InfoNCE: the student's prediction at each masked position must pick out the teacher's patch
  feature at the same position; negatives are the teacher features at the other masked positions of the batch
  (gathered over processes), or of the same image (``patch_negatives = "image"``);
* **image level** — InfoNCE between the student's and the teacher's CLS, negatives the other teacher CLS of the
  batch (gathered over processes);

``patch_weight · patch + image_weight · image``, τ 0.2 for both, logits in fp32
(:func:`sslbench.core.losses.mimco_patch_loss`, :func:`sslbench.core.losses.mimco_image_loss`).

    [[stages]]
    objective = "mimco"
    [stages.options]
    mask_ratio = 0.75
    temperature = 0.2
    [stages.teacher]
    model = "vit_small_patch16_224"
    num_heads = 12
    checkpoint = "checkpoints/vit-s-300ep.pth.tar"
    checkpoint_format = "mocov3"

Unverified defaults (the paper gives no code): linear heads (``head_hidden = 0``), the teacher's final-norm tokens as
targets, masks of ratio 0.75 in uniformly drawn 32-px units (ConMIM's ``random_mps32``, its ViT-L recipe: 37 of the
49 units, 148 of 196 patches; ``mask_mode = "block"`` gives BEiT blocks on the patch grid instead), crops (0.08, 1)
+ flip, one direction of each InfoNCE (student queries, teacher keys). Masks are drawn per sample from
``batch.rng`` (:mod:`sslbench.core.masks`), so they depend only on (seed, step, sample) — 1 or N processes and any
accumulation draw the same masks.
"""

from __future__ import annotations

import torch
from torch import nn

import sslbench
from sslbench.core import distributed
from sslbench.core.losses import mimco_image_loss, mimco_patch_loss
from sslbench.core.errors import UserError
from sslbench.core.masks import (ReplaceMask, block_mask, keyed_seeds, mask_unit_patches, random_unit_mask,
                                 unit_mask_count)
from sslbench.core.modules import mlp
from sslbench.core.objective import DataInfo, Objective
from sslbench.core.options import Option
from sslbench.data.views import Compose, IndependentCrops, Normalize, crop_flip


def mimco_head(in_dim: int, out_dim: int, hidden: int = 0) -> nn.Sequential:
    """A light head from the student's width to the teacher's: one Linear, or Linear–GELU–Linear when ``hidden``."""
    dims = [in_dim, hidden, out_dim] if hidden else [in_dim, out_dim]
    return mlp(dims, act=nn.GELU, bias=True, batchnorm=False, last_bn=False)


def gather_keys(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's rows of ``local`` in rank order, and where this process's start: a block mask may stop
    short, so processes may hold different numbers of masked positions."""
    if not distributed.is_distributed():
        return local, 0
    counts = distributed.gather(torch.tensor([len(local)], device=local.device))
    return distributed.gather(local), int(counts[:distributed.rank()].sum())


class MimCo(Objective):
    name = "mimco"
    description = "MimCo-style: masked student vs a frozen contrastive teacher, patch- and image-level InfoNCE " \
                  "(Zhou et al. 2022)"
    needs_teacher = True
    options = {
        "mask_mode": Option("random_units", str, "ConMIM's mask generators: random_units (whole square units drawn "
                                                 "uniformly, ConMIM's random_mps32) or block (BEiT blocks on the "
                                                 "patch grid)", choices=("random_units", "block")),
        "mask_ratio": Option(0.75, float, "random_units: fraction of the units masked, rounded up; block: of the "
                                          "patches, rounded (at most: a block mask may stop short)", min=0, max=1),
        "mask_unit_px": Option(32, int, "random_units: side of a unit in pixels, rounded to whole patches, must "
                                        "tile the patch grid", min=1),
        "mask_min_block": Option(16, int, "block: smallest block in patches (BEiT's and ConMIM's 16)", min=1),
        "temperature": Option(0.2, float, "τ of both InfoNCE losses", min=0, min_exclusive=True),
        "patch_weight": Option(1.0, float, "weight of the patch-level loss", min=0),
        "image_weight": Option(1.0, float, "weight of the image-level (CLS) loss", min=0),
        "patch_negatives": Option("batch", str, "negatives of the patch loss: the other masked positions of the "
                                                "batch (gathered over processes) or of the same image",
                                  choices=("batch", "image")),
        "head_hidden": Option(0, int, "hidden width of the two heads (0: one Linear each)", min=0),
        "crop_scale": Option([0.08, 1.0], list, "random-resized-crop area range", item_type=float, min=0, max=1),
        "flip": Option(True, bool, "random horizontal flip"),
    }
    fixed_options = ("head_hidden",)

    def __init__(self, backbone, opts, context, teacher=None):
        super().__init__(backbone, opts, context, teacher=teacher)
        stage = context.stage_index
        if self.teacher.patch_size != backbone.patch_size:
            raise sslbench.RecipeError(f"stages[{stage}].teacher.patch_size",
                                       f"the teacher's patches ({self.teacher.patch_size} px) must be the student's "
                                       f"({backbone.patch_size} px): the patch loss pairs the same positions")
        self._check_masks()
        if opts["patch_weight"] == 0 and opts["image_weight"] == 0:
            raise self.option_error("image_weight", "patch_weight and image_weight are both 0: nothing to learn")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.patch_head = mimco_head(backbone.embed_dim, self.teacher.embed_dim, opts["head_hidden"])
        self.cls_head = mimco_head(backbone.embed_dim, self.teacher.embed_dim, opts["head_hidden"])

    def views(self, data: DataInfo):
        crop = crop_flip(data.image_size, tuple(self.opts["crop_scale"]), self.opts["flip"])
        return IndependentCrops(1, Compose([*crop, Normalize(data.mean, data.std)]))

    def _check_masks(self) -> None:
        """Refuse mask settings that do not fit the patch grid, or leave no masked or no visible patch."""
        grid, patches = tuple(self.backbone.grid_size), self.backbone.num_patches
        if self.opts["mask_mode"] == "block":
            self.count = round(self.opts["mask_ratio"] * patches)
            if not 1 <= self.count < patches:
                raise self.option_error("mask_ratio", f"{self.opts['mask_ratio']} masks {self.count} of the "
                                                      f"{patches} patches; the loss needs at least one masked and "
                                                      "one visible patch")
            if self.opts["mask_min_block"] > self.count:
                raise self.option_error("mask_min_block", f"{self.opts['mask_min_block']} is more than the "
                                                          f"{self.count} patches a mask holds")
            return
        try:
            self.unit = mask_unit_patches(self.opts["mask_unit_px"], self.backbone.patch_size, grid)
        except UserError as error:
            raise self.option_error("mask_unit_px", str(error)) from None
        self.units = (grid[0] // self.unit) * (grid[1] // self.unit)
        self.count = unit_mask_count(self.units, self.opts["mask_ratio"])
        if not 1 <= self.count < self.units:
            raise self.option_error("mask_ratio", f"{self.opts['mask_ratio']} masks {self.count} of the "
                                                  f"{self.units} units of the {grid[0]}x{grid[1]} patch grid; the "
                                                  "loss needs at least one masked and one visible unit")

    def mask(self, batch) -> torch.Tensor:
        """(B, N) bool, True = replaced by the mask token; each row from its own sample's keyed stream."""
        grid = tuple(self.backbone.grid_size)
        if self.opts["mask_mode"] == "random_units":
            return random_unit_mask(batch.rng.rand(self.units), grid, self.unit, self.count)
        seeds = keyed_seeds(batch.rng.rand(2))          # BEiT's placement is sequential Python, seeded per sample
        return block_mask(seeds, grid, self.count, self.opts["mask_min_block"]).to(batch.rng.device)

    def forward(self, views, batch):
        if len(views) != 1:
            raise ValueError(f"MimCo takes 1 view (seen masked by the student, whole by the teacher), got {len(views)}")
        (view,) = views
        masked = self.mask(batch)
        tokens = self.backbone(view, mask=ReplaceMask(masked, self.mask_token)).tokens
        prefix = self.backbone.num_prefix_tokens
        student_patches = self.patch_head(tokens[:, prefix:])
        student_cls = self.cls_head(tokens[:, 0])
        target = self.teacher(view).tokens                  # no gradient, eval mode, the run's autocast
        teacher_patches = target[:, self.teacher.num_prefix_tokens:]
        teacher_cls = target[:, 0]
        logs = {"masked_fraction": masked.float().mean()}
        loss = 0.0
        if self.opts["patch_weight"] > 0:
            keys, offset = None, 0
            if self.opts["patch_negatives"] == "batch":
                keys, offset = gather_keys(teacher_patches[masked])
            patch = mimco_patch_loss(student_patches, teacher_patches, masked, self.opts["temperature"],
                                     self.opts["patch_negatives"], keys=keys, key_offset=offset)
            loss = loss + self.opts["patch_weight"] * patch
            logs["patch_loss"] = patch.detach()
        if self.opts["image_weight"] > 0:
            image = mimco_image_loss(student_cls, distributed.gather(teacher_cls), self.opts["temperature"])
            loss = loss + self.opts["image_weight"] * image
            logs["image_loss"] = image.detach()
        return {"loss": loss, "logs": logs}

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}


@sslbench.hookimpl
def register_objectives(register):
    register("mimco", MimCo)
