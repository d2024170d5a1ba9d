from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from sslbench.core.backbone import Backbone, PostNormBlock, build_backbone, sincos_2d_position_embedding
from sslbench.core.errors import UserError
from sslbench.core.masks import DropMask, ReplaceMask, random_drop_mask, random_replace_mask, random_split_mask

TINY = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2)
ATOL = 1e-5


def tiny(**kw) -> Backbone:
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny_patch16_224", **{**TINY, **kw}).eval()
    with torch.no_grad():  # timm initialises CLS near zero; make it matter in the comparisons
        backbone.vit.cls_token.normal_()
    return backbone


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return tiny()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def manual_encoder(backbone: Backbone, patch_inputs: torch.Tensor) -> torch.Tensor:
    """Independent reference: CLS + its position, then timm's blocks and final norm; inputs carry positions."""
    vit = backbone.vit
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(patch_inputs.shape[0], -1, -1)
    x = torch.cat([cls, patch_inputs], dim=1)
    for block in vit.blocks:
        x = block(x)
    return vit.norm(x)


def patch_inputs(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    vit = backbone.vit
    return vit.patch_embed.proj(images).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]


def test_sizes_and_attributes(backbone):
    assert (backbone.embed_dim, backbone.depth, backbone.num_heads) == (32, 3, 2)
    assert backbone.grid_size == (7, 7) and backbone.num_patches == 49
    assert (backbone.img_size, backbone.patch_size, backbone.in_chans, backbone.num_prefix_tokens) == (28, 4, 1, 1)


def test_forward_equals_timm(backbone, images):
    with torch.no_grad():
        out = backbone(images)
        assert out.tokens.shape == (4, 50, 32)
        assert torch.allclose(out.tokens, backbone.vit.forward_features(images), atol=ATOL)
        assert torch.allclose(out.cls, out.tokens[:, 0])


def test_intermediate_blocks_equal_forward_intermediates(backbone, images):
    with torch.no_grad():
        out = backbone(images, blocks=[0, -2], out="both")
        assert sorted(out.raw) == sorted(out.normed) == [0, 1]
        for norm, stream in ((False, out.raw), (True, out.normed)):
            inter = backbone.vit.forward_intermediates(images, indices=[0, 1], norm=norm, output_fmt="NLC",
                                                       return_prefix_tokens=True, intermediates_only=True)
            for k, (patches, prefix) in zip([0, 1], inter):
                assert torch.allclose(stream[k], torch.cat([prefix, patches], dim=1), atol=ATOL)
        only_raw = backbone(images, blocks=[2], out="raw")
        assert not only_raw.normed and torch.allclose(backbone.vit.norm(only_raw.raw[2]), only_raw.tokens, atol=ATOL)


def test_final_false_stops_after_last_requested_block(backbone, images):
    calls = []
    hook = backbone.vit.blocks[2].register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            out = backbone(images, blocks=[0], out="raw", final=False)
    finally:
        hook.remove()
    assert out.tokens is None and list(out.raw) == [0] and not calls


def test_drop_mask_equals_encoder_on_gathered_tokens(backbone, images):
    drop, _, _ = random_drop_mask(4, 49, 0.75, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = backbone(images, mask=drop, blocks=[1], out="raw")
        full = patch_inputs(backbone, images)
        gathered = torch.stack([full[b, drop.keep[b]] for b in range(4)])
        assert out.tokens.shape == (4, 1 + 12, 32)
        assert torch.allclose(out.tokens, manual_encoder(backbone, gathered), atol=ATOL)
        # patch tokens carry their positions, so the CLS output does not depend on the order they are kept in
        reversed_order = backbone(images, mask=DropMask(drop.keep.flip(1)))
        assert torch.allclose(reversed_order.tokens[:, 0], out.tokens[:, 0], atol=ATOL)


def test_replace_mask(backbone, images):
    token = torch.randn(32, requires_grad=True)
    with torch.no_grad():
        nothing = ReplaceMask(torch.zeros(4, 49, dtype=torch.bool), token)
        assert torch.allclose(backbone(images, mask=nothing).tokens, backbone(images).tokens, atol=ATOL)
        masked = random_replace_mask(4, 49, 0.5, torch.Generator().manual_seed(0))
        out = backbone(images, mask=ReplaceMask(masked, token.reshape(1, 1, 32)))
        # the token replaces the patch embedding *before* position embeddings are added
        vit = backbone.vit
        embedded = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
        inputs = torch.where(masked[..., None], token, embedded) + vit.pos_embed[:, 1:]
        assert out.tokens.shape == (4, 50, 32)
        assert torch.allclose(out.tokens, manual_encoder(backbone, inputs), atol=ATOL)
    backbone(images, mask=ReplaceMask(masked, token)).tokens.sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


def test_split_mask_is_split_major(backbone, images):
    split = random_split_mask(4, 49, 0.5, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = backbone(images, mask=split, blocks=[0], out="raw")
        assert out.tokens.shape == (8, 1 + 12, 32) and out.raw[0].shape == (8, 13, 32)
        for s in range(2):
            alone = backbone(images, mask=DropMask(split.groups[:, s]))
            assert torch.allclose(out.tokens[s * 4:(s + 1) * 4], alone.tokens, atol=ATOL)


def mae_sincos_reference(grid: int, dim: int) -> np.ndarray:
    """MAE's formula written out independently (numpy, 'xy' meshgrid: first half encodes the column)."""
    grid_w, grid_h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))

    def one(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(grid_w), one(grid_h)], axis=1)


