from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F
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


def data2vec2_state(depth: int = 2, dim: int = 32, patch: int = 4, grid: int = 7) -> dict[str, torch.Tensor]:
    """Random tensors in the fairseq data2vec 2.0 image-model key layout."""
    g = torch.Generator().manual_seed(2)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    p = "modality_encoders.IMAGE."
    state = {p + "local_encoder.proj.weight": r(dim, 1, patch, patch), p + "local_encoder.proj.bias": r(dim),
             p + "extra_tokens": r(1, 1, dim, scale=1.0), p + "fixed_positional_encoder.positions": r(1, grid**2, dim),
             p + "context_encoder.norm.weight": 1 + r(dim), p + "context_encoder.norm.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
                      b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                      b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                      b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                      b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                      b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim)})
    return state


def data2vec2_reference(s: dict[str, torch.Tensor], images: torch.Tensor, heads: int, eps: float = 1e-6):
    """data2vec 2.0's image encoder written out from the fairseq tensors: post-norm blocks, no final norm."""
    p = "modality_encoders.IMAGE."
    w = s[p + "local_encoder.proj.weight"]
    x = F.conv2d(images, w, s[p + "local_encoder.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = x + s[p + "fixed_positional_encoder.positions"]
    x = torch.cat([s[p + "extra_tokens"].expand(x.shape[0], -1, -1), x], dim=1)
    dim = x.shape[-1]

    def ln(t, name):
        return F.layer_norm(t, (dim,), s[name + ".weight"], s[name + ".bias"], eps)

    x = ln(x, p + "context_encoder.norm")
    i = 0
    while f"blocks.{i}.norm1.weight" in s:
        b = f"blocks.{i}."
        batch, tokens, _ = x.shape
        qkv = F.linear(x, s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
        a = F.linear((attn @ v).transpose(1, 2).reshape(batch, tokens, dim), s[b + "attn.proj.weight"],
                     s[b + "attn.proj.bias"])
        x = ln(x + a, b + "norm1")
        hidden = F.gelu(F.linear(x, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"]))
        x = ln(x + F.linear(hidden, s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"]), b + "norm2")
        i += 1
    return x


@pytest.mark.parametrize("prefix", ["", "model."])
def test_data2vec2_format(tmp_path, images, prefix):
    state = data2vec2_state()
    junk = {"modality_encoders.IMAGE.decoder.blocks.0.0.weight": torch.randn(4), "_ema": torch.randn(8),
            "decoder.proj.weight": torch.randn(4, 4)}
    leftover = {"modality_encoders.IMAGE.alibi_scale": torch.randn(1)}
    torch.save({"model": {prefix + k: v for k, v in {**state, **junk, **leftover}.items()},
                "cfg": {"model": {"depth": 2}}}, tmp_path / "d2v.pt")
    backbone = fresh(**BUILTIN_FORMATS["data2vec2"].architecture)
    report = load_checkpoint(backbone, tmp_path / "d2v.pt", "data2vec2")
    assert report.unexpected == ["modality_encoders.IMAGE.alibi_scale"] and not report.missing
    with torch.no_grad():
        expected = data2vec2_reference(state, images, heads=2)
        out = backbone(images, blocks=[0, 1], out="both")
        assert torch.allclose(out.tokens, expected, atol=ATOL)
        assert torch.allclose(out.raw[1], expected, atol=ATOL)  # no final norm: normed == raw


def test_data2vec2_pickled_config_needs_permission(tmp_path, images):
    state = data2vec2_state()
    torch.save({"model": state, "cfg": argparse.Namespace(depth=2)}, tmp_path / "fairseq.pt")
    backbone = fresh(**BUILTIN_FORMATS["data2vec2"].architecture)
    with pytest.raises(UserError, match="fairseq.pt.*pickled.*argparse.Namespace"):
        load_checkpoint(backbone, tmp_path / "fairseq.pt", "data2vec2")
    load_checkpoint(backbone, tmp_path / "fairseq.pt", "data2vec2", allow_pickle=True)
    with torch.no_grad():
        assert torch.allclose(backbone(images).tokens, data2vec2_reference(state, images, 2), atol=ATOL)


def test_data2vec2_needs_its_architecture(tmp_path):
    torch.save({"model": data2vec2_state()}, tmp_path / "d2v.pt")
    with pytest.raises(UserError, match="d2v.pt.*data2vec2.*backbone.block = 'post_norm'"):
        load_checkpoint(fresh(), tmp_path / "d2v.pt", "data2vec2")


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
