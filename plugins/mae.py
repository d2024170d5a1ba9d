"""MAE — masked autoencoder pre-training (He et al. 2021, arXiv 2111.06377).

The encoder sees a random 25% of the patch tokens (plus CLS); a light decoder with its own width, depth and fixed
sin-cos position embedding re-inserts mask tokens and predicts the pixels of every patch; the loss is the MSE on
the masked patches only, against per-patch normalised pixels (``norm_pix_loss``). The random masking is drawn from
the step's keyed random streams, so it depends only on (seed, step, sample).

    [[stages]]
    objective = "mae"
    [stages.options]
    mask_ratio = 0.75
    decoder_dim = 512
    decoder_depth = 8
"""

from __future__ import annotations

import torch
from torch import nn

import sslbench
from sslbench.core.backbone import sincos_2d_position_embedding
from sslbench.core.losses import mae_loss, patchify
from sslbench.core.masks import drop_mask_from_noise
from sslbench.core.objective import DataInfo, Objective
from sslbench.core.options import Option
from sslbench.data.views import Compose, IndependentCrops, Normalize, crop_flip


def mae_views(size: int, mean=None, std=None, scale: tuple[float, float] = (0.2, 1.0),
              flip: bool = True) -> IndependentCrops:
    """MAE (He et al. 2021): one view, RRC(0.2, 1) bicubic + flip."""
    return IndependentCrops(1, Compose([*crop_flip(size, scale, flip), Normalize(mean, std)]))


class MAE(Objective):
    name = "mae"
    description = "Masked autoencoder: pixel reconstruction of 75% masked patches (He et al. 2021)"
    options = {
        "mask_ratio": Option(0.75, float, "fraction of patch tokens dropped", min=0, max=1, min_exclusive=True),
        "decoder_dim": Option(512, int, "decoder width", min=8),
        "decoder_depth": Option(8, int, "decoder blocks", min=1),
        "decoder_heads": Option(16, int, "decoder attention heads", min=1),
        "norm_pix_loss": Option(True, bool, "normalise each target patch by its mean and variance"),
        "crop_scale": Option([0.2, 1.0], list, "random-resized-crop area range", item_type=float, min=0, max=1),
        "flip": Option(True, bool, "random horizontal flip"),
    }
    fixed_options = ("decoder_dim", "decoder_depth", "decoder_heads")

    def __init__(self, backbone, opts, context):
        super().__init__(backbone, opts, context)
        dim, width = backbone.embed_dim, opts["decoder_dim"]
        if width % opts["decoder_heads"]:
            raise self.option_error("decoder_heads", f"must divide decoder_dim {width}")
        patch_dim = backbone.patch_size ** 2 * backbone.in_chans
        self.decoder_embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        pos = sincos_2d_position_embedding(*backbone.grid_size, width)
        pos = torch.cat([torch.zeros(1, width), pos], dim=0)  # CLS position: zeros, as in MAE
        self.register_buffer("decoder_pos_embed", pos.unsqueeze(0), persistent=False)
        from timm.models.vision_transformer import Block   # timm is imported by the backbone's build anyway

        self.decoder_blocks = nn.ModuleList(
            Block(width, opts["decoder_heads"], mlp_ratio=4.0, qkv_bias=True) for _ in range(opts["decoder_depth"]))
        self.decoder_norm = nn.LayerNorm(width)
        self.decoder_pred = nn.Linear(width, patch_dim)
        self._init_decoder()

    def _init_decoder(self) -> None:
        torch.nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def views(self, data: DataInfo):
        return mae_views(data.image_size, data.mean, data.std, tuple(self.opts["crop_scale"]), self.opts["flip"])

    def forward(self, views, batch):
        images = views[0]
        # Per-sample random shuffle (MAE): the kept tokens are the first of the sorted keyed noise.
        noise = batch.rng.rand(self.backbone.num_patches).to(images.device)
        keep, masked, ids_restore = drop_mask_from_noise(noise, self.opts["mask_ratio"])
        mask = masked.to(images.dtype)

        latent = self.backbone(images, mask=keep).tokens
        pred = self.decode(latent, ids_restore)
        loss = mae_loss(pred, patchify(images, self.backbone.patch_size), mask, norm_pix=self.opts["norm_pix_loss"])
        return {"loss": loss, "logs": {}}

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        mask_tokens = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


@sslbench.hookimpl
def register_objectives(register):
    register("mae", MAE)