def test_sincos_values():
    s, c = math.sin(1.0), math.cos(1.0)
    # dim 4: one frequency (1) per half; tokens (row, col) = (0,0), (0,1), (1,0), (1,1)
    expected = torch.tensor([[0, 1, 0, 1], [s, c, 0, 1], [0, 1, s, c], [s, c, s, c]])
    assert torch.allclose(sincos_2d_position_embedding(2, 2, 4), expected)
    # dim 8: frequencies 1 and 1/100; token (row 2, col 1) of a 3x3 grid
    row = sincos_2d_position_embedding(3, 3, 8)[2 * 3 + 1]
    assert torch.allclose(row, torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01),
                                             math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]))
    assert np.allclose(sincos_2d_position_embedding(5, 5, 16).numpy(), mae_sincos_reference(5, 16), atol=1e-6)


def test_sincos_backbone_is_fixed():
    b = tiny(pos_embed="sincos")
    assert not b.vit.pos_embed.requires_grad
    assert torch.equal(b.vit.pos_embed[0, 0], torch.zeros(32))
    assert torch.allclose(b.vit.pos_embed[0, 1:], sincos_2d_position_embedding(7, 7, 32))
    assert b.architecture["pos_embed"] == "sincos"
    nb = tiny(pos_embed="sincos", no_embed_class=True)
    assert nb.vit.pos_embed.shape == (1, 49, 32)
    assert torch.allclose(nb.vit.pos_embed[0], sincos_2d_position_embedding(7, 7, 32))


def test_no_embed_class_and_register_layouts_equal_timm(images):
    torch.manual_seed(0)
    for vit in (timm.create_model("vit_tiny_patch16_224", num_classes=0, no_embed_class=True, **TINY),
                timm.create_model("vit_tiny_patch16_224", num_classes=0, reg_tokens=2, **TINY)):
        with torch.no_grad():
            vit.cls_token.normal_()
            backbone = Backbone(vit.eval())
            assert torch.allclose(backbone(images).tokens, vit.forward_features(images), atol=ATOL)
    assert backbone.num_prefix_tokens == 3


def test_post_norm_pre_norm_and_no_final_norm(images):
    b = tiny(block="post_norm", pre_norm=True, final_norm=False, no_embed_class=True)
    vit = b.vit
    assert all(isinstance(block, PostNormBlock) for block in vit.blocks)
    assert vit.patch_embed.proj.bias is not None and isinstance(vit.norm, torch.nn.Identity)
    assert set(vit.blocks[0].state_dict()) == set(tiny().vit.blocks[0].state_dict())
    assert b.architecture == {"pos_embed": "learned", "block": "post_norm", "pre_norm": True,
                              "final_norm": False, "no_embed_class": True}
    with torch.no_grad():
        for p in vit.norm_pre.parameters():
            p.normal_()
        x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2) + vit.pos_embed
        x = vit.norm_pre(torch.cat([vit.cls_token.expand(4, -1, -1), x], dim=1))
        for block in vit.blocks:  # x = norm1(x + attn(x)); x = norm2(x + mlp(x))
            x = block.norm1(x + block.attn(x))
            x = block.norm2(x + block.mlp(x))
        out = b(images, blocks=[-1], out="both")
        assert torch.allclose(out.tokens, x, atol=ATOL)
        assert torch.allclose(out.raw[2], x, atol=ATOL) and torch.allclose(out.normed[2], x, atol=ATOL)


def test_large_model_from_same_code():
    b = build_backbone("vit_large_patch16_224", depth=1)
    assert (b.embed_dim, b.num_heads, b.patch_size, b.img_size, b.num_patches) == (1024, 16, 16, 224, 196)


def test_layer_id(backbone):
    assert backbone.layer_id("vit.patch_embed.proj.weight") == 0
    assert backbone.layer_id("cls_token") == backbone.layer_id("pos_embed") == 0
    assert backbone.layer_id("norm_pre.weight") == backbone.layer_id("mask_token") == 0
    assert backbone.layer_id("vit.blocks.0.attn.qkv.weight") == 1
    assert backbone.layer_id("blocks.2.mlp.fc2.bias") == 3
    assert backbone.layer_id("vit.norm.weight") == backbone.layer_id("norm.bias") == 4
    names = [n for n, _ in backbone.named_parameters()]
    assert sorted({backbone.layer_id(n) for n in names}) == [0, 1, 2, 3, 4]


def test_gradient_checkpointing_gives_same_result(images):
    b = tiny()
    expected = b(images).tokens
    b.set_grad_checkpointing()
    got = b(images).tokens
    got.sum().backward()
    assert torch.allclose(expected, got, atol=ATOL) and b.vit.blocks[0].attn.qkv.weight.grad is not None


def test_user_errors(backbone, images):
    with pytest.raises(UserError, match="VisionTransformer"):
        build_backbone("resnet18")
    with pytest.raises(UserError, match="unknown timm model"):
        build_backbone("vit_nonexistent_model")
    with pytest.raises(UserError, match="img_size.*divisible.*patch_size"):
        build_backbone("vit_tiny_patch16_224", img_size=30, patch_size=4)
    with pytest.raises(UserError, match="embed_dim.*num_heads"):
        build_backbone("vit_tiny_patch16_224", **{**TINY, "embed_dim": 30, "num_heads": 4})
    with pytest.raises(UserError, match="divisible by 4"):
        build_backbone("vit_tiny_patch16_224", **{**TINY, "embed_dim": 30, "num_heads": 2}, pos_embed="sincos")
    with pytest.raises(UserError, match="pos_embed"):
        build_backbone("vit_tiny_patch16_224", pos_embed="rope")
    with pytest.raises(UserError, match="out of range"):
        backbone(images, blocks=[3])
