"""data2vec 2.0 image checkpoints (fairseq; Baevski et al. 2022) in every release layout → timm ViT names.

fairseq's image model (``examples/data2vec/models/data2vec2.py`` with ``modalities/images.py``, ``base.py`` and
``modules.py``) computes, for its post-norm configuration (``layer_norm_first = false``, every image release)::

    x = local_encoder(images) + fixed_positional_encoder.positions   # patch embedding, sin-cos table for patches
    x = [extra_tokens; x]                                            # CLS first
    x = context_encoder.norm(x)                                      # a LayerNorm on the embeddings ...
    x = context_encoder.blocks[0 .. p-1](x)                          # ... then the "prenet" (p = prenet_depth)
    x = blocks[0 .. d-1](x)                                          # the main blocks; no final norm

with post-norm blocks whose parameters are named as timm's. The releases differ in ``p`` and in the wrapping:

* ViT-L/16, ViT-H/14 pre-trained (``large_imagenet.pt``, ``huge_imagenet.pt``): ``p = 0``, ``d = 24 / 32``;
* ViT-B/16 pre-trained (``base_imagenet.pt``; config ``prenet_depth: 2``, ``depth: 10``): 12 blocks in all;
* fine-tuned (``*_imagenet_ft.pt``, fairseq's ``mae_image_classification``): the pre-training model (its decoder and
  EMA removed) under ``model.*``, beside ``fc_norm.*`` — the LayerNorm (eps 1e-6) applied to the mean of the last
  block's patch tokens, the feature its ``head.*`` classifies (``prediction_mode = MEAN_POOLING``, the default).

:func:`convert_data2vec2` numbers the prenet blocks 0..p-1 and the main blocks p..p+d-1, so a timm ViT of ``p + d``
blocks with ``norm_pre`` = ``context_encoder.norm`` computes the same function. ``fc_norm`` is kept under its name
(the loader makes it :attr:`Backbone.fc_norm`, used by the ``mean_fc_norm`` feature); ``head`` is left for the loader
to report as dropped. The number of blocks comes from the file alone (the pickled config is never needed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from sslbench.core.errors import UserError
from sslbench.core.state_dicts import entry as _entry, strip as _strip, tensors as _tensors

PREFIX = "modality_encoders.IMAGE."
#: the prenet: blocks of the image encoder's context encoder, run before the main ``blocks``
PRENET = PREFIX + "context_encoder.blocks."
RENAMES = {
    PREFIX + "local_encoder.proj.weight": "patch_embed.proj.weight",
    PREFIX + "local_encoder.proj.bias": "patch_embed.proj.bias",
    PREFIX + "extra_tokens": "cls_token",
    PREFIX + "fixed_positional_encoder.positions": "pos_embed",
    PREFIX + "context_encoder.norm.weight": "norm_pre.weight",
    PREFIX + "context_encoder.norm.bias": "norm_pre.bias",
}
#: pre-training-only modules: the decoder(s), the EMA teacher, the target projections
DROP = (PREFIX + "decoder", "_ema", "decoder", "shared_decoder", "recon_proj", "cls_proj")
#: the fine-tuning model (``mae_image_classification``) keeps the pre-training model under this prefix
FINETUNED_PREFIX = "model."

_PRENET_KEY = re.compile(re.escape(PRENET) + r"(\d+)\.(.+)", re.S)
_MAIN_KEY = re.compile(r"blocks\.(\d+)\.(.+)", re.S)


@dataclass(frozen=True)
class Layout:
    """Which release layout a file has: ``prenet`` blocks (under ``context_encoder.blocks``) run before ``main``
    blocks (under ``blocks``); ``finetuned``: the model sits under ``model.*`` beside a classifier."""

    prenet: int
    main: int
    finetuned: bool

    @property
    def depth(self) -> int:
        """The blocks of the equivalent timm ViT."""
        return self.prenet + self.main

    def describe(self) -> str:
        """``"2 prenet + 10 main blocks, fine-tuned"`` — for errors about the depth."""
        blocks = f"{self.prenet} prenet + {self.main} main blocks" if self.prenet else f"{self.main} blocks"
        return blocks + (", fine-tuned" if self.finetuned else "")


def unwrap(obj: Any) -> tuple[dict[str, Tensor], bool]:
    """The model's tensors with fairseq's wrappers removed, and whether the file is a fine-tuned model.

    Removed: the file's ``model`` entry (a bare state dict is accepted too), DistributedDataParallel's ``module.``
    and, in a fine-tuned file, the ``model.`` of the encoder's keys — only those: its ``fc_norm`` and ``head`` sit
    beside ``model``, which is why the prefix cannot be stripped only when every key has it.
    """
    state = _strip(_tensors(_entry(obj, "model"), "data2vec 2.0 weights under 'model'"), "module.")
    nested = [k for k in state if k.startswith(FINETUNED_PREFIX)]
    if not nested:
        return state, False
    out = {k: v for k, v in state.items() if not k.startswith(FINETUNED_PREFIX)}
    for key in nested:
        name = key[len(FINETUNED_PREFIX):]
        if name in out:
            raise UserError(f"holds both {key!r} and {name!r}; expected a data2vec 2.0 model either at the top "
                            f"level or under {FINETUNED_PREFIX!r}")
        out[name] = state[key]
    # a whole file under model.* (no classifier beside it) is a pre-training model saved with a prefix
    return out, len(nested) < len(state)


def _count(state: dict[str, Tensor], pattern: re.Pattern) -> int:
    indices = [int(m.group(1)) for m in map(pattern.fullmatch, state) if m]
    return 1 + max(indices) if indices else 0


def layout_of(obj: Any) -> Layout:
    """The :class:`Layout` of a loaded data2vec 2.0 file, read off its keys."""
    state, finetuned = unwrap(obj)
    return Layout(prenet=_count(state, _PRENET_KEY), main=_count(state, _MAIN_KEY), finetuned=finetuned)


def describe_blocks(obj: Any) -> str:
    """How a loaded file's blocks are made up (``"2 prenet + 10 main blocks"``), for a depth-mismatch error."""
    return layout_of(obj).describe()


def convert_data2vec2(obj: Any) -> dict[str, Tensor]:
    """A loaded fairseq data2vec 2.0 image file (any release layout) → a state dict in timm names.

    Prenet block i becomes ``blocks.i``, main block j ``blocks.{p + j}``; ``fc_norm`` and ``head`` keep their
    names; pre-training modules are dropped; anything else is passed through for the loader to report.
    """
    state, _ = unwrap(obj)
    prenet = _count(state, _PRENET_KEY)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in RENAMES:
            out[RENAMES[key]] = value
        elif (m := _PRENET_KEY.fullmatch(key)) is not None:
            out[f"blocks.{int(m.group(1))}.{m.group(2)}"] = value
        elif (m := _MAIN_KEY.fullmatch(key)) is not None:
            out[f"blocks.{int(m.group(1)) + prenet}.{m.group(2)}"] = value
        elif not key.startswith(DROP):
            out[key] = value
    extra = out.get("cls_token")
    if extra is not None and extra.shape[1] != 1:
        raise UserError(f"{PREFIX}extra_tokens holds {extra.shape[1]} tokens; sslbench supports exactly one (CLS)")
    if PREFIX + "local_encoder.0.proj.weight" in state:
        raise UserError(f"{PREFIX}local_encoder projects patches to another width (a Linear after the patch "
                        "embedding); no image release has one and sslbench does not convert it")
    return out
