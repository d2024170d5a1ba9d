"""ConMIM — masked image modelling with denoised contrast (Yi et al., ICLR 2023, arXiv 2205.09616).

One random-resized crop (0.08, 1) + flip is shared by two branches, so patch i shows the same region in both. The
student sees the plain crop with some of its patches replaced by a learned mask token; the teacher sees the same
crop with strong photometric augmentation (jitter p 0.8, grey 0.2, blur 0.1, solarise 0.2) and no mask. Both
branches project every token with a bias-free 3-layer MLP ending in BN without affine (CLS included in the BN
statistics, dropped after).
Loss: for every masked position of an image, the student's patch feature must pick out the teacher's feature at
the same position among all patches of the *same* image (τ 0.1; no cross-image negatives,
:func:`sslbench.core.losses.patch_contrast_loss`).

The teacher is an EMA copy of student backbone + projector — parameters only, BN statistics its own — kept in train
mode, with momentum following a cosine schedule from ``momentum`` (0.996) to 1 over the stage's steps.

Masks: the official code's two modes (TencentARC/ConMIM, ``--mask_type``), each mask drawn from its own sample's
keyed stream, so it depends only on (seed, step, sample) — not on the number of processes or micro-batches.

* ``mask_mode = "block"`` — the official default: BEiT's block-wise generator on the patch grid, ``mask_patches``
  (75 of 196 at 224 px, patch 16) in blocks of at least ``mask_min_block`` (16) patches; like the original a
  mask may stop a few patches short (:func:`sslbench.core.masks.block_mask`).
* ``mask_mode = "random_units"`` — ``random_mps32``, the official ViT-L recipe: ``ceil(mask_ratio · units)``
  square units of ``mask_unit_px`` pixels drawn uniformly (32 px, 0.75: 37 of the 49 units, 148 of 196
  patches; :func:`sslbench.core.masks.random_unit_mask`).

    [[stages]]
    objective = "conmim"
    [stages.options]
    mask_mode = "random_units"
    mask_ratio = 0.75
    mask_unit_px = 32
    temperature = 0.1

Deviation: the paper's ViT is BEiT-style (relative position bias, layer scale); on timm ViTs it is the plain ViT.
"""

from __future__ import annotations

import torch
from torch import nn

import sslbench
from sslbench.core.losses import patch_contrast_loss
from sslbench.core.errors import UserError
from sslbench.core.masks import (ReplaceMask, block_mask, keyed_seeds, mask_unit_patches, random_unit_mask,
                                 unit_mask_count)
from sslbench.core.modules import EMA, convert_sync_batchnorm, cosine_momentum, mlp
from sslbench.core.objective import DataInfo, Objective
from sslbench.core.options import Option
from sslbench.data.views import Compose, Normalize, SharedCrop, crop_flip, strong_photometric
from sslbench.core.distributed import ignore_in_ddp


def conmim_projector(in_dim: int, hidden: int = 4096, out: int = 256) -> nn.Sequential:
    """ConMIM projector (Yi et al. 2023): bias-free Linear–BN–ReLU ×2, Linear–BN(affine=False)."""
    return mlp([in_dim, hidden, hidden, out], act=nn.ReLU, bias=False, last_bn_affine=False)

def conmim_views(size: int, mean=None, std=None, scale: tuple[float, float] = (0.08, 1.0),
                 flip: bool = True) -> SharedCrop:
    """ConMIM (Yi et al. 2023): one RRC(0.08, 1) + flip shared; view 0 (student) plain, view 1 (teacher) jitter
    p 0.8, grey 0.2, blur 0.1, solarise 0.2. Jitter strengths (0.4, 0.4, 0.2, 0.1) are BYOL's — assumed."""
    teacher = Compose([*strong_photometric(blur_p=0.1, solarize_p=0.2), Normalize(mean, std)])
    return SharedCrop(Compose(crop_flip(size, scale, flip)), [Normalize(mean, std), teacher])


