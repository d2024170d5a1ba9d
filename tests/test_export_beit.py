"""`sslbench export` of a BEiT backbone: timm's Beit arguments (relative position bias, layer scale) in config.json,
and plain timm, in a process without sslbench, computes the same features."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sslbench.commands.export import export_model
from sslbench.core.backbone import build_backbone
from sslbench.core.timm_export import model_args

from .test_export import _PLAIN, images, save_sslbench

ARCH = "beit_base_patch16_224"
SIZES = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
CONMIM = {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False, "use_abs_pos_emb": False, "init_values": 1e-5}


def random_beit(args: dict, seed: int):
    torch.manual_seed(seed)
    backbone = build_backbone(ARCH, **SIZES, model_args=args)
    with torch.no_grad():
        for param in backbone.vit.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return backbone.eval()


def recipe(args: dict) -> dict:
    return {"model": ARCH, **SIZES, "pos_embed": "learned", "checkpoint": None, "checkpoint_format": "timm",
            "checkpoint_trusted": False, "model_args": args}


def test_model_args_name_what_differs_from_the_architecture():
    args = model_args(random_beit(CONMIM, 0).vit, ARCH)
    assert args == {**SIZES, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True, "init_values": 1e-5,
                    "global_pool": "token", "use_fc_norm": False}
    plain = model_args(random_beit({"init_values": 0}, 0).vit, ARCH)
    assert plain["init_values"] is None and "use_rel_pos_bias" not in plain


def test_plain_timm_gives_sslbench_features(tmp_path):
    x = images()
    torch.save(x, tmp_path / "x.pt")
    jobs = []
    for name, args in (("shared", CONMIM), ("per_block", {"init_values": 0.1, "drop_path_rate": 0.1})):
        backbone = random_beit(args, 1)
        source = save_sslbench(tmp_path / name / "backbone.pt", backbone, recipe=recipe(args))
        folder = export_model(str(source), str(tmp_path / "out" / name))
        config = json.loads((folder / "config.json").read_text())
        assert config["architecture"] == ARCH and config["model_args"]["global_pool"] == "token"
        with torch.no_grad():
            torch.save(backbone(x).tokens, tmp_path / f"{name}.pt")
        jobs.append([str(folder), str(tmp_path / "x.pt"), str(tmp_path / f"{name}.pt")])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _PLAIN, json.dumps(jobs)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for folder, _, _ in jobs:
        diff, shape, input_size = result[folder]
        assert diff <= 1e-5 and shape == [3, 1 + 64, 32] and input_size == [1, 32, 32], (folder, diff)
