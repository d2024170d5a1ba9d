"""Checkpoint formats: turn the weights of official releases (and our own runs) into a :class:`Backbone`.

A :class:`CheckpointFormat` says which architecture its files imply (keyword overrides for
:func:`sslbench.core.backbone.build_backbone`) and how to convert the loaded file into a state dict in timm's
``VisionTransformer`` layout. :func:`load_checkpoint` reads ``.pth``/``.pt`` (``torch.load`` with
``weights_only=True``) and ``.safetensors`` files, converts, checks shapes and essential keys, and loads.

Built-in formats (:data:`BUILTIN_FORMATS`; registered through the plugin system by ``plugins/``):

* ``timm`` — a timm state dict (optionally under ``state_dict`` or ``model``);
* ``mae`` — the official MAE release (He et al. 2021): encoder keys under ``model`` already in timm names;
* ``data2vec2`` — fairseq data2vec 2.0 image models (Baevski et al. 2022): post-norm blocks, a norm on the
  embeddings, no final norm, position embeddings for patches only;
* ``sslbench`` / ``sslbench_ema`` — ``checkpoints/backbone.pt`` of an sslbench run (its encoder, or its EMA).

This module does not import timm, so registering formats stays cheap.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import Tensor

from sslbench.core.errors import UserError

if TYPE_CHECKING:
    from sslbench.core.backbone import Backbone

log = logging.getLogger(__name__)

# build options that change which parameters exist or how they combine: a checkpoint of a format that
# implies them cannot be loaded meaningfully into a backbone built otherwise. (pos_embed is not one of them:
# a fixed table is simply overwritten by the checkpoint's values.)
STRUCTURAL_OPTIONS = ("block", "pre_norm", "final_norm", "no_embed_class")
# parameters a classification checkpoint may carry that an encoder-only backbone never has
_CLASSIFIER_ROOTS = ("head", "fc_norm", "head_drop", "attn_pool")


@dataclass(frozen=True, eq=False)
class CheckpointFormat:
    """A checkpoint layout: ``convert(loaded file) -> state dict in Backbone.vit (timm) names``.

    ``architecture`` holds the ``build_backbone`` keyword overrides the format implies. ``convert`` may raise
    :class:`UserError` when the file is not of this format; keys it does not recognise should be passed through
    so :func:`load_checkpoint` reports them as unexpected.
    """

    name: str
    description: str
    architecture: dict[str, Any] = field(default_factory=dict)
    convert: Callable[[Any], dict[str, Tensor]] = lambda obj: dict(obj)


class UntrustedPickle(UserError):
    """A torch file that pickles Python objects besides tensors, refused because unpickling runs its code.

    ``path`` is the file and ``found`` the first global outside torch's weights-only allow-list (fairseq's
    data2vec 2.0 files store their config as ``argparse.Namespace`` or omegaconf objects)."""

    def __init__(self, path: Path, found: str, message: str):
        self.path, self.found = path, found
        super().__init__(message)


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did. ``missing``: backbone keys left at their built values (only keys that
    can be rebuilt, e.g. a fixed sin-cos table); ``unexpected``: converted keys the backbone has no place for
    (not loaded); ``dropped``: classifier keys (``head``, ``fc_norm``, ...) ignored for an encoder."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _tensors(obj: Any, what: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise UserError(f"expected a state dict ({what}), found a {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` when every key has it (DistributedDataParallel's ``module.``, fairseq's ``model.``)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _entry(obj: Any, key: str) -> Any:
    """``obj[key]`` when the file wraps its weights under ``key``, else the file itself (a bare state dict)."""
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
        return obj[key]
    return obj


def convert_timm(obj: Any) -> dict[str, Tensor]:
    """timm state dict, bare or under ``state_dict`` (timm's train script) or ``model``.

    A global-average-pool model keeps its final norm as ``fc_norm``; our backbone applies it to every token as
    ``norm`` (the same LayerNorm), so it is renamed when no ``norm`` is present.
    """
    state = _strip(_tensors(_entry(_entry(obj, "state_dict"), "model"), "timm weights"), "module.")
    if "norm.weight" not in state and "fc_norm.weight" in state:
        state = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in state.items()}
    return state


def convert_mae(obj: Any) -> dict[str, Tensor]:
    """Official MAE checkpoint: encoder under ``model`` in timm names; the decoder and mask token are dropped."""
    state = _strip(_tensors(_entry(obj, "model"), "MAE weights under 'model'"), "module.")
    return {k: v for k, v in state.items() if not (k.startswith("decoder") or k == "mask_token")}


_D2V = "modality_encoders.IMAGE."
_D2V_RENAMES = {
    _D2V + "local_encoder.proj.weight": "patch_embed.proj.weight",
    _D2V + "local_encoder.proj.bias": "patch_embed.proj.bias",
    _D2V + "extra_tokens": "cls_token",
    _D2V + "fixed_positional_encoder.positions": "pos_embed",
    _D2V + "context_encoder.norm.weight": "norm_pre.weight",
    _D2V + "context_encoder.norm.bias": "norm_pre.bias",
}
# pre-training-only modules of data2vec 2.0: the decoder(s), the EMA teacher and the target projections
_D2V_DROP = (_D2V + "decoder", "_ema", "decoder", "shared_decoder", "recon_proj", "cls_proj")


def convert_data2vec2(obj: Any) -> dict[str, Tensor]:
    """fairseq data2vec 2.0 image model → timm names (blocks already match timm's).

    Anything neither renamed nor a known pre-training module is passed through and reported as unexpected.
    """
    state = _strip(_strip(_tensors(_entry(obj, "model"), "data2vec 2.0 weights under 'model'"), "module."), "model.")
    out = {}
    for key, value in state.items():
        if key in _D2V_RENAMES:
            out[_D2V_RENAMES[key]] = value
        elif not key.startswith(_D2V_DROP):
            out[key] = value
    extra = out.get("cls_token")
    if extra is not None and extra.shape[1] != 1:
        raise UserError(f"{_D2V}extra_tokens holds {extra.shape[1]} tokens; sslbench supports exactly one (CLS)")
    return out


def _sslbench(entry: str) -> Callable[[Any], dict[str, Tensor]]:
    def convert(obj: Any) -> dict[str, Tensor]:
        if not isinstance(obj, Mapping) or not isinstance(obj.get(entry), Mapping):
            found = ", ".join(sorted(map(str, obj))[:8]) if isinstance(obj, Mapping) else type(obj).__name__
            raise UserError(f"no {entry!r} state dict in this file (found: {found}); is it an sslbench "
                            f"checkpoints/backbone.pt?")
        return _strip(_strip(_tensors(obj[entry], entry), "module."), "vit.")
    return convert


BUILTIN_FORMATS: dict[str, CheckpointFormat] = {
    fmt.name: fmt for fmt in (
        CheckpointFormat("timm", "timm VisionTransformer state dict (bare, or under 'state_dict' / 'model')",
                         {}, convert_timm),
        CheckpointFormat("mae", "official MAE pre-training checkpoint (facebookresearch/mae), encoder only",
                         {"pos_embed": "sincos"}, convert_mae),
        CheckpointFormat("data2vec2", "fairseq data2vec 2.0 image model (post-norm blocks, no final norm)",
                         {"pos_embed": "sincos", "block": "post_norm", "pre_norm": True, "final_norm": False,
                          "no_embed_class": True}, convert_data2vec2),
        CheckpointFormat("sslbench", "an sslbench run's checkpoints/backbone.pt (the trained encoder)",
                         {}, _sslbench("backbone")),
        CheckpointFormat("sslbench_ema", "an sslbench run's checkpoints/backbone.pt (the EMA of the encoder)",
                         {}, _sslbench("ema")),
    )
}


def read_checkpoint_file(path: str | Path, allow_pickle: bool = False) -> Any:
    """Load a ``.safetensors`` or torch file on the CPU.

    Torch files are read with ``weights_only=True`` (tensors and plain containers only). Files that pickle
    other Python objects (fairseq stores its config) need ``allow_pickle=True``, which executes the file's
    pickled code: only for files from a trusted source.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch names the first class outside its weights-only allow-list ("GLOBAL argparse.Namespace");
            # other unpickling errors mean the file is not a checkpoint at all
            found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))
            if found is None:
                raise
            if not allow_pickle:
                raise UntrustedPickle(
                    path, found.group(1),
                    f"{path}: holds pickled Python objects besides tensors ({found.group(1)}), which are not "
                    f"loaded by default because unpickling runs code; if you trust the file, allow it "
                    f"(in a recipe: backbone.checkpoint_trusted = true; for sslbench eval: --trust-checkpoint) "
                    f"or re-save just its state dict") from None
            log.warning("loading %s with full unpickling (allow_pickle)", path)
            return torch.load(path, map_location="cpu", weights_only=False)
    except UserError:
        raise
    except Exception as exc:  # a truncated or foreign file: tell the user which one, in one short line
        reason = " ".join(str(exc).split())[:160] or "no detail"
        raise UserError(f"{path}: cannot read checkpoint, not a torch or safetensors weights file, or truncated "
                        f"({type(exc).__name__}: {reason})") from None