class ConMIM(Objective):
    name = "conmim"
    description = "ConMIM: intra-image inter-patch contrast of masked student tokens against an EMA teacher " \
                  "(Yi et al. 2023)"
    options = {
        "mask_mode": Option("block", str, "how masks are drawn: BEiT block-wise on the patch grid (the official "
                            "default) or uniformly random square units (random_mps32, the official ViT-L recipe)",
                            choices=("block", "random_units")),
        "mask_patches": Option(75, int, "block: patches masked per image, at most (official 75 of 196 at 224 px, "
                               "patch 16)", min=1),
        "mask_min_block": Option(16, int, "block: smallest block in patches (official 16)", min=1),
        "mask_ratio": Option(0.75, float, "random_units: fraction of the units masked, rounded up (official 0.75: "
                             "37 of 49 units)", min=0, max=1),
        "mask_unit_px": Option(32, int, "random_units: side of a unit in pixels, rounded to whole patches, must tile "
                               "the patch grid (official 32: 2x2 patches at patch 16)", min=1),
        "temperature": Option(0.1, float, "τ of the patch contrast", min=0, min_exclusive=True),
        "proj_hidden": Option(4096, int, "projector hidden width", min=1),
        "proj_out": Option(256, int, "projector output width", min=1),
        "momentum": Option(0.996, float, "teacher EMA momentum at the first step (cosine to 1 at the last)",
                           min=0, max=1),
        "crop_scale": Option([0.08, 1.0], list, "random-resized-crop area range", item_type=float, min=0, max=1),
        "flip": Option(True, bool, "random horizontal flip"),
    }
    fixed_options = ("proj_hidden", "proj_out")

    def __init__(self, backbone, opts, context):
        super().__init__(backbone, opts, context)
        self._check_masks()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.projector = convert_sync_batchnorm(conmim_projector(backbone.embed_dim, opts["proj_hidden"],
                                                                 opts["proj_out"]))
        self.teacher = EMA(self.student(), opts["momentum"], copy_buffers=False)
        self.teacher.train()
        ignore_in_ddp(self, [n for n, _ in self.named_buffers() if n.startswith("teacher.")])

    def student(self) -> nn.ModuleDict:
        """The modules the teacher follows, under the names the teacher has (a view, not a registered child)."""
        return nn.ModuleDict({"backbone": self.backbone, "projector": self.projector})

    def train(self, mode: bool = True) -> "ConMIM":
        super().train(mode)
        self.teacher.train()                       # ConMIM's teacher always normalises with its batch statistics
        return self

    def views(self, data: DataInfo):
        return conmim_views(data.image_size, data.mean, data.std, tuple(self.opts["crop_scale"]), self.opts["flip"])

    def start_stage(self, opts, context) -> None:
        super().start_stage(opts, context)
        self._check_masks()                        # the next stage may mask differently

    def _check_masks(self) -> None:
        """Refuse mask settings that do not fit the patch grid, or leave no masked or no visible patch."""
        grid, patches = tuple(self.backbone.grid_size), self.backbone.num_patches
        where = f"of the {grid[0]}x{grid[1]} patch grid"
        if self.opts["mask_mode"] == "block":
            if self.opts["mask_patches"] >= patches:
                raise self.option_error("mask_patches", f"{self.opts['mask_patches']} masks every patch {where}; "
                                                        f"expected fewer than {patches} (the official 75 is for "
                                                        "196 patches: 224 px, patch 16)")
            return
        try:
            self.unit = mask_unit_patches(self.opts["mask_unit_px"], self.backbone.patch_size, grid)
        except UserError as error:
            raise self.option_error("mask_unit_px", str(error)) from None
        self.units = (grid[0] // self.unit) * (grid[1] // self.unit)
        self.unit_count = unit_mask_count(self.units, self.opts["mask_ratio"])
        if not 1 <= self.unit_count < self.units:
            raise self.option_error("mask_ratio", f"{self.opts['mask_ratio']} masks {self.unit_count} of the "
                                                  f"{self.units} units {where}; the loss needs at least one masked "
                                                  "and one visible unit")

    def mask(self, batch) -> torch.Tensor:
        """(B, N) bool, True = replaced by the mask token; each row from its own sample's keyed stream."""
        grid = tuple(self.backbone.grid_size)
        if self.opts["mask_mode"] == "random_units":
            return random_unit_mask(batch.rng.rand(self.units), grid, self.unit, self.unit_count)
        # BEiT's placement is sequential Python: one small host copy of the per-sample seeds
        seeds = keyed_seeds(batch.rng.rand(2))
        return block_mask(seeds, grid, self.opts["mask_patches"], self.opts["mask_min_block"])

    def project_patches(self, tokens: torch.Tensor, projector: nn.Module) -> torch.Tensor:
        """Project every token (B, 1 + N, D) → (B, N, out): CLS joins the BN statistics and is dropped after."""
        b, n, d = tokens.shape
        return projector(tokens.reshape(b * n, d)).view(b, n, -1)[:, self.backbone.num_prefix_tokens:]

    def forward(self, views, batch):
        if len(views) != 2:
            raise ValueError(f"ConMIM takes 2 views (student, teacher), got {len(views)}")
        student_view, teacher_view = views
        masked = self.mask(batch).to(student_view.device)
        tokens = self.backbone(student_view, mask=ReplaceMask(masked, self.mask_token)).tokens
        student = self.project_patches(tokens, self.projector)
        with torch.no_grad():
            teacher_modules = self.teacher.module
            teacher = self.project_patches(teacher_modules["backbone"](teacher_view).tokens,
                                           teacher_modules["projector"])
        loss = patch_contrast_loss(student, teacher, masked, self.opts["temperature"])
        return {"loss": loss, "logs": {"masked_fraction": float(masked.float().mean())}}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA update of the teacher, momentum on the cosine schedule over the stage's steps."""
        self.teacher.update(self.student(), cosine_momentum(step, self.context.total_steps, self.opts["momentum"]))

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}


@sslbench.hookimpl
def register_objectives(register):
    register("conmim", ConMIM)
