"""Checkpoint formats: turn the weights of official releases (and our own runs) into a :class:`Backbone`.

A :class:`CheckpointFormat` says which architecture its files imply (keyword overrides for
:func:`sslbench.core.backbone.build_backbone`) and how to convert the loaded file into a state dict in timm's
``VisionTransformer`` layout. :func:`load_checkpoint` reads ``.pth``/``.pt`` (``torch.load`` with
``weights_only=True``) and ``.safetensors`` files, converts, checks shapes and essential keys, and loads.

Built-in formats (:data:`BUILTIN_FORMATS`; registered through the plugin system by ``plugins/``):

* ``timm`` — a timm state dict (optionally under ``state_dict`` or ``model``);
* ``mae`` — the official MAE release (He et al. 2021): encoder keys under ``model`` already in timm names;
* ``data2vec2`` — fairseq data2vec 2.0 image models (Baevski et al. 2022), every release layout (the ViT-B prenet,
  fine-tuned files): post-norm blocks, a norm on the embeddings, no final norm, position embeddings for patches only
  (:mod:`sslbench.core.data2vec2`);
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

from sslbench.core.data2vec2 import convert_data2vec2, describe_blocks
from sslbench.core.errors import UserError
from sslbench.core.state_dicts import entry as _entry, strip as _strip, tensors as _tensors

if TYPE_CHECKING:
    from sslbench.core.backbone import Backbone

log = logging.getLogger(__name__)

# build options that change which parameters exist or how they combine: a checkpoint of a format that
# implies them cannot be loaded meaningfully into a backbone built otherwise. (pos_embed is not one of them:
# a fixed table is simply overwritten by the checkpoint's values.)
STRUCTURAL_OPTIONS = ("block", "pre_norm", "final_norm", "no_embed_class")
# parameters a classification checkpoint may carry that an encoder-only backbone never has
_CLASSIFIER_ROOTS = ("head", "fc_norm", "head_drop", "attn_pool")
#: the LayerNorm a classification model applies to its pooled feature (timm's and data2vec 2.0's ``fc_norm``):
#: kept as ``Backbone.fc_norm`` for the ``mean_fc_norm`` feature instead of being dropped with the head
POOLING_NORM = "fc_norm"
#: its epsilon: data2vec 2.0's fine-tuning model (``nn.LayerNorm(embed_dim, eps=1e-6)``) and timm's ViTs
POOLING_NORM_EPS = 1e-6
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\..+", re.S)


@dataclass(frozen=True, eq=False)
class CheckpointFormat:
    """A checkpoint layout: ``convert(loaded file) -> state dict in Backbone.vit (timm) names``.

    ``architecture`` holds the ``build_backbone`` keyword overrides the format implies. ``convert`` may raise
    :class:`UserError` when the file is not of this format; keys it does not recognise should be passed through
    so :func:`load_checkpoint` reports them as unexpected. ``describe_blocks`` (optional) says how a loaded file's
    blocks are made up (data2vec 2.0: ``"2 prenet + 10 main blocks"``), for the error when the depths differ.
    """

    name: str
    description: str
    architecture: dict[str, Any] = field(default_factory=dict)
    convert: Callable[[Any], dict[str, Tensor]] = lambda obj: dict(obj)
    describe_blocks: Callable[[Any], str] | None = None


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
    (not loaded); ``dropped``: classifier keys (``head``, ...) ignored for an encoder; ``pooling``: the
    ``fc_norm`` keys loaded as the backbone's pooling LayerNorm (:attr:`Backbone.fc_norm`)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    pooling: list[str] = field(default_factory=list)


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
        CheckpointFormat("data2vec2", "fairseq data2vec 2.0 image model, pre-trained or fine-tuned (post-norm "
                         "blocks, no final norm; the ViT-B prenet blocks first)",
                         {"pos_embed": "sincos", "block": "post_norm", "pre_norm": True, "final_norm": False,
                          "no_embed_class": True}, convert_data2vec2, describe_blocks),
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


def _check_depth(backbone: "Backbone", fmt: CheckpointFormat, path: Path, state: dict[str, Tensor],
                 loaded: Any) -> None:
    """A file with another number of blocks than the backbone is refused, naming ``backbone.depth``: loading it
    would leave blocks random (a deeper backbone) or silently cut the network short (a shallower one)."""
    indices = [int(m.group(1)) for m in map(_BLOCK_KEY.fullmatch, state) if m]
    if not indices or max(indices) + 1 == backbone.depth:
        return
    blocks = max(indices) + 1
    made_of = f" ({fmt.describe_blocks(loaded)})" if fmt.describe_blocks is not None else ""
    raise UserError(f"{path} (format {fmt.name!r}): the checkpoint holds {blocks} blocks{made_of} but the backbone "
                    f"{backbone.model_name!r} has backbone.depth = {backbone.depth}; set backbone.depth = {blocks} "
                    f"(or leave it unset with a model of {blocks} blocks)")


def _pooling_norm(backbone: "Backbone", fmt: CheckpointFormat, path: Path,
                  extra: dict[str, Tensor]) -> tuple[list[str], torch.nn.LayerNorm | None]:
    """The file's pooling LayerNorm (``fc_norm.weight`` and ``.bias`` beside the encoder) and its keys;
    ``([], None)`` when the file has none (any ``fc_norm`` key is then dropped like a classifier's)."""
    keys = {f"{POOLING_NORM}.weight", f"{POOLING_NORM}.bias"}
    found = {k: v for k, v in extra.items() if k.startswith(POOLING_NORM + ".")}
    if set(found) != keys:
        return [], None
    width = (backbone.embed_dim,)
    if any(tuple(v.shape) != width for v in found.values()):
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(found.items()))
        raise UserError(f"{path} (format {fmt.name!r}): the pooling norm has shapes {shapes}, expected "
                        f"{width} for a backbone of width {backbone.embed_dim}")
    norm = torch.nn.LayerNorm(backbone.embed_dim, eps=POOLING_NORM_EPS)
    with torch.no_grad():
        norm.weight.copy_(found[f"{POOLING_NORM}.weight"])
        norm.bias.copy_(found[f"{POOLING_NORM}.bias"])
    norm.requires_grad_(False)           # evaluation only (Backbone.fixed_parameters keeps it out of training)
    return sorted(found), norm


