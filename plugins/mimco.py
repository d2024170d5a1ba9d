"""MimCo-style — masked image modelling against a frozen contrastive teacher (Zhou et al., ACM MM 2022,
arXiv 2209.03063). There is no public code: every choice the paper does not pin down is an option, and its default
is documented here and in docs/methods.md.

A pre-trained contrastive model (the paper: MoCo v3 ViT-S) is a **frozen teacher**, declared in the recipe's
``[stages.teacher]`` and built by the trainer (:class:`sslbench.core.teacher.FrozenTeacher`). One random-resized
crop + flip is seen twice: the student gets it with ``mask_ratio`` of its patches replaced by a learned mask token
(block-wise masks as ConMIM's, or uniform), the teacher gets it unmasked. Two light heads map the student's final
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
targets, block-wise masks in 32-px cells (ConMIM's, ``mask = "block"``), crops (0.08, 1) + flip, one direction of
each InfoNCE (student queries, teacher keys). Masks are drawn per sample from ``batch.rng``, so they depend only on
(seed, step, sample) — 1 or N processes and any accumulation draw the same masks.
"""

from __future__ import annotations

import torch
from torch import nn

import sslbench
from sslbench.core import distributed
from sslbench.core.losses import mimco_image_loss, mimco_patch_loss
from sslbench.core.masks import ReplaceMask, blockwise_mask, drop_mask_from_noise
from sslbench.core.modules import mlp
from sslbench.core.objective import DataInfo, Objective
from sslbench.core.options import Option
from sslbench.data.views import Compose, IndependentCrops, Normalize, crop_flip


def mimco_head(in_dim: int, out_dim: int, hidden: int = 0) -> nn.Sequential:
    """A light head from the student's width to the teacher's: one Linear, or Linear–GELU–Linear when ``hidden``."""
    dims = [in_dim, hidden, out_dim] if hidden else [in_dim, out_dim]
    return mlp(dims, act=nn.GELU, bias=True, batchnorm=False, last_bn=False)


def keyed_masks(rng, grid: tuple[int, int], ratio: float, kind: str, unit: int) -> torch.Tensor:
    """(B, N) bool masks, one per sample from that sample's keyed stream, exactly the same count in every row.

    ``"block"``: BEiT-style blocks on a grid of ``unit x unit``-patch cells (:func:`blockwise_mask`, ConMIM's),
    from a generator seeded by two 24-bit draws of the sample's stream. ``"random"``: uniform patches
    (:func:`drop_mask_from_noise` of the stream's noise).
    """
    grid_h, grid_w = grid
    if kind == "random":
        return drop_mask_from_noise(rng.rand(grid_h * grid_w), ratio)[1]
    words = rng.randint(1 << 24, 2).cpu().tolist()
    rows = [blockwise_mask(1, grid_h, grid_w, ratio, unit, torch.Generator().manual_seed((hi << 24) | lo))
            for hi, lo in words]
    return torch.cat(rows).to(rng.device)


class MimCo(Objective):
    name = "mimco"
    description = "MimCo-style: masked student vs a frozen contrastive teacher, patch- and image-level InfoNCE " \
                  "(Zhou et al. 2022)"
    needs_teacher = True
    options = {
        "mask_ratio": Option(0.75, float, "fraction of patch tokens replaced by the mask token", min=0, max=1),
        "mask": Option("block", str, "mask shape: block (BEiT-style blocks in mask_unit_px cells, as ConMIM) or "
                                     "random (uniform patches)", choices=("block", "random")),
        "mask_unit_px": Option(32, int, "side of a block-mask cell in pixels (rounded to whole patches)", min=1),
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
        masked = round(opts["mask_ratio"] * backbone.num_patches)
        if not 1 <= masked < backbone.num_patches:
            raise self.option_error("mask_ratio", f"{opts['mask_ratio']} masks {masked} of the "
                                                  f"{backbone.num_patches} patches; the loss needs at least one "
                                                  "masked and one visible patch")
        if opts["patch_weight"] == 0 and opts["image_weight"] == 0:
            raise self.option_error("image_weight", "patch_weight and image_weight are both 0: nothing to learn")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.patch_head = mimco_head(backbone.embed_dim, self.teacher.embed_dim, opts["head_hidden"])
        self.cls_head = mimco_head(backbone.embed_dim, self.teacher.embed_dim, opts["head_hidden"])

    def views(self, data: DataInfo):
        crop = crop_flip(data.image_size, tuple(self.opts["crop_scale"]), self.opts["flip"])
        return IndependentCrops(1, Compose([*crop, Normalize(data.mean, data.std)]))

    def mask(self, batch) -> torch.Tensor:
        unit = max(1, round(self.opts["mask_unit_px"] / self.backbone.patch_size))
        return keyed_masks(batch.rng, self.backbone.grid_size, self.opts["mask_ratio"], self.opts["mask"], unit)

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
        logs = {"masked_fraction": float(masked.float().mean())}
        loss = 0.0
        if self.opts["patch_weight"] > 0:
            keys = None
            if self.opts["patch_negatives"] == "batch":
                # every row masks the same number of patches, so each process contributes equally many keys
                keys = distributed.gather(teacher_patches[masked])
            patch = mimco_patch_loss(student_patches, teacher_patches, masked, self.opts["temperature"],
                                     self.opts["patch_negatives"], keys=keys)
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