def _check_architecture(backbone: "Backbone", fmt: CheckpointFormat, path: Path) -> None:
    for key in STRUCTURAL_OPTIONS:
        if key in fmt.architecture and backbone.architecture.get(key) != fmt.architecture[key]:
            raise UserError(f"{path}: checkpoint format {fmt.name!r} needs backbone.{key} = "
                            f"{fmt.architecture[key]!r}, but the backbone was built with "
                            f"{backbone.architecture.get(key)!r}")


def _listing(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_checkpoint(backbone: "Backbone", path: str | Path, format: str | CheckpointFormat = "timm", *,
                    allow_pickle: bool = False) -> LoadReport:
    """Load the checkpoint at ``path`` in ``format`` into ``backbone`` (in place) and report what happened.

    Raises :class:`UserError` (naming the file) if the file is missing or unreadable, if the backbone's build
    contradicts the format's architecture, if a tensor's shape differs from the backbone's, or if any
    backbone weight is missing from the checkpoint (except a fixed sin-cos position table, which is rebuilt).
    """
    path = Path(path)
    if isinstance(format, str):
        if format not in BUILTIN_FORMATS:
            raise UserError(f"unknown checkpoint format {format!r}; built-in: {', '.join(BUILTIN_FORMATS)}")
        format = BUILTIN_FORMATS[format]
    _check_architecture(backbone, format, path)
    loaded = read_checkpoint_file(path, allow_pickle=allow_pickle)
    try:
        state = format.convert(loaded)
    except UserError as exc:
        raise UserError(f"{path} (format {format.name!r}): {exc}") from None

    target = backbone.vit.state_dict()
    dropped = sorted(k for k in state if k not in target and k.split(".")[0] in _CLASSIFIER_ROOTS)
    unexpected = sorted(k for k in state if k not in target and k not in dropped)
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
                  for k in sorted(state) if k in target and state[k].shape != target[k].shape]
    if mismatched:
        raise UserError(f"{path} (format {format.name!r}): shapes differ from backbone "
                        f"{backbone.model_name!r} (checkpoint vs backbone): {_listing(mismatched, 3)}")
    rebuildable = {"pos_embed"} if backbone.architecture.get("pos_embed") == "sincos" else set()
    missing = sorted(k for k in target if k not in state)
    essential = [k for k in missing if k not in rebuildable]
    if essential:
        hint = f"; unused checkpoint keys: {_listing(unexpected, 3)}" if unexpected else ""
        raise UserError(f"{path} (format {format.name!r}): missing {len(essential)} backbone weight(s): "
                        f"{_listing(essential)}{hint}")
    backbone.vit.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    if unexpected:
        log.warning("%s: %d checkpoint key(s) not used by the backbone: %s", path, len(unexpected),
                    _listing(unexpected))
    return LoadReport(missing=missing, unexpected=unexpected, dropped=dropped)