def _listing(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_checkpoint(backbone: "Backbone", path: str | Path, format: str | CheckpointFormat = "timm", *,
                    allow_pickle: bool = False) -> LoadReport:
    """Load the checkpoint at ``path`` in ``format`` into ``backbone`` (in place) and report what happened.

    Raises :class:`UserError` (naming the file) if the file is missing or unreadable, if the backbone's build
    contradicts the format's architecture, if the file has another number of blocks than ``backbone.depth``,
    if a tensor's shape differs from the backbone's, or if any backbone weight is missing from the checkpoint
    (except a fixed sin-cos position table, which is rebuilt). A pooling LayerNorm beside the encoder
    (``fc_norm``, e.g. of a fine-tuned data2vec 2.0 file) becomes ``backbone.fc_norm``, else that is ``None``.
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

    _check_depth(backbone, format, path, state, loaded)
    target = backbone.vit.state_dict()
    extra = {k: v for k, v in state.items() if k not in target}
    pooling, pooling_norm = _pooling_norm(backbone, format, path, extra)
    state = {k: v for k, v in state.items() if k not in pooling}
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
    if pooling_norm is not None:
        backbone.fc_norm = pooling_norm
    elif getattr(backbone, "fc_norm", None) is not None:   # nothing is left from an earlier load
        del backbone.fc_norm             # unregistered, then a plain None again (as a freshly built backbone)
        backbone.fc_norm = None
    return LoadReport(missing=missing, unexpected=unexpected, dropped=dropped, pooling=pooling)
