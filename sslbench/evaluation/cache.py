"""The feature cache's keys, files and lock: what makes a cached feature matrix safe to reuse.

A cached matrix is keyed by everything that determines it — the weights (content hash), the architecture, the dataset
fingerprint, the evaluation transform, the numeric precision and the request (block, token, norm) — so a changed
checkpoint, dataset, transform or layer can never be served stale features. Files are written atomically and carry
their full key, so a hash collision or a half-written file is a cache miss, never wrong features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch
from torch import nn

from sslbench.core.io import file_lock

if TYPE_CHECKING:
    from accelerate import Accelerator

    from sslbench.core.evaluator import FeatureRequest

# Bump when the meaning of a cached file changes (pooling definition, file layout), so old caches are ignored.
CACHE_FORMAT = 1


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over the state dict's names, shapes, dtypes and raw bytes (parameters and persistent buffers).

    Tensor bytes are hashed through numpy buffers without any copy beyond moving to CPU; a ViT-L (300 M parameters,
    1.2 GB) hashes in a couple of seconds. Keys are sorted so the result does not depend on registration order.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name]
        digest.update(name.encode())
        digest.update(f"|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        # A uint8 view works for every dtype, including bfloat16 which numpy cannot represent.
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def architecture_description(backbone: nn.Module) -> str:
    """What the state dict does not capture but changes the function: module tree, attention heads, build options.

    (Two ViTs with equal weights but a different ``num_heads`` compute different features.)
    """
    heads = sorted({int(m.num_heads) for m in backbone.modules() if isinstance(getattr(m, "num_heads", None), int)})
    text = (f"{type(backbone).__qualname__}|{backbone!r}|heads={heads}|"
            f"prefix={getattr(backbone, 'num_prefix_tokens', 1)}|{_describe(getattr(backbone, 'architecture', None))}")
    return hashlib.sha256(text.encode()).hexdigest()


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(obj: Any, depth: int = 0) -> str:
    """A stable, content-based description of a (transform) object for cache keys.

    Uses ``obj.describe()`` when the object has one; otherwise walks its attributes, because a default ``repr``
    (``<EvalTransform object at 0x7f…>``) changes every run and would make the cache useless — while a
    description that misses a setting would serve stale features.
    """
    describe = getattr(obj, "describe", None)
    if callable(describe) and not isinstance(obj, type):
        return str(describe())
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return repr(obj)
    if isinstance(obj, (list, tuple)):
        inner = ",".join(_describe(v, depth + 1) for v in obj)
        return f"[{inner}]" if isinstance(obj, list) else f"({inner}{',' if len(obj) == 1 else ''})"
    if isinstance(obj, dict):
        return "{" + ",".join(f"{k!r}:{_describe(v, depth + 1)}" for k, v in sorted(obj.items(), key=str)) + "}"
    if isinstance(obj, torch.Tensor):
        data = obj.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data
        return f"tensor{tuple(obj.shape)}{obj.dtype}:{hashlib.sha256(data).hexdigest()[:16]}"
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    attributes = getattr(obj, "__dict__", None)
    if type(obj).__getstate__ is not object.__getstate__:   # a class that says what its state is (not its caches)
        state = obj.__getstate__()
        attributes = state if isinstance(state, dict) else attributes
    if attributes and depth < 8:
        inner = ",".join(f"{k}={_describe(v, depth + 1)}" for k, v in sorted(attributes.items()))
        return f"{name}({inner})"
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    return f"{name}:{_ADDRESS.sub('', repr(obj))}"


def transform_description(transform: Callable) -> str:
    """A stable description of the evaluation transform (see :func:`_describe`)."""
    return _describe(transform)


def precision_of(accelerator: "Accelerator | None") -> str:
    """The autocast precision of the forward passes ("fp32", "bf16", "fp16"): it changes the features slightly."""
    mixed = "no" if accelerator is None else str(getattr(accelerator, "mixed_precision", "no"))
    return "fp32" if mixed == "no" else mixed


def source_key(*, weights: str, architecture: str, dataset: Any, transform: str, precision: str) -> dict:
    """Everything the features of one backbone on one dataset depend on, whatever the layer, as a JSON-able dict."""
    return {
        "format": CACHE_FORMAT,
        "weights": weights,
        "architecture": architecture,
        "dataset": str(dataset.fingerprint),
        "num_samples": len(dataset),
        "transform": transform,
        "precision": precision,
    }


def feature_cache_key(*, request: "FeatureRequest", **source: Any) -> dict:
    """Everything a cached feature matrix depends on (:func:`source_key` and the resolved ``request``)."""
    return {**source_key(**source), "request": str(request)}


def key_json(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def cache_path(cache_dir: Path, key_json: str) -> Path:
    return cache_dir / f"{hashlib.sha256(key_json.encode()).hexdigest()}.pt"


def load_cached(path: Path, key_json: str) -> torch.Tensor | None:
    """The cached tensor, or ``None`` if absent, unreadable or stored under a different key (a hash collision)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt or foreign file is a cache miss; it is rewritten below
        return None
    if not isinstance(stored, dict) or stored.get("key") != key_json:
        return None
    return stored["features"]


def cache_source(backbone: nn.Module, dataset: Any, transform: Callable, accelerator: "Accelerator | None" = None,
                 weights_key: str | None = None) -> dict[str, Any]:
    """The keyword arguments of :func:`source_key` for ``backbone`` (unwrapped) evaluated on ``dataset`` through
    ``transform``; ``weights_key`` is a precomputed :func:`weights_fingerprint`."""
    return dict(weights=weights_key or weights_fingerprint(backbone), architecture=architecture_description(backbone),
                dataset=dataset, transform=transform_description(transform), precision=precision_of(accelerator))


def lock_path(cache: Path, source: dict[str, Any]) -> Path:
    """The lock file of one (backbone, dataset, transform, precision) in ``cache`` (see :func:`extraction_lock`)."""
    return cache / f"{hashlib.sha256(key_json(source_key(**source)).encode()).hexdigest()}.lock"


def extraction_lock(cache: Path | None, source: dict[str, Any], num_processes: int) -> ContextManager[None]:
    """While one process extracts features of a checkpoint and dataset into the cache, another asking for features
    of the same checkpoint and dataset waits for it and then reads the cache instead of running the same forward
    passes (two evaluations started together, e.g. a sweep). One lock per :func:`cache_source`, whatever the
    layers. Single-process extraction only: in a distributed run the other ranks would wait in a collective while
    their main process waits for the lock, and could time out.
    """
    if cache is None or num_processes > 1:
        return contextlib.nullcontext()
    lock = lock_path(cache, source)

    def tell() -> None:
        print(f"feature cache: another process is extracting features of this checkpoint and data; waiting for it "
              f"(lock {lock})", file=sys.stderr, flush=True)

    return file_lock(lock, on_wait=tell)
