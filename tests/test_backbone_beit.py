"""BEiT-family timm models as backbones: timm's own forward, masks with the bias of the kept positions, blocks,
gradient checkpointing, smaller views, layer ids and the recipe's model_args."""

from __future__ import annotations

import pytest
import torch

from sslbench.core.backbone import Backbone, build_backbone
from sslbench.core.beit import relative_index
from sslbench.core.errors import RecipeError, UserError
from sslbench.core.masks import DropMask, ReplaceMask, random_drop_mask, random_replace_mask, random_split_mask

TINY = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2)
ATOL = 1e-5
SHARED = dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_abs_pos_emb=False)
PER_BLOCK = dict(use_shared_rel_pos_bias=False, use_rel_pos_bias=True, use_abs_pos_emb=False)
LAYOUTS = {
    "shared+layer_scale": {**SHARED, "init_values": 0.1},
    "shared": {**SHARED, "init_values": 0},
    "per_block+layer_scale": {**PER_BLOCK, "init_values": 1e-5},
    "per_block": {**PER_BLOCK, "init_values": 0},
    "both+abs_pos": {**SHARED, "use_rel_pos_bias": True, "use_abs_pos_emb": True, "init_values": 0.1},
}


def tiny_beit(model_args: dict, **kw) -> Backbone:
    """A tiny BEiT whose bias tables, layer scales and CLS are random (timm initialises them to 0 / constants,
    which would hide a bias looked up at the wrong positions)."""
    torch.manual_seed(0)
    backbone = build_backbone("beit_base_patch16_224", model_args=model_args, **{**TINY, **kw}).eval()
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "relative_position_bias_table" in name or "gamma" in name or "cls_token" in name:
                p.normal_()
    return backbone


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def beit(request) -> Backbone:
    return tiny_beit(LAYOUTS[request.param])


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


# --- an independent reference: timm's full-window bias, restricted by hand, and attention written out ----------

def full_biases(backbone: Backbone) -> list[torch.Tensor]:
    """Each block's (H, N+1, N+1) bias over the whole window, as timm computes it (shared + its own)."""
    vit = backbone.vit
    shared = vit.rel_pos_bias() if vit.rel_pos_bias is not None else 0
    out = []
    for block in vit.blocks:
        own = block.attn._get_rel_pos_bias()[0] if block.attn.relative_position_bias_table is not None else 0
        out.append(shared + own)
    return out


def reference_encoder(backbone: Backbone, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """CLS + ``tokens`` (B, K, D, positions included) through the blocks, attention softmax(q·kᵀ·s + bias) v with
    the full-window bias's rows and columns taken at [CLS] + the kept patches (``keep`` (B, K))."""
    vit = backbone.vit
    cls = vit.cls_token + (vit.pos_embed[:, :1] if vit.pos_embed is not None else 0)
    x = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    rows = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], dim=1)                      # (B, L) window indices
    for block, bias in zip(vit.blocks, full_biases(backbone)):
        attn = block.attn
        h = block.norm1(x)
        b, n, d = h.shape
        qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        q, k, v = (h @ attn.qkv.weight.T + qkv_bias).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) * attn.scale
        if torch.is_tensor(bias):
            logits = logits + torch.stack([bias[:, r][:, :, r] for r in rows])
        h = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))
        gamma1 = block.gamma_1 if block.gamma_1 is not None else 1
        gamma2 = block.gamma_2 if block.gamma_2 is not None else 1
        x = x + gamma1 * h
        x = x + gamma2 * block.mlp(block.norm2(x))
    return vit.norm(x)


