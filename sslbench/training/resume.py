"""The resume checkpoint (``checkpoints/last.pt``): written so that reading it can never run code.

A run folder may be shared, copied from a colleague or downloaded, so ``sslbench run --resume`` must treat
``last.pt`` like any other input file. It is therefore read with ``torch.load(weights_only=True)``, which builds
only tensors and plain containers, never arbitrary Python objects. Everything that is not a tensor — where training
stands, the recipe hash, the Python and NumPy random states — is stored as one JSON string inside the file
(``meta``), beside the tensors (weights, optimiser moments, the torch random state). One file, written atomically,
so the JSON and the tensors always belong to the same step.

    >>> import tempfile, pathlib, torch
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "last.pt"
    >>> save_resume_state(path, {"progress": {"step": 3}}, {"backbone": {"w": torch.zeros(2)}})
    >>> state = load_resume_state(path)
    >>> state["meta"]["progress"], state["backbone"]["w"].shape
    ({'step': 3}, torch.Size([2]))
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslbench.core.errors import UserError
from sslbench.core.io import atomic_torch_save

FORMAT = "sslbench-resume"
VERSION = 2


def rng_state() -> tuple[dict, dict]:
    """The process's random states as (JSON-able part, tensor part)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    plain = {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "python": [version, list(internal), gauss]}
    tensors = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict) -> None:
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(tensors["torch"])
    if tensors.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def save_resume_state(path: str | Path, meta: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Write ``meta`` (JSON-able) and ``tensors`` (tensors in dicts, lists and plain values) atomically."""
    atomic_torch_save({"format": FORMAT, "version": VERSION, "meta": json.dumps(meta), **tensors}, path)


def load_resume_state(path: str | Path) -> dict[str, Any]:
    """Read a resume checkpoint weights-only; ``state["meta"]`` is the parsed JSON part.

    A file that is truncated, foreign, from an older sslbench or that pickles code raises :class:`UserError` naming
    the file — nothing in it is executed.
    """
    path = Path(path)
    advice = "start the run over with --force, or restore the file"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, random bytes, or a pickle of something other than tensors
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise UserError(f"{path}: not a readable sslbench resume checkpoint ({type(exc).__name__}: {reason}); "
                        f"{advice}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("meta"), str):
        raise UserError(f"{path}: not an sslbench resume checkpoint of this version (expected format {FORMAT!r} "
                        f"version {VERSION}); {advice}")
    try:
        state["meta"] = json.loads(state["meta"])
    except ValueError:
        raise UserError(f"{path}: its metadata is not valid JSON; {advice}") from None
    return state
