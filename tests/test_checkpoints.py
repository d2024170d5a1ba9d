"""Checkpoint formats other than data2vec 2.0 (tests/test_checkpoints_data2vec2.py): timm, MAE, sslbench's own; load
errors; the registry of built-in formats."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from sslbench.core.backbone import build_backbone
from sslbench.core.checkpoints import BUILTIN_FORMATS, CheckpointFormat, load_checkpoint
from sslbench.core.errors import UserError

TINY = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
ATOL = 1e-5


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def reference_vit(**kw) -> torch.nn.Module:
    """A timm ViT with a classifier head and non-trivial CLS / position embeddings."""
    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, **{**TINY, **kw}).eval()
    with torch.no_grad():
        vit.cls_token.normal_()
        vit.pos_embed.normal_()
    return vit


def fresh(**kw):
    torch.manual_seed(123)  # different weights from the reference, so a no-op load cannot pass
    return build_backbone("vit_tiny_patch16_224", **{**TINY, **kw}).eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_format(tmp_path, images, suffix):
    ref = reference_vit()
    path = tmp_path / f"vit{suffix}"
    state = ref.state_dict()
    if suffix == ".pth":
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    else:
        save_file(state, str(path))
    backbone = fresh()
    report = load_checkpoint(backbone, path, "timm")
    assert report.dropped == ["head.bias", "head.weight"] and not report.unexpected and not report.missing
    with torch.no_grad():
        assert torch.allclose(backbone(images).tokens, ref.forward_features(images), atol=ATOL)


def test_timm_format_renames_fc_norm(tmp_path, images):
    ref = reference_vit(global_pool="avg")  # final norm lives in fc_norm, applied after pooling
    torch.save(ref.state_dict(), tmp_path / "gap.pth")
    backbone = fresh()
    load_checkpoint(backbone, tmp_path / "gap.pth", "timm")
    with torch.no_grad():
        unnormed = ref.forward_features(images)  # the reference's `norm` is Identity
        # the same LayerNorm, applied to every token instead of to the pooled vector
        assert torch.allclose(backbone(images).tokens, ref.fc_norm(unnormed), atol=ATOL)


def test_mae_format(tmp_path, images):
    ref = reference_vit()
    encoder = {k: v for k, v in ref.state_dict().items() if not k.startswith("head")}
    decoder = {"mask_token": torch.randn(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32),
               "decoder_pos_embed": torch.randn(1, 50, 16), "decoder_blocks.0.norm1.weight": torch.randn(16),
               "decoder_norm.weight": torch.randn(16), "decoder_pred.weight": torch.randn(16, 16)}
    torch.save({"model": {**encoder, **decoder}, "epoch": 799}, tmp_path / "mae.pth")
    backbone = fresh(**BUILTIN_FORMATS["mae"].architecture)
    report = load_checkpoint(backbone, tmp_path / "mae.pth", "mae")
    assert not report.unexpected and not report.dropped and not report.missing
    assert not backbone.vit.pos_embed.requires_grad  # fixed table, overwritten by the checkpoint's values
    assert torch.equal(backbone.vit.pos_embed, encoder["pos_embed"])
    with torch.no_grad():
        assert torch.allclose(backbone(images).tokens, ref.forward_features(images), atol=ATOL)


def test_sslbench_format_round_trip(tmp_path, images):
    trained, ema = fresh(), build_backbone("vit_tiny_patch16_224", **TINY).eval()
    torch.save({"format": "sslbench", "backbone": trained.vit.state_dict(), "ema": ema.vit.state_dict(),
                "recipe_hash": "abc", "backbone_recipe": {"model": "vit_tiny_patch16_224"}}, tmp_path / "backbone.pt")
    for name, source in (("sslbench", trained), ("sslbench_ema", ema)):
        torch.manual_seed(99)
        target = build_backbone("vit_tiny_patch16_224", **TINY).eval()
        report = load_checkpoint(target, tmp_path / "backbone.pt", name)
        assert not (report.missing or report.unexpected or report.dropped)
        with torch.no_grad():
            assert torch.allclose(target(images).tokens, source(images).tokens, atol=ATOL)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found.*nothing.pth"):
        load_checkpoint(fresh(), tmp_path / "nothing.pth", "timm")
    state = reference_vit().state_dict()
    del state["blocks.1.attn.qkv.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="partial.pth.*missing 1 backbone weight.*blocks.1.attn.qkv.weight"):
        load_checkpoint(fresh(), tmp_path / "partial.pth", "timm")
    torch.save(reference_vit(embed_dim=64).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(UserError, match="wide.pth.*shapes differ"):
        load_checkpoint(fresh(), tmp_path / "wide.pth", "timm")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth.*cannot read"):
        load_checkpoint(fresh(), tmp_path / "junk.pth", "timm")
    torch.save({"model": state}, tmp_path / "run.pt")
    with pytest.raises(UserError, match="run.pt.*no 'backbone'"):
        load_checkpoint(fresh(), tmp_path / "run.pt", "sslbench")
    with pytest.raises(UserError, match="unknown checkpoint format"):
        load_checkpoint(fresh(), tmp_path / "run.pt", "nope")


def test_builtin_formats_are_described():
    assert set(BUILTIN_FORMATS) == {"timm", "mae", "data2vec2", "sslbench", "sslbench_ema"}
    for name, fmt in BUILTIN_FORMATS.items():
        assert isinstance(fmt, CheckpointFormat) and fmt.name == name and fmt.description
    assert BUILTIN_FORMATS["data2vec2"].architecture == {"pos_embed": "sincos", "block": "post_norm",
                                                          "pre_norm": True, "final_norm": False,
                                                          "no_embed_class": True}
