"""The official MoCo v3 ViT checkpoints (Chen, Xie & He, ICCV 2021; facebookresearch/moco-v3) as a checkpoint
format, ``mocov3`` (the base encoder) and ``mocov3_momentum`` (its momentum encoder).

A MoCo v3 pre-training file (``vit-s-300ep.pth.tar``) holds ``state_dict`` of the DDP-wrapped MoCo model:
``module.base_encoder.*`` — a timm ``VisionTransformer`` subclass, so the keys are already timm's, with the
projection MLP as ``head.*`` — beside ``module.momentum_encoder.*`` and ``module.predictor.*``. The encoder's
position embedding is a fixed 2-D sin-cos table stored in the file (CLS row zero), hence ``pos_embed = "sincos"``;
the table itself comes from the file (MoCo v3 orders its halves differently from MAE, and the file's values win).

Note the official ViT-S has **12 heads** (timm's ``vit_small_patch16_224`` has 6): a recipe sets
``num_heads = 12`` — the head count does not show in the weights' shapes, so it cannot be checked.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sslbench.core.checkpoints import CheckpointFormat
from sslbench.core.state_dicts import entry as _entry, strip as _strip, tensors as _tensors
from sslbench.core.errors import UserError


def _mocov3(encoder: str):
    def convert(obj: Any) -> dict[str, Tensor]:
        state = _strip(_tensors(_entry(obj, "state_dict"), "MoCo v3 weights under 'state_dict'"), "module.")
        prefix = f"{encoder}."
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not picked:
            roots = sorted({k.split(".")[0] for k in state})[:6]
            raise UserError(f"no {prefix}* keys (found roots: {', '.join(roots)}); is it a MoCo v3 pre-training "
                            "checkpoint (vit-*-300ep.pth.tar)?")
        return picked       # head.* (the projector) is reported as a dropped classifier key
    return convert


MOCOV3_FORMATS = {
    fmt.name: fmt for fmt in (
        CheckpointFormat("mocov3", "official MoCo v3 ViT pre-training checkpoint (facebookresearch/moco-v3), "
                                   "base encoder without its projector", {"pos_embed": "sincos"},
                         _mocov3("base_encoder")),
        CheckpointFormat("mocov3_momentum", "official MoCo v3 ViT pre-training checkpoint, momentum encoder",
                         {"pos_embed": "sincos"}, _mocov3("momentum_encoder")),
    )
}
