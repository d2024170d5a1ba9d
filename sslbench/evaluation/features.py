"""Frozen-feature extraction with an on-disk cache — the one place evaluators get their inputs from.

Every evaluator (k-NN, linear probe, low-shot, clustering, layer-wise probe) works on frozen features of some block
and token. :func:`extract_features` computes all requested features of a dataset with **one** forward pass per batch
(all needed blocks are requested at once) and caches each feature matrix on disk, keyed by everything that
determines it: the weights, the dataset, the evaluation transform, the numeric precision and the request itself.
A second evaluation of the same checkpoint therefore runs no forward pass at all, and a changed checkpoint, dataset,
transform or layer can never be served stale features.

    >>> FeatureRequest(11, "cls", "normed")
    FeatureRequest('b11.cls.normed')
    >>> FeatureRequest.parse("b-1.cls+mean.raw").block
    -1

The cache's keys, files and lock are in :mod:`sslbench.evaluation.cache`.

Distributed (Accelerate, N processes): each process extracts a contiguous shard, the shards are padded to the longest
one for ``all_gather`` and trimmed again, so every sample appears exactly once, in dataset order, on every process.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sslbench.core.checkpoints import POOLING_NORM_EPS
from sslbench.core.errors import UserError
from sslbench.core.evaluator import FeatureRequest
from sslbench.core.progress import progress_bar
from sslbench.evaluation.cache import (cache_path, cache_source, extraction_lock, feature_cache_key, key_json, load_cached,
                            weights_fingerprint)
from sslbench.core.io import atomic_torch_save

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["FeatureRequest", "weights_fingerprint", "extract_features", "feature_cache_key", "pool"]

# --- extraction --------------------------------------------------------------------------------------------------

def pool(tokens: torch.Tensor, token: str, num_prefix: int, fc_norm: nn.Module | None = None) -> torch.Tensor:
    """(B, prefix+N, D) → (B, D) or (B, 2D): CLS is token 0; "mean" averages patch tokens only; "mean_fc_norm"
    passes that mean through ``fc_norm`` (the checkpoint's pooling LayerNorm), or, for a backbone without one, a
    LayerNorm without parameters (eps 1e-6, as data2vec 2.0's) — a stated choice: the normalisation is the part of
    data2vec 2.0's feature that does not depend on a fine-tuning run. That one is computed in float32 whatever the
    autocast (a CPU autocast would run the LayerNorm in bf16)."""
    cls = tokens[:, 0]
    if token == "cls":
        return cls
    if token == "mean_fc_norm":
        with torch.autocast(tokens.device.type, enabled=False):
            mean = tokens[:, num_prefix:].float().mean(dim=1)
            if fc_norm is None:
                return F.layer_norm(mean, mean.shape[-1:], eps=POOLING_NORM_EPS)
            return F.layer_norm(mean, mean.shape[-1:], fc_norm.weight.float(), fc_norm.bias.float(), fc_norm.eps)
    mean = tokens[:, num_prefix:].mean(dim=1)
    return mean if token == "mean" else torch.cat([cls, mean], dim=1)


def _forward_batch(backbone: nn.Module, images: torch.Tensor, requests: Sequence[FeatureRequest],
                   num_prefix: int) -> list[torch.Tensor]:
    """One forward pass returning every request's pooled (B, D) features."""
    blocks = sorted({r.block for r in requests})
    fc_norm = getattr(backbone, "fc_norm", None)
    norms = {r.norm for r in requests}
    out = "both" if len(norms) == 2 else norms.pop()
    # final=False: the block loop stops at the deepest requested block. The last block's normed stream is
    # exactly the final output (the final norm applied to the last block), so final=True would only repeat it.
    output = backbone(images, blocks=blocks, out=out, final=False)
    pooled = []
    for r in requests:
        tokens = (output.raw if r.norm == "raw" else output.normed).get(r.block)
        if tokens is None:
            raise RuntimeError(f"backbone returned no {r.norm} tokens for block {r.block}")
        # A copy, never a view: tokens[:, 0] would keep the whole (B, tokens, D) block output alive in the
        # per-batch lists — 17x the memory, ~22 GB for Fashion-MNIST's 24 per-block requests. One copy, which
        # also casts (bf16 on GPU) to float32.
        pooled.append(pool(tokens, r.token, num_prefix, fc_norm).to(torch.float32,
                                                                    memory_format=torch.contiguous_format, copy=True))
    return pooled


def _gather_in_order(local: torch.Tensor, local_index: torch.Tensor, accelerator: "Accelerator",
                     num_samples: int) -> torch.Tensor:
    """All processes' rows, each sample exactly once, in dataset order.

    ``all_gather`` needs equal shapes, so each shard is padded to the longest; the padding is trimmed with the
    gathered shard lengths. The gathered dataset indices then place every row, which also proves the shards
    covered the dataset exactly once.
    """
    device = accelerator.device
    length = torch.tensor([local.shape[0]], device=device)
    lengths = accelerator.gather(length).cpu().tolist()
    longest = max(lengths)
    padded = torch.zeros((longest, local.shape[1]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    index = torch.full((longest,), -1, dtype=torch.long, device=device)
    index[: local.shape[0]] = local_index.to(device)
    rows = accelerator.gather(padded).cpu().reshape(len(lengths), longest, -1)
    indices = accelerator.gather(index).cpu().reshape(len(lengths), longest)
    rows = torch.cat([rows[p, :n] for p, n in enumerate(lengths)])
    indices = torch.cat([indices[p, :n] for p, n in enumerate(lengths)])
    return _place(rows, indices, num_samples)


def _place(rows: torch.Tensor, indices: torch.Tensor, num_samples: int) -> torch.Tensor:
    if indices.numel() != num_samples or not torch.equal(torch.sort(indices).values, torch.arange(num_samples)):
        raise RuntimeError(f"feature extraction covered {indices.numel()} rows, not each of the {num_samples} "
                           "samples exactly once — the evaluation sharding is broken")
    result = torch.empty_like(rows)
    result[indices] = rows
    return result


def _any_process(accelerator: "Accelerator | None", flags: Iterable[bool]) -> list[bool]:
    """Element-wise OR of boolean flags over processes, so all processes take the same code path."""
    flags = list(flags)
    if accelerator is None or accelerator.num_processes <= 1 or not flags:
        return flags
    local = torch.tensor([int(f) for f in flags], device=accelerator.device)
    gathered = accelerator.gather(local).reshape(accelerator.num_processes, -1)
    return [bool(v) for v in gathered.amax(dim=0).cpu().tolist()]


def extract_features(
    backbone: nn.Module,
    dataset: Any,
    requests: Iterable[FeatureRequest],
    *,
    transform: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 256,
    accelerator: "Accelerator | None" = None,
    cache_dir: str | Path | None = None,
    weights_key: str | None = None,
    progress: bool = True,
) -> dict[FeatureRequest, torch.Tensor]:
    """Frozen features of every sample of ``dataset`` for each request: float32 CPU tensors (N, D) in dataset order.

    ``backbone`` follows the :class:`sslbench.core.backbone.Backbone` forward signature; ``dataset`` is an
    :class:`sslbench.data.dataset.ImageDataset`; ``transform`` maps a float batch in [0, 1] to the backbone's input
    (:class:`sslbench.data.views.EvalTransform`). With ``cache_dir`` each feature matrix is cached under a key of
    (weights, architecture, dataset fingerprint, transform, precision, request); ``weights_key`` is a precomputed
    :func:`weights_fingerprint` (computed here if omitted). Requests already cached cost no forward pass; if all are
    cached, none runs. The backbone runs in eval mode under ``torch.inference_mode`` and its mode is restored.
    With an ``accelerator`` of several processes every process must call this; all of them get the full result.
    """
    requests = list(requests)
    if not requests:
        return {}
    if batch_size < 1:
        raise UserError(f"feature extraction: batch_size must be >= 1, got {batch_size}")
    inner = accelerator.unwrap_model(backbone) if accelerator is not None else backbone
    depth = int(inner.depth)
    num_prefix = int(getattr(inner, "num_prefix_tokens", 1))
    resolved = {r: r.resolve(depth) for r in requests}
    unique = sorted(set(resolved.values()), key=lambda r: (r.block, r.token, r.norm))
    num_processes = accelerator.num_processes if accelerator is not None else 1
    process_index = accelerator.process_index if accelerator is not None else 0
    is_main = accelerator is None or accelerator.is_main_process

    cache = Path(cache_dir) if cache_dir is not None else None
    source = cache_source(inner, dataset, transform, accelerator, weights_key) if cache is not None else {}
    with extraction_lock(cache, source, num_processes):
        features: dict[FeatureRequest, torch.Tensor] = {}
        keys: dict[FeatureRequest, str] = {}
        if cache is not None:
            for r in unique:
                keys[r] = key_json(feature_cache_key(request=r, **source))
                cached = load_cached(cache_path(cache, keys[r]), keys[r])
                if cached is not None and cached.shape[0] == len(dataset):
                    features[r] = cached
        # A request missing on any process is recomputed by all: the forward passes contain collectives.
        missing = [r for r, miss in zip(unique, _any_process(accelerator, (r not in features for r in unique)))
                   if miss]
        if missing:
            computed = _extract(inner, dataset, missing, transform, batch_size, accelerator, num_prefix,
                                num_processes, process_index, progress and is_main)
            features.update(computed)
            if cache is not None and is_main:
                for r in missing:
                    atomic_torch_save({"key": keys[r], "features": computed[r]}, cache_path(cache, keys[r]))
            if cache is not None and accelerator is not None:
                accelerator.wait_for_everyone()  # later calls on other processes must see the files
    return {r: features[resolved[r]] for r in requests}


def _extract(backbone: nn.Module, dataset: Any, requests: Sequence[FeatureRequest], transform: Callable,
             batch_size: int, accelerator: "Accelerator | None", num_prefix: int,
             num_processes: int, process_index: int, show_progress: bool) -> dict[FeatureRequest, torch.Tensor]:
    # Deferred: sslbench.data.dataset pulls in `datasets`, which building a FeatureRequest should not pay for.
    from sslbench.data.dataset import eval_shard, iter_eval_batches
    from sslbench.data.views import to_float

    device = accelerator.device if accelerator is not None else next(backbone.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else _no_autocast
    chunks: list[list[torch.Tensor]] = [[] for _ in requests]
    index_chunks: list[torch.Tensor] = []
    shard = eval_shard(len(dataset), num_processes, process_index)
    bar = progress_bar(show_progress, total=len(shard), desc=f"features {_dataset_name(dataset)}", unit="img",
                       leave=False)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode(), autocast():
            for batch in iter_eval_batches(dataset, batch_size, num_processes, process_index):
                images = transform(to_float(batch["images"].to(device)))
                for chunk, pooled in zip(chunks, _forward_batch(backbone, images, requests, num_prefix)):
                    chunk.append(pooled.cpu())
                index_chunks.append(torch.as_tensor(batch["index"]).long().cpu())
                bar.update(len(images))
    finally:
        backbone.train(was_training)
        bar.close()
    # Concatenating outside inference_mode turns the per-batch inference tensors into ordinary tensors, which
    # callers may then use in autograd (e.g. a linear probe's inputs).
    local_index = torch.cat(index_chunks) if index_chunks else torch.zeros(0, dtype=torch.long)
    result = {}
    for r, chunk in zip(requests, chunks):
        local = torch.cat(chunk) if chunk else torch.zeros(0, _empty_width(backbone, r))
        if num_processes > 1:
            result[r] = _gather_in_order(local, local_index, accelerator, len(dataset))
        else:
            result[r] = _place(local, local_index, len(dataset))
    return result


def _empty_width(backbone: nn.Module, request: FeatureRequest) -> int:
    width = int(backbone.embed_dim)
    return 2 * width if request.token == "cls+mean" else width


def _dataset_name(dataset: Any) -> str:
    return str(getattr(dataset, "name", "dataset"))


class _no_autocast:
    """Stand-in for ``accelerator.autocast()`` without an accelerator: full precision."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
