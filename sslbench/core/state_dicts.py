"""Small readers shared by every checkpoint format: unwrap, filter and un-prefix a loaded state dict.

Their own module so that format modules (:mod:`sslbench.core.data2vec2`, :mod:`sslbench.core.mocov3_format`) and the
format registry (:mod:`sslbench.core.checkpoints`) import them without importing each other.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from sslbench.core.errors import UserError


def tensors(obj: Any, what: str) -> dict[str, Tensor]:
    """The tensors of a state dict (other values, e.g. a step counter, left out); ``what`` names it in the error."""
    if not isinstance(obj, Mapping):
        raise UserError(f"expected a state dict ({what}), found a {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` when every key has it (DistributedDataParallel's ``module.``, fairseq's ``model.``)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def entry(obj: Any, key: str) -> Any:
    """``obj[key]`` when the file wraps its weights under ``key``, else the file itself (a bare state dict)."""
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
        return obj[key]
    return obj
