"""The changes to timm's Vision Transformer that the self-supervised methods need, besides masking (in
:mod:`sslbench.core.backbone`): fixed 2-D sin-cos position embeddings (MAE, He et al. 2021; MiCL, Yang & Xu 2024)
and data2vec 2.0's post-norm block (Baevski et al. 2022). ``build_backbone`` applies them from recipe keys."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sslbench.core.beit import is_beit
from sslbench.core.errors import UserError


def sincos_2d_position_embedding(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding, (grid_h * grid_w, dim), patches in row-major order.

    Same layout as MAE's ``get_2d_sincos_pos_embed`` (so MAE and data2vec 2.0 checkpoints agree with it):
    the first half of the features encodes the patch's *column*, the second half its *row*; each half is
    ``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 10000 ** (-k / (dim / 4))``, k = 0 .. dim/4 - 1.
    """
    if dim % 4:
        raise UserError(f"backbone.pos_embed = 'sincos' needs embed_dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def encode(position: Tensor) -> Tensor:
        angles = position.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def _post_norm_block_class() -> type:
    """data2vec 2.0's post-norm block: ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``.

    A subclass of timm's ``Block`` passed as ``block_fn``, so parameter names are exactly timm's (``norm1``,
    ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) and only the order of normalisation and
    residual changes. Defined on first use (``sslbench.core.vit_variants.PostNormBlock``): importing timm pulls in
    torchvision and torch._dynamo (~2 s), which commands that build no model (``sslbench list``) do without.
    """
    from timm.models.vision_transformer import Block

    class PostNormBlock(Block):
        __doc__ = _post_norm_block_class.__doc__

        def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
            x = self.norm1(x + self.drop_path1(self.ls1(self.attn(x, attn_mask=attn_mask, is_causal=is_causal))))
            return self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))

    PostNormBlock.__module__ = __name__
    return PostNormBlock


def _post_norm() -> type:
    """The one ``PostNormBlock`` class, made on first use."""
    if "PostNormBlock" not in globals():
        globals()["PostNormBlock"] = _post_norm_block_class()
    return globals()["PostNormBlock"]


def __getattr__(name: str):
    if name == "PostNormBlock":          # `from sslbench.core.vit_variants import PostNormBlock` (PEP 562)
        return _post_norm()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fix_sincos(vit: nn.Module) -> None:
    """Overwrite ``vit``'s position embedding with the fixed sin-cos table (zero rows for prefix tokens) and
    freeze it."""
    if vit.pos_embed is None:
        raise UserError("backbone.pos_embed = 'sincos' needs a model with a position embedding"
                        + (" (a BEiT needs backbone.model_args.use_abs_pos_emb = true)" if is_beit(vit) else ""))
    grid_h, grid_w = vit.patch_embed.grid_size
    table = sincos_2d_position_embedding(grid_h, grid_w, vit.embed_dim)
    if not getattr(vit, "no_embed_class", False):
        table = torch.cat([torch.zeros(vit.num_prefix_tokens, vit.embed_dim), table])
    with torch.no_grad():
        vit.pos_embed.copy_(table.unsqueeze(0))
    vit.pos_embed.requires_grad_(False)
