"""A backbone as a folder plain timm loads: ``model.safetensors`` + ``config.json`` in timm's Hugging Face Hub layout.

timm reads such a folder with ``timm.create_model("local-dir:DIR", pretrained=True)`` (and the same files on the Hub
with ``hf-hub:REPO``): ``config.json`` names the ``architecture`` (a timm model name), the ``model_args`` passed to it
on top of that architecture's defaults, and a ``pretrained_cfg`` (input size, normalisation, interpolation, crop,
``num_classes``) that timm's data helpers (``timm.data.resolve_data_config``) read; the weights are a timm
``VisionTransformer`` (or, for ``beit_*`` models, ``Beit``) state dict. sslbench's
:class:`~sslbench.core.backbone.Backbone` *is* such a timm model (``backbone.vit``), so exporting one is a matter of

* naming every constructor argument in which it differs from the architecture's defaults (sizes, pooling, token
  layout), found by comparing it with a default build of the architecture on the ``meta`` device;
* checking that plain timm, built from those arguments, is the *same* network — the same modules of the same types
  with the same settings, the same parameter names and shapes. What plain timm cannot express (data2vec 2.0's
  post-norm blocks, a norm on the embeddings with a biased patch projection) is refused with one line saying why;
* writing the state dict. A fixed sin-cos position table is an ordinary ``pos_embed`` tensor there (timm loads it as
  a learned one; the values, and so the outputs, are identical). Mask tokens and objective heads live outside
  ``backbone.vit`` and are never part of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from sslbench.core.errors import UserError

__all__ = ["WEIGHTS_FILE", "CONFIG_FILE", "model_args", "check_expressible", "timm_config", "state_dict",
           "write_timm_folder"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: constructor arguments of timm's VisionTransformer that sslbench's backbones may differ in, and how to read each
#: from a built model (sizes first: the order they appear in config.json)
_ARGS = {
    "img_size": lambda vit: int(vit.patch_embed.img_size[0]),
    "patch_size": lambda vit: int(vit.patch_embed.patch_size[0]),
    "in_chans": lambda vit: int(vit.patch_embed.proj.in_channels),
    "embed_dim": lambda vit: int(vit.embed_dim),
    "depth": lambda vit: len(vit.blocks),
    "num_heads": lambda vit: int(vit.blocks[0].attn.num_heads),
    "class_token": lambda vit: vit.cls_token is not None,
    "reg_tokens": lambda vit: int(getattr(vit, "num_reg_tokens", 0)),
    "no_embed_class": lambda vit: bool(vit.no_embed_class),
    "global_pool": lambda vit: str(vit.global_pool),
    "final_norm": lambda vit: not (isinstance(vit.norm, nn.Identity) and isinstance(vit.fc_norm, nn.Identity)),
    "fc_norm": lambda vit: not isinstance(vit.fc_norm, nn.Identity),
    "drop_path_rate": lambda vit: _drop_path_rate(vit),
}
#: the same for a BEiT-family model (timm's ``Beit``): its relative position bias, layer scale and q/v biases
_BEIT_ARGS = {
    **{k: _ARGS[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")},
    "use_abs_pos_emb": lambda vit: vit.pos_embed is not None,
    "use_rel_pos_bias": lambda vit: vit.blocks[0].attn.relative_position_bias_table is not None,
    "use_shared_rel_pos_bias": lambda vit: vit.rel_pos_bias is not None,
    # the constructor's value (a block keeps it): it decides whether gamma_1/gamma_2 exist; the weights their values
    "init_values": lambda vit: float(vit.blocks[0].init_values) if vit.blocks[0].init_values else None,
    "qkv_bias": lambda vit: vit.blocks[0].attn.q_bias is not None,
    "mlp_ratio": lambda vit: vit.blocks[0].mlp.fc1.out_features / vit.embed_dim,
    "global_pool": lambda vit: str(vit.global_pool),
    "use_fc_norm": lambda vit: not isinstance(vit.fc_norm, nn.Identity),
    "drop_path_rate": lambda vit: _drop_path_rate(vit),
}


def _drop_path_rate(vit: nn.Module) -> float:
    """The stochastic-depth rate: timm's rule makes the last block's the constructor's ``drop_path_rate``."""
    last = vit.blocks[-1].drop_path1
    return float(getattr(last, "drop_prob", 0.0))


def _readers(vit: nn.Module) -> dict:
    from sslbench.core.beit import is_beit

    return _BEIT_ARGS if is_beit(vit) else _ARGS


def _plain_timm(architecture: str, args: dict[str, Any]) -> nn.Module:
    """``timm.create_model(architecture, num_classes=0, **args)`` on the meta device: its structure, no memory."""
    import timm

    with torch.device("meta"):
        return timm.create_model(architecture, pretrained=False, num_classes=0, **args)


