"""The mocov3 / mocov3_momentum checkpoint formats on a tiny file in the official layout (facebookresearch/moco-v3:
``state_dict`` of the DDP-wrapped MoCo model with base encoder, momentum encoder and predictor)."""

from __future__ import annotations

import pytest
import torch

from sslbench.core.backbone import build_backbone
from sslbench.core.checkpoints import load_checkpoint
from sslbench.core.errors import UserError
from sslbench.core.mocov3_format import MOCOV3_FORMATS

ARCH = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, pos_embed="sincos")


def tiny(seed: int):
    torch.manual_seed(seed)
    return build_backbone("vit_tiny_patch16_224", **ARCH)


def moco_file(path):
    base, momentum = tiny(1), tiny(2)
    # MoCo v3 stores its own sin-cos table (halves in another order than MAE's): the file's values must win
    table = torch.randn_like(base.vit.pos_embed)
    state = {}
    for prefix, net in (("base_encoder", base), ("momentum_encoder", momentum)):
        for key, value in net.vit.state_dict().items():
            state[f"module.{prefix}.{key}"] = table if key == "pos_embed" else value
        state[f"module.{prefix}.head.0.weight"] = torch.randn(64, 32)      # the projector
    state["module.predictor.0.weight"] = torch.randn(64, 32)
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state}, path)
    return base, momentum, table


@pytest.mark.parametrize("fmt, which", [("mocov3", 0), ("mocov3_momentum", 1)])
def test_loads_the_chosen_encoder_without_its_projector(tmp_path, fmt, which):
    expected = moco_file(tmp_path / "vit-s-300ep.pth.tar")
    target = tiny(9)
    report = load_checkpoint(target, tmp_path / "vit-s-300ep.pth.tar", MOCOV3_FORMATS[fmt])
    assert report.dropped == ["head.0.weight"] and not report.unexpected and not report.missing
    source = expected[which].vit.state_dict()
    for key, value in target.vit.state_dict().items():
        assert torch.equal(value, expected[2] if key == "pos_embed" else source[key]), key
    assert MOCOV3_FORMATS[fmt].architecture == {"pos_embed": "sincos"}


def test_another_layout_is_refused_naming_what_was_found(tmp_path):
    torch.save({"state_dict": tiny(1).vit.state_dict()}, tmp_path / "timm.pth")
    with pytest.raises(UserError, match=r"format 'mocov3'.*no base_encoder\.\* keys \(found roots: blocks, "
                                        r"cls_token"):
        load_checkpoint(tiny(2), tmp_path / "timm.pth", MOCOV3_FORMATS["mocov3"])
