"""A timm Vision Transformer seen as stages, with one forward that understands masks and intermediate blocks.

``build_backbone`` creates any timm ``VisionTransformer`` by name with size overrides, so a 28-px grayscale
toy ViT and ViT-L/16 come from the same code, and adds what the self-supervised methods need:

* fixed 2-D sin-cos position embeddings (MAE, He et al. 2021; MiCL, Yang & Xu 2024);
* post-norm blocks, a norm on the embeddings and no final norm (data2vec 2.0, Baevski et al. 2022);
* a forward that takes a :mod:`sslbench.core.masks` mask (drop / replace / split) and returns the residual stream
  of any requested blocks, raw and/or through the final norm (MIM-Refiner, Alkin et al. 2024, attaches heads
  to the *raw* CLS of intermediate blocks). timm's ``forward_intermediates`` takes no masks, so the block loop
  is ours.

>>> backbone = build_backbone("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, embed_dim=32,
...                           depth=2, num_heads=2)
>>> out = backbone(torch.zeros(3, 1, 28, 28), blocks=[-1], out="raw")
>>> out.tokens.shape, sorted(out.raw)
(torch.Size([3, 50, 32]), [1])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sslbench.core import beit as _beit
from sslbench.core.errors import UserError
from sslbench.core.masks import DropMask, Mask, ReplaceMask, SplitMask
from sslbench.core.vit_variants import _post_norm, fix_sincos, sincos_2d_position_embedding

POS_EMBEDS = ("learned", "sincos")
BLOCKS = ("pre_norm", "post_norm")
OUTPUTS = ("normed", "raw", "both")
# parameter-name roots that belong to the stem, i.e. layer 0 for layer-wise LR decay
_EMBEDDING_ROOTS = ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre", "mask_token")
__all__ = ["Backbone", "BackboneOutput", "build_backbone", "sincos_2d_position_embedding", "PostNormBlock",
           "POS_EMBEDS", "BLOCKS", "OUTPUTS"]


def __getattr__(name: str):
    if name == "PostNormBlock":          # `from sslbench.core.backbone import PostNormBlock` (PEP 562)
        return _post_norm()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class BackboneOutput:
    """What :meth:`Backbone.forward` returns.

    ``tokens``: output of the last block after the final norm, (B', P + K, D) with CLS at index 0 (P prefix
    tokens, K patch tokens); ``None`` when ``final=False``. ``raw[k]`` / ``normed[k]``: the residual stream
    after block k without / with the final norm. B' = B, or S*B for a :class:`~sslbench.core.masks.SplitMask`.
    """

    tokens: Tensor | None
    raw: dict[int, Tensor] = field(default_factory=dict)
    normed: dict[int, Tensor] = field(default_factory=dict)

    @property
    def cls(self) -> Tensor:
        """The final normed CLS token, (B', D)."""
        if self.tokens is None:
            raise ValueError("forward(final=False) computed no final tokens")
        return self.tokens[:, 0]


class Backbone(nn.Module):
    """A timm ViT (``self.vit``) with a mask-aware, intermediate-block-returning forward.

    Attributes: ``embed_dim``, ``depth``, ``num_heads``, ``num_patches``, ``grid_size`` (h, w),
    ``patch_size`` and ``img_size`` (pixels; square), ``in_chans``, ``num_prefix_tokens`` (1 = CLS, more with
    register tokens) and ``architecture`` (the build options that change the math, for checkpoint checks).

    ``fc_norm``: the LayerNorm a classification model applies to its mean-pooled patch tokens (data2vec 2.0's
    probe and fine-tuning feature), set by :func:`~sslbench.core.checkpoints.load_checkpoint` from a file that has
    one, else ``None``. Only the ``mean_fc_norm`` evaluation feature uses it; it is never trained.
    """

    def __init__(self, vit: nn.Module, model: str = "", pos_embed: str = "learned"):
        super().__init__()
        self.vit = vit
        self.model_name = model
        self.embed_dim: int = vit.embed_dim
        self.depth: int = len(vit.blocks)
        self.num_heads: int = vit.blocks[0].attn.num_heads
        self.grid_size: tuple[int, int] = tuple(vit.patch_embed.grid_size)
        self.num_patches: int = self.grid_size[0] * self.grid_size[1]
        img_h, img_w = vit.patch_embed.img_size
        patch_h, patch_w = vit.patch_embed.patch_size
        if img_h != img_w or patch_h != patch_w:
            raise UserError(f"backbone.model: {model!r} has non-square images or patches "
                            f"({img_h}x{img_w}, patch {patch_h}x{patch_w}); sslbench supports square ones")
        self.patch_size: int = patch_h
        self.img_size: int = img_h
        self.in_chans: int = vit.patch_embed.proj.in_channels
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        # a timm Beit (relative position bias, layer scale): its blocks run through sslbench.core.beit
        self.is_beit: bool = _beit.is_beit(vit)
        self.architecture: dict[str, Any] = {
            "pos_embed": pos_embed,
            "block": "beit" if self.is_beit else
                     "post_norm" if isinstance(vit.blocks[0], _post_norm()) else "pre_norm",
            "pre_norm": not isinstance(getattr(vit, "norm_pre", nn.Identity()), nn.Identity),
            "final_norm": not isinstance(vit.norm, nn.Identity),
            "no_embed_class": bool(getattr(vit, "no_embed_class", False)),
        }
        if self.is_beit:
            self.architecture.update(_beit.architecture(vit))
        # a plain None until a checkpoint brings one, so a backbone without it has the same repr and state dict
        # (and feature-cache keys) as before the attribute existed
        self.fc_norm: nn.Module | None = None

    def fixed_parameters(self) -> set[str]:
        """Names (relative to this module) of parameters that are fixed by construction and never trained, whatever
        a stage freezes or unfreezes: the 2-D sin-cos position table of ``pos_embed = "sincos"`` (MAE, MiCL) and
        a loaded pooling norm (``fc_norm``: no objective uses it, and an unused trainable parameter would stall
        DistributedDataParallel)."""
        fixed = {"vit.pos_embed"} if self.architecture["pos_embed"] == "sincos" else set()
        if self.fc_norm is not None:
            fixed |= {f"fc_norm.{name}" for name, _ in self.fc_norm.named_parameters()}
        return fixed

    # --- stages -------------------------------------------------------------------------------------------
    def grid_of(self, images: Tensor) -> tuple[int, int]:
        """The patch grid (rows, columns) of ``images``; any size that is a multiple of the patch size works."""
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"a {h}x{w} view is not divisible into {p}-px patches")
        return h // p, w // p

    def embed(self, images: Tensor) -> Tensor:
        """Patch embeddings (B, N, D), no position embedding, no CLS. Views of another size than the backbone's
        (multi-crop's local crops) go through the same projection and norm."""
        if tuple(images.shape[-2:]) == (self.img_size, self.img_size):
            x = self.vit.patch_embed(images)
            return x.flatten(1, 2) if x.ndim == 4 else x  # dynamic-size timm models emit NHWC
        self.grid_of(images)
        embed = self.vit.patch_embed
        return embed.norm(embed.proj(images).flatten(2).transpose(1, 2))

    def add_pos_embed(self, patches: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Add the patch part of the position embedding to (B, N, D) patch tokens in patch order. For another
        ``grid`` than the backbone's the table is resized bicubically (DINO-style multi-crop; a fixed sin-cos table
        is resized the same way)."""
        pos = self.vit.pos_embed
        if pos is None:
            return patches
        # timm layouts: pos_embed covers [prefix tokens, patches] unless no_embed_class (BEiT: always covers CLS)
        pos = pos if getattr(self.vit, "no_embed_class", False) else pos[:, self.num_prefix_tokens:]
        if grid is None or tuple(grid) == tuple(self.grid_size):
            return patches + pos
        gh, gw = self.grid_size
        table = pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2).float()
        table = F.interpolate(table, size=tuple(grid), mode="bicubic", align_corners=False)
        return patches + table.permute(0, 2, 3, 1).reshape(1, -1, patches.shape[-1]).to(patches.dtype)

    def patch_tokens(self, images: Tensor) -> Tensor:
        """Patch embeddings with their position embeddings, (B, N, D), no CLS, for images of any size that is a
        multiple of the patch size."""
        return self.add_pos_embed(self.embed(images), self.grid_of(images))

    def prepend_prefix(self, tokens: Tensor) -> Tensor:
        """Concatenate CLS (and register) tokens, with their own position embedding if the layout has one."""
        vit = self.vit
        parts = [p for p in (vit.cls_token, getattr(vit, "reg_token", None)) if p is not None]
        if not parts:
            return tokens
        prefix = torch.cat(parts, dim=1)
        if vit.pos_embed is not None and not getattr(vit, "no_embed_class", False):
            prefix = prefix + vit.pos_embed[:, :self.num_prefix_tokens]
        return torch.cat([prefix.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)

    def block_indices(self, blocks: Sequence[int]) -> list[int]:
        """Requested block indices normalised to 0..depth-1 (negative count from the end)."""
        out = []
        for b in blocks:
            if not -self.depth <= b < self.depth:
                raise UserError(f"block index {b} is out of range for a {self.depth}-block backbone "
                                f"(allowed {-self.depth}..{self.depth - 1})")
            out.append(b % self.depth)
        return out

    # --- forward ------------------------------------------------------------------------------------------
    def forward(self, images: Tensor, mask: Mask | None = None, blocks: Sequence[int] = (),
                out: str = "normed", final: bool = True) -> BackboneOutput:
        """Encode ``images`` (B, C, H, W) of any size that is a multiple of the patch size, optionally masked,
        returning the final and requested block tokens.

        Order of operations (as in MAE / ConMIM / MiCL): patch embedding → mask-token replacement
        (:class:`ReplaceMask`) → patch position embeddings → token selection (:class:`DropMask`,
        :class:`SplitMask`) → CLS with its own position embedding → ``norm_pre`` → blocks.
        """
        x = self.embed(images)
        if isinstance(mask, ReplaceMask):
            token = mask.token.reshape(1, 1, -1).to(x.dtype)
            x = torch.where(mask.masked.unsqueeze(-1), token, x)
        grid = self.grid_of(images)
        x = self.add_pos_embed(x, grid)
        positions = None  # grid positions of the kept patches (for a relative position bias); None: all, in order
        if isinstance(mask, DropMask):
            x = torch.gather(x, 1, mask.keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            positions = mask.keep
        elif isinstance(mask, SplitMask):
            batch, splits, per_split = mask.groups.shape
            x = torch.gather(x, 1, mask.groups.reshape(batch, splits * per_split, 1).expand(-1, -1, x.shape[-1]))
            # (B, S, K, D) → split-major (S*B, K, D): rows [s*B:(s+1)*B] are split s
            x = x.reshape(batch, splits, per_split, -1).transpose(0, 1).reshape(splits * batch, per_split, -1)
            positions = mask.groups.transpose(0, 1).reshape(splits * batch, per_split)
        elif mask is not None and not isinstance(mask, ReplaceMask):
            raise TypeError(f"unknown mask type {type(mask).__name__}")
        return self.forward_tokens(x, blocks=blocks, out=out, final=final, positions=positions, grid=grid)

    def forward_tokens(self, patches: Tensor, *, cls: bool = True, blocks: Sequence[int] = (),
                       out: str = "normed", final: bool = True, positions: Tensor | None = None,
                       grid: tuple[int, int] | None = None) -> BackboneOutput:
        """Run the encoder on patch tokens that already carry their position embeddings, (B, K, D).

        ``cls=False`` runs the blocks without prefix tokens. With ``final=False`` the loop stops after the
        last requested block. A BEiT backbone's relative position bias needs to know where the tokens are:
        ``positions`` (B, K) are their patch indices on ``grid`` (default: the backbone's); without them the K
        tokens must be the whole grid in patch order. A plain ViT ignores both (its positions are in the tokens).
        """
        if out not in OUTPUTS:
            raise ValueError(f"out must be one of {OUTPUTS}, got {out!r}")
        wanted = set(self.block_indices(blocks))
        if not final and not wanted:
            raise ValueError("forward(final=False) needs at least one requested block")
        bias = self._token_bias(patches, cls, positions, grid) if self.is_beit else None
        x = self.prepend_prefix(patches) if cls else patches
        x = self.vit.pos_drop(x)
        if not self.is_beit:
            x = self.vit.norm_pre(x)
        last = self.depth - 1 if final else max(wanted)
        raw: dict[int, Tensor] = {}
        normed: dict[int, Tensor] = {}
        for index in range(last + 1):
            block = self.vit.blocks[index]
            # BEiT: the block's own bias table is looked up inside the (checkpointed) call, so backward keeps
            # the shared (B, L, L) index instead of a (B, H, L, L) bias per block
            args = (x,) if bias is None else (x, bias.block_index(block), bias.shared)
            run = block if bias is None else lambda *a, _block=block: _beit.block_forward(_block, *a)
            if self.vit.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(run, *args, use_reentrant=False)
            else:
                x = run(*args)
            if index in wanted:
                if out in ("raw", "both"):
                    raw[index] = x
                if out in ("normed", "both"):
                    normed[index] = self.vit.norm(x)
        return BackboneOutput(tokens=self.vit.norm(x) if final else None, raw=raw, normed=normed)

    def _token_bias(self, patches: Tensor, cls: bool, positions: Tensor | None,
                    grid: tuple[int, int] | None) -> "_beit.TokenBias":
        grid = tuple(grid) if grid is not None else self.grid_size
        count = patches.shape[1]
        if positions is None and count != grid[0] * grid[1]:
            raise ValueError(f"forward_tokens on a BEiT backbone: {count} tokens are not the whole "
                             f"{grid[0]}x{grid[1]} grid; pass positions= (their patch indices)")
        if positions is not None and tuple(positions.shape) != tuple(patches.shape[:2]):
            raise ValueError(f"positions {tuple(positions.shape)} do not match the tokens {tuple(patches.shape[:2])}")
        return _beit.TokenBias(self.vit, positions, grid, cls, patches.device)

    # --- training helpers ---------------------------------------------------------------------------------
    def layer_id(self, param_name: str) -> int:
        """Layer of a parameter for layer-wise LR decay: stem 0, ``blocks.k`` k+1, the rest (final norm) depth+1.

        Accepts names relative to the backbone (``vit.blocks.3.attn.qkv.weight``) or to the ViT; any name
        containing ``mask_token`` (an objective's learned mask token) is counted as stem. A BEiT's shared relative
        position bias (``rel_pos_bias.*``) is depth+1, with the final norm, as in BEiT's and ConMIM's
        ``get_num_layer_for_vit`` (it serves every block; a per-block table is in its block).
        """
        name = param_name.removeprefix("vit.")
        root = name.split(".")[0]
        if root == "blocks":
            return int(name.split(".")[1]) + 1
        if root in _EMBEDDING_ROOTS or "mask_token" in name:
            return 0
        return self.depth + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        self.vit.grad_checkpointing = enable


def _model_defaults(model: str) -> nn.Module:
    """Build ``model`` on the meta device (no memory, no init cost) to read its default sizes and type."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(model):
        raise UserError(f"backbone.model: unknown timm model {model!r} (see timm.list_models('vit_*'))")
    with torch.device("meta"):
        probe = timm.create_model(model, pretrained=False, num_classes=0)
    if not isinstance(probe, VisionTransformer) and not _beit.is_beit(probe):
        raise UserError(f"backbone.model: {model!r} is a {type(probe).__name__}, expected a timm "
                        f"VisionTransformer (e.g. vit_base_patch16_224) or Beit (e.g. beit_base_patch16_224)")
    if not getattr(probe, "has_class_token", True):   # a Beit always has one
        raise UserError(f"backbone.model: {model!r} has no class token; sslbench needs one")
    return probe


def build_backbone(model: str, *, img_size: int | None = None, patch_size: int | None = None,
                   in_chans: int | None = None, embed_dim: int | None = None, depth: int | None = None,
                   num_heads: int | None = None, pos_embed: str = "learned", block: str = "pre_norm",
                   pre_norm: bool | None = None, final_norm: bool | None = None,
                   no_embed_class: bool | None = None, pretrained_timm: bool = False,
                   model_args: dict[str, Any] | None = None) -> Backbone:
    """Create timm's ``model`` with the given overrides (None = the model's own value) as a :class:`Backbone`.

    ``pos_embed='sincos'`` fixes the position embedding to :func:`sincos_2d_position_embedding` (CLS row
    zero) with ``requires_grad=False``; ``block='post_norm'`` uses :class:`PostNormBlock`; ``pre_norm=True``
    adds a LayerNorm on the embeddings before block 0 (the patch projection keeps its bias, unlike timm's
    CLIP-style ``pre_norm``); ``final_norm=False`` drops the final norm. ``model_args`` (recipe key
    ``backbone.model_args``) go to timm's constructor as they are, e.g. a BEiT's ``use_shared_rel_pos_bias``,
    ``use_rel_pos_bias``, ``use_abs_pos_emb``, ``init_values`` (layer scale) or ``drop_path_rate``; those the
    constructor does not take, and those sslbench sets itself, are refused.
    """
    if pos_embed not in POS_EMBEDS:
        raise UserError(f"backbone.pos_embed: got {pos_embed!r}, expected one of {', '.join(POS_EMBEDS)}")
    if block not in BLOCKS:
        raise UserError(f"backbone.block: got {block!r}, expected one of {', '.join(BLOCKS)}")
    probe = _model_defaults(model)
    size = img_size if img_size is not None else probe.patch_embed.img_size[0]
    patch = patch_size if patch_size is not None else probe.patch_embed.patch_size[0]
    dim = embed_dim if embed_dim is not None else probe.embed_dim
    heads = num_heads if num_heads is not None else probe.blocks[0].attn.num_heads
    if size % patch:
        raise UserError(f"backbone.img_size ({size}) must be divisible by backbone.patch_size ({patch})")
    if dim % heads:
        raise UserError(f"backbone.embed_dim ({dim}) must be divisible by backbone.num_heads ({heads})")

    beit = _beit.is_beit(probe)
    _beit.check_model_args(model, type(probe), dict(model_args or {}))
    if beit:
        _refuse_for_beit(model, block=block != "pre_norm", pre_norm=bool(pre_norm), final_norm=final_norm is False,
                         no_embed_class=bool(no_embed_class))
    given = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                 num_heads=num_heads, final_norm=None if beit else final_norm,
                 no_embed_class=None if beit else no_embed_class)
    overrides = {k: v for k, v in given.items() if v is not None}
    overrides.update(model_args or {})
    if pre_norm is False and not beit:
        overrides["pre_norm"] = False
    if block == "post_norm":
        overrides["block_fn"] = _post_norm()
    # fc_norm=False keeps the final norm in `vit.norm` (applied to every token), whatever the pooling default
    # (a Beit's argument is use_fc_norm: its default, with average pooling, would move the norm after pooling)
    overrides["use_fc_norm" if beit else "fc_norm"] = False
    import timm

    vit = timm.create_model(model, pretrained=pretrained_timm, num_classes=0, global_pool="token", **overrides)
    if pre_norm and isinstance(vit.norm_pre, nn.Identity):
        eps = getattr(vit.blocks[0].norm1, "eps", 1e-6)
        vit.norm_pre = nn.LayerNorm(vit.embed_dim, eps=eps)
    if pos_embed == "sincos":
        fix_sincos(vit)
    return Backbone(vit, model=model, pos_embed=pos_embed)


def _refuse_for_beit(model: str, **given: bool) -> None:
    """The data2vec 2.0 build options (from ``backbone.checkpoint_format``) have no BEiT counterpart."""
    wrong = [k for k, v in given.items() if v]
    if wrong:
        raise UserError(f"backbone.model: {model!r} is a BEiT (pre-norm blocks with relative position bias); it "
                        f"cannot be built with {', '.join(wrong)} (implied by backbone.checkpoint_format?)")