def patch_inputs(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    vit = backbone.vit
    x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
    return x + vit.pos_embed[:, 1:] if vit.pos_embed is not None else x


# --- tests ---------------------------------------------------------------------------------------------------

def test_unmasked_forward_equals_timm(beit, images):
    with torch.no_grad():
        out = beit(images)
        assert out.tokens.shape == (4, 50, 32)
        assert torch.allclose(out.tokens, beit.vit.forward_features(images), atol=ATOL)
        everything = torch.arange(49).expand(4, -1)
        assert torch.allclose(out.tokens, reference_encoder(beit, patch_inputs(beit, images), everything), atol=ATOL)


def test_attributes_and_architecture():
    b = tiny_beit(LAYOUTS["shared+layer_scale"])
    assert (b.embed_dim, b.depth, b.num_heads, b.grid_size, b.num_patches) == (32, 3, 2, (7, 7), 49)
    assert (b.img_size, b.patch_size, b.in_chans, b.num_prefix_tokens) == (28, 4, 1, 1)
    assert b.architecture == {"pos_embed": "learned", "block": "beit", "pre_norm": False, "final_norm": True,
                              "no_embed_class": False, "rel_pos_bias": "shared", "layer_scale": True,
                              "abs_pos_embed": False}
    assert tiny_beit(LAYOUTS["per_block"]).architecture["rel_pos_bias"] == "per_block"
    assert tiny_beit(LAYOUTS["both+abs_pos"]).architecture["rel_pos_bias"] == "shared+per_block"
    assert b.fixed_parameters() == set()


def test_drop_mask_uses_the_bias_of_the_kept_positions(beit, images):
    drop, _, _ = random_drop_mask(4, 49, 0.75, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = beit(images, mask=drop, blocks=[1], out="raw")
        full = patch_inputs(beit, images)
        gathered = torch.stack([full[b, drop.keep[b]] for b in range(4)])
        assert out.tokens.shape == (4, 13, 32)
        assert torch.allclose(out.tokens, reference_encoder(beit, gathered, drop.keep), atol=ATOL)
        # the bias follows the tokens: another order of the same kept patches gives the same CLS
        flipped = beit(images, mask=DropMask(drop.keep.flip(1)))
        assert torch.allclose(flipped.tokens[:, 0], out.tokens[:, 0], atol=ATOL)
        # ... and is not that of the first 12 positions (what timm's own attention would add)
        first = reference_encoder(beit, gathered, torch.arange(12).expand(4, -1))
        assert not torch.allclose(out.tokens, first, atol=1e-3)


def test_split_mask_equals_one_drop_mask_per_split(beit, images):
    split = random_split_mask(4, 49, 0.5, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = beit(images, mask=split)
        assert out.tokens.shape == (8, 13, 32)
        full = patch_inputs(beit, images)
        for s in range(2):
            keep = split.groups[:, s]
            gathered = torch.stack([full[b, keep[b]] for b in range(4)])
            assert torch.allclose(out.tokens[s * 4:(s + 1) * 4], reference_encoder(beit, gathered, keep), atol=ATOL)


def test_replace_mask_keeps_the_full_grid(beit, images):
    masked = random_replace_mask(4, 49, 0.5, torch.Generator().manual_seed(0))
    token = torch.randn(32)
    with torch.no_grad():
        out = beit(images, mask=ReplaceMask(masked, token))
        vit = beit.vit
        embedded = torch.where(masked[..., None], token, vit.patch_embed.proj(images).flatten(2).transpose(1, 2))
        inputs = embedded + (vit.pos_embed[:, 1:] if vit.pos_embed is not None else 0)
        assert torch.allclose(out.tokens, reference_encoder(beit, inputs, torch.arange(49).expand(4, -1)), atol=ATOL)


def test_intermediate_blocks_equal_timm(beit, images):
    with torch.no_grad():
        out = beit(images, blocks=[0, -2], out="both")
        for norm, stream in ((False, out.raw), (True, out.normed)):
            inter = beit.vit.forward_intermediates(images, indices=[0, 1], norm=norm, output_fmt="NLC",
                                                   return_prefix_tokens=True, intermediates_only=True)
            for k, (patches, prefix) in zip([0, 1], inter):
                assert torch.allclose(stream[k], torch.cat([prefix, patches], dim=1), atol=ATOL)
        early = beit(images, blocks=[0], out="raw", final=False)
        assert early.tokens is None and torch.allclose(early.raw[0], out.raw[0], atol=ATOL)


def test_gradient_checkpointing_gives_equal_gradients(images):
    drop, _, _ = random_drop_mask(4, 49, 0.5, torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        b = tiny_beit(LAYOUTS["both+abs_pos"]).train()        # dropout/drop-path are 0: train mode is deterministic
        b.set_grad_checkpointing(checkpointing)
        loss = b(images, mask=drop, blocks=[1], out="raw").tokens.square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in b.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "vit.rel_pos_bias.relative_position_bias_table" in grads[0]
    assert "vit.blocks.2.attn.relative_position_bias_table" in grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_a_smaller_view_gets_the_bias_of_its_relative_offsets(beit):
    """A 4x4-patch view (a multi-crop local crop) has the relative offsets of a 4x4 corner of the 7x7 window."""
    small = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = beit(small)
        corner = torch.tensor([r * 7 + c for r in range(4) for c in range(4)]).expand(2, -1)
        expected = reference_encoder(beit, beit.patch_tokens(small), corner)
        assert out.tokens.shape == (2, 17, 32) and torch.allclose(out.tokens, expected, atol=ATOL)
    with pytest.raises(UserError, match="larger than the 7x7 window"):
        beit(torch.zeros(1, 1, 32, 32))


def test_relative_index_matches_timm():
    from timm.models.beit import gen_relative_position_index

    assert torch.equal(relative_index((3, 4), torch.arange(12), (3, 4)), gen_relative_position_index((3, 4)))
    # two tokens (row 0, col 1) and (row 2, col 0) on a 3x3 grid in a 3x3 window: 5x5 = 25 offsets + 3 CLS entries
    index = relative_index((3, 3), torch.tensor([1, 6]), (3, 3))
    # CLS→patch 28−3, patch→CLS 28−2, CLS→CLS 28−1; patch pairs (Δrow + 2)·5 + (Δcol + 2), self 2·5 + 2 = 12
    assert index.tolist() == [[27, 25, 25], [26, 12, (0 - 2 + 2) * 5 + (1 - 0 + 2)], [26, (2 - 0 + 2) * 5 + 1, 12]]


def test_forward_tokens_needs_positions_for_a_subset(beit, images):
    tokens = patch_inputs(beit, images)
    with pytest.raises(ValueError, match="pass positions"):
        beit.forward_tokens(tokens[:, :10])
    with torch.no_grad():
        keep = torch.arange(10).expand(4, -1) * 3
        direct = beit.forward_tokens(tokens[:, ::3][:, :10], positions=keep)
        assert torch.allclose(direct.tokens, beit(images, mask=DropMask(keep)).tokens, atol=ATOL)


def test_layer_ids_put_the_shared_bias_with_the_final_norm():
    b = tiny_beit(LAYOUTS["both+abs_pos"])
    assert b.layer_id("vit.rel_pos_bias.relative_position_bias_table") == 4          # BEiT / ConMIM: num_layers - 1
    assert b.layer_id("vit.blocks.1.attn.relative_position_bias_table") == 2
    assert b.layer_id("vit.blocks.0.gamma_1") == b.layer_id("vit.blocks.0.attn.q_bias") == 1
    assert b.layer_id("vit.cls_token") == b.layer_id("vit.pos_embed") == 0
    assert sorted({b.layer_id(n) for n, _ in b.named_parameters()}) == [0, 1, 2, 3, 4]


def test_bf16_autocast_runs_with_the_bias_in_the_logits_dtype(images):
    b = tiny_beit(LAYOUTS["shared+layer_scale"])
    drop, _, _ = random_drop_mask(4, 49, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = b(images, mask=drop).tokens
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = b(images, mask=drop).tokens
    assert torch.allclose(low.float(), exact, atol=0.1)


def test_sincos_needs_absolute_positions():
    b = build_backbone("beit_base_patch16_224", pos_embed="sincos", model_args={"use_abs_pos_emb": True}, **TINY)
    assert b.fixed_parameters() == {"vit.pos_embed"} and not b.vit.pos_embed.requires_grad
    with pytest.raises(UserError, match="use_abs_pos_emb = true"):
        build_backbone("beit_base_patch16_224", pos_embed="sincos", **TINY)


@pytest.mark.parametrize("args, match", [
    ({"use_shared_rel_pos_bias": 1}, r"backbone\.model_args\.use_shared_rel_pos_bias: expected true or false"),
    ({"init_values": "small"}, r"backbone\.model_args\.init_values: expected a number"),
    ({"use_relative_bias": True}, r"backbone\.model_args\.use_relative_bias: Beit .* takes no argument"),
    ({"embed_dim": 64}, r"backbone\.model_args\.embed_dim: not settable here \(backbone\.embed_dim\)"),
    ({"global_pool": "avg"}, r"backbone\.model_args\.global_pool: not settable here"),
    ({"norm_layer": "LayerNorm"}, r"backbone\.model_args\.norm_layer: a .* cannot be set from a recipe"),
])
def test_model_args_errors_name_the_key(args, match):
    with pytest.raises(RecipeError, match=match):
        build_backbone("beit_base_patch16_224", model_args=args, **TINY)


def test_data2vec_options_are_refused_for_a_beit():
    with pytest.raises(UserError, match="cannot be built with block, pre_norm, final_norm"):
        build_backbone("beit_base_patch16_224", block="post_norm", pre_norm=True, final_norm=False, **TINY)


def test_model_args_reach_a_plain_vit_too():
    b = build_backbone("vit_tiny_patch16_224", model_args={"init_values": 0.1}, **TINY)
    assert b.architecture["block"] == "pre_norm" and b.vit.blocks[0].ls1.gamma.shape == (32,)


def test_official_conmim_vitl_architecture_on_the_meta_device():
    with torch.device("meta"):
        b = build_backbone("beit_large_patch16_224", model_args={**SHARED, "init_values": 1e-5})
    assert (b.embed_dim, b.depth, b.num_heads, b.num_patches) == (1024, 24, 16, 196)
    assert b.architecture["rel_pos_bias"] == "shared" and b.vit.pos_embed is None
    assert b.vit.rel_pos_bias.relative_position_bias_table.shape == (27 * 27 + 3, 16)


def test_a_recipe_trains_evaluates_and_reloads_a_beit(tiny_recipe, write_recipe, tmp_path, capsys):
    """`sslbench run` of a BEiT recipe: MAE drops 75% of the patches (bias of the kept positions), the k-NN
    evaluation runs, and the saved backbone.pt records model_args and loads into the BEiT it describes."""
    from sslbench.cli import main
    from sslbench.core.checkpoints import load_checkpoint
    from sslbench.core.registry import get_registry
    from sslbench.training.assembly import build_model
    from sslbench.training.recipe import resolve

    tiny_recipe["backbone"] = {"model": "beit_base_patch16_224", "img_size": 16, "patch_size": 4, "in_chans": 1,
                               "embed_dim": 32, "depth": 2, "num_heads": 2,
                               "model_args": {**SHARED, "init_values": 0.1}}
    tiny_recipe["stages"][0]["steps"] = 2
    assert main(["run", str(write_recipe(tiny_recipe)), "--no-progress"]) == 0, capsys.readouterr().err
    run_dir = tmp_path / "runs" / "tiny"
    assert "knn" in (run_dir / "metrics.csv").read_text()
    saved = torch.load(run_dir / "checkpoints" / "backbone.pt", weights_only=True)
    assert saved["backbone_recipe"]["model_args"] == {**SHARED, "init_values": 0.1}
    assert "rel_pos_bias.relative_position_bias_table" in saved["backbone"]
    recipe = resolve(tiny_recipe, get_registry())
    backbone, _ = build_model(recipe, get_registry())
    load_checkpoint(backbone, run_dir / "checkpoints" / "backbone.pt", "sslbench")
    assert torch.equal(backbone.vit.rel_pos_bias.relative_position_bias_table,
                       saved["backbone"]["rel_pos_bias.relative_position_bias_table"])
    other = dict(tiny_recipe, backbone={**tiny_recipe["backbone"], "model_args": {}})
    assert resolve(other, get_registry()).recipe_hash != recipe.recipe_hash  # model_args are hashed when given


def test_freezing_the_stem_freezes_the_shared_bias():
    """Frozen blocks[:K] must compute as before: the shared table feeds them, so it is frozen with the stem."""
    from sslbench.training.optim import frozen_names

    holder = torch.nn.Module()
    holder.backbone = tiny_beit(LAYOUTS["both+abs_pos"])
    frozen = frozen_names(holder, ["blocks[:1]"], 3, "stages[0].freeze")
    assert "backbone.vit.rel_pos_bias.relative_position_bias_table" in frozen
    assert "backbone.vit.blocks.0.attn.relative_position_bias_table" in frozen
    assert "backbone.vit.blocks.1.attn.relative_position_bias_table" not in frozen
    assert "backbone.vit.rel_pos_bias.relative_position_bias_table" in frozen_names(holder, ["stem"], 3, "f")