def model_args(vit: nn.Module, architecture: str) -> dict[str, Any]:
    """The ``model_args`` of ``vit``: each of :data:`_ARGS` whose value differs from ``architecture``'s default."""
    default = _plain_timm(architecture, {})
    readers = _readers(vit)
    if readers is not _readers(default):
        raise UserError(f"cannot export this backbone as a timm model {architecture!r}: it is a "
                        f"{type(vit).__name__}, and {architecture!r} a {type(default).__name__}")
    return {name: read(vit) for name, read in readers.items() if read(vit) != read(default)}


def _signature(module: nn.Module) -> list[tuple[str, str, str]]:
    """Every submodule as (name, type, settings): what decides the math besides the weights."""
    return [(name, type(m).__name__, m.extra_repr()) for name, m in module.named_modules()]


def _why_not(vit: nn.Module) -> str | None:
    """A reason plain timm cannot rebuild ``vit`` that a user recognises, before the generic comparison."""
    from sslbench.core.backbone import PostNormBlock

    if any(isinstance(block, PostNormBlock) for block in vit.blocks):
        return ("its blocks are post-norm (data2vec 2.0 style: norm after each residual add), and timm's "
                "VisionTransformer has only pre-norm blocks")
    if not isinstance(getattr(vit, "norm_pre", nn.Identity()), nn.Identity) and vit.patch_embed.proj.bias is not None:
        return ("it normalises the embeddings (norm_pre) after a patch projection with a bias (data2vec 2.0 style); "
                "timm's pre_norm drops that bias")
    return None


def check_expressible(vit: nn.Module, architecture: str, args: dict[str, Any]) -> None:
    """Raise :class:`UserError` unless ``timm.create_model(architecture, num_classes=0, **args)`` is ``vit``'s
    network: same modules, types and settings, same parameter and buffer names and shapes."""
    reason = _why_not(vit)
    if reason is None:
        try:
            plain = _plain_timm(architecture, args)
        except Exception as exc:  # timm refuses the combination of arguments
            reason = f"timm cannot build it ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
        else:
            ours, theirs = _signature(vit), _signature(plain)
            if ours != theirs:
                diff = next(((a, b) for a, b in zip(ours, theirs) if a != b), None)
                where = (f"module {diff[0][0] or '(root)'}: {diff[0][1]}({diff[0][2]}) here, "
                         f"{diff[1][1]}({diff[1][2]}) in plain timm") if diff else "a different number of modules"
                reason = f"plain timm builds a different network ({where})"
            else:
                mine = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
                plain_keys = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
                if mine != plain_keys:
                    odd = sorted(set(mine.items()) ^ set(plain_keys.items()))[:3]
                    reason = f"plain timm's weights differ in names or shapes ({', '.join(k for k, _ in odd)})"
    if reason is not None:
        raise UserError(f"cannot export this backbone as a timm model {architecture!r}: {reason}")


def state_dict(vit: nn.Module) -> dict[str, Tensor]:
    """``vit``'s weights as contiguous CPU float tensors of their own (safetensors refuses shared storage)."""
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in vit.state_dict().items()}


def timm_config(architecture: str, args: dict[str, Any], *, in_chans: int, img_size: int, mean: Sequence[float],
                std: Sequence[float], license: str, description: str, provenance: dict[str, Any],
                num_features: int) -> dict[str, Any]:
    """``config.json`` as timm writes it for the Hub (``timm.models.push_to_hf_hub``): ``architecture``,
    ``num_classes`` 0 (a feature extractor), ``num_features``, ``global_pool``, ``model_args`` and a
    ``pretrained_cfg`` of :class:`timm.models.PretrainedCfg` fields. The preprocessing is sslbench's evaluation
    transform (resize the whole image to ``img_size``, bicubic, no crop, then normalise); ``provenance`` goes under
    a top-level ``sslbench`` key, which timm ignores."""
    return {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": num_features,
        "global_pool": args.get("global_pool", "token"),
        "model_args": dict(args),
        "pretrained_cfg": {
            "tag": "sslbench",
            "custom_load": False,
            "input_size": [in_chans, img_size, img_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": license,
            "description": description,
        },
        "sslbench": provenance,
    }


def write_timm_folder(folder: Path, vit: nn.Module, config: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (which exists)."""
    from safetensors.torch import save_file

    save_file(state_dict(vit), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    umask = os.umask(0)   # safetensors may create the file private (0600); give it the usual permissions
    os.umask(umask)
    os.chmod(folder / WEIGHTS_FILE, 0o666 & ~umask)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
