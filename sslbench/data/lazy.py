"""Images decoded per batch, for datasets too large to hold decoded in memory (ImageNet-1K: 1.28M images, about
250 GB as 256-px ``uint8``).

Small datasets are decoded once into a ``uint8`` tensor (:mod:`sslbench.data.dataset`). A Hugging Face source (``hf``,
``imagefolder``, ``disk``, ``parquet``) whose decoded tensor would be larger than the **memory limit** —
``$SSLBENCH_MEMORY_LIMIT_GB``, default 4 GB — is kept *lazy* instead (source option ``storage = "auto"``; force
either way with ``storage = "memory"`` or ``"lazy"``): :class:`LazyImages` stands in for the tensor (same
``shape``, ``dtype``, indexing), the Arrow table stays memory-mapped on disk, and the loaders decode each batch
in ``torch.utils.data.DataLoader`` worker processes (``$SSLBENCH_DATA_WORKERS``, default ``min(8, cores - 1)``;
0 decodes in the main process). Decoding is deterministic, so batches — and runs — are identical to the
in-memory path: only where the pixels wait differs.

Every image must come out at one size: set the source's ``resize`` (ImageNet recipes store 256-px squares); a
differently sized image stops the run when its batch is decoded (the fingerprint decodes a sample of them at load).
Streaming datasets (``load_dataset(..., streaming=True)``) are not used: the trainer needs random access to
draw its seeded, resumable order.

>>> images = LazyImages(None, "image", channels=3, size=(4, 4), resize=None, resize_mode="squash", what="x", rows=[])
>>> images.shape, images.dtype, images.nbytes
(torch.Size([0, 3, 4, 4]), torch.uint8, 0)
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from sslbench.data.decoding import decode_rows, to_array_checked
from sslbench.core.errors import UserError

MEMORY_LIMIT_ENV = "SSLBENCH_MEMORY_LIMIT_GB"
DEFAULT_MEMORY_LIMIT_GB = 4.0
WORKERS_ENV = "SSLBENCH_DATA_WORKERS"
STORAGES = ("auto", "memory", "lazy")


def memory_limit_bytes() -> int:
    """Largest decoded dataset kept in memory under ``storage = "auto"`` (``$SSLBENCH_MEMORY_LIMIT_GB``)."""
    raw = os.environ.get(MEMORY_LIMIT_ENV)
    try:
        gigabytes = float(raw) if raw else DEFAULT_MEMORY_LIMIT_GB
    except ValueError:
        raise UserError(f"${MEMORY_LIMIT_ENV}: got {raw!r}, expected a number of gigabytes") from None
    return int(gigabytes * 1e9)


def data_workers() -> int:
    """DataLoader worker processes that decode lazy batches (``$SSLBENCH_DATA_WORKERS``)."""
    raw = os.environ.get(WORKERS_ENV)
    if raw:
        if not raw.isdigit():
            raise UserError(f"${WORKERS_ENV}: got {raw!r}, expected a number of worker processes (0: none)")
        return int(raw)
    return min(8, max(0, (os.cpu_count() or 1) - 1))


class LazyImages:
    """A ``uint8`` ``(N, C, H, W)`` image tensor that exists only on demand: ``images[index]`` decodes those rows.

    ``ds`` is a ``datasets.Dataset`` (only ``column`` is read); ``rows`` picks and orders its rows (default:
    all). Images are converted to ``channels`` and, when ``resize`` is set, resized to ``resize`` squares as the
    in-memory path does (:func:`sslbench.data.decoding.to_array`).
    """

    dtype = torch.uint8

    def __init__(self, ds: Any, column: str, channels: int, size: tuple[int, int], resize: int | None,
                 resize_mode: str, what: str, rows: Sequence[int] | Tensor | None = None):
        self.ds, self.column, self.channels, self.size = ds, column, channels, tuple(size)
        self.resize, self.resize_mode, self.what = resize, resize_mode, what
        self.rows = torch.arange(len(ds)) if rows is None else torch.as_tensor(rows, dtype=torch.int64)
        self.shape = torch.Size((len(self.rows), channels, *self.size))

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes the decoded tensor would take."""
        return int(np.prod(self.shape, dtype=np.int64))

    def select(self, index: Sequence[int] | Tensor) -> "LazyImages":
        """The rows at ``index`` (in that order), still lazy."""
        return LazyImages(self.ds, self.column, self.channels, self.size, self.resize, self.resize_mode,
                          self.what, self.rows[torch.as_tensor(index, dtype=torch.int64)])

    def __getitem__(self, index: Any) -> Tensor:
        """Decode the rows at ``index`` (an int, a slice, or a sequence/tensor of ints) into ``uint8``."""
        picked = self.rows[index]
        single = picked.dim() == 0
        rows = picked.reshape(-1).tolist()
        out = np.empty((len(rows), *self.size, self.channels), dtype=np.uint8)
        mode = "L" if self.channels == 1 else "RGB"
        images = decode_rows(self.ds, self.column, rows, self.what) if rows else []
        for i, (row, image) in enumerate(zip(rows, images)):
            array = to_array_checked(self.ds, self.column, row, image, mode, self.resize, self.resize_mode,
                                     self.what)
            if array.shape[:2] != self.size:
                raise UserError(f"{self.what}: image {row} is {array.shape[1]}x{array.shape[0]}, image 0 is "
                                f"{self.size[1]}x{self.size[0]}; set the source's resize option to store every "
                                "image at one size")
            out[i] = array.reshape(out.shape[1:])
        tensor = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
        return tensor[0] if single else tensor

    def __repr__(self) -> str:
        return f"LazyImages({self.what}, {tuple(self.shape)})"


def lazy_images(ds: Any, column: str, channels: int | None, resize: int | None, resize_mode: str,
                what: str) -> LazyImages:
    """Lazy images of ``ds``; the first image fixes the channels (unless given) and, without ``resize``, the size
    (every other image must then have it)."""
    if len(ds) == 0:
        raise UserError(f"{what} is empty")
    first = decode_rows(ds.select_columns([column]), column, [0], what)[0]
    if channels is None:
        channels = 1 if first.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    array = to_array_checked(ds, column, 0, first, "L" if channels == 1 else "RGB", resize, resize_mode, what)
    return LazyImages(ds.select_columns([column]), column, channels, array.shape[:2], resize, resize_mode, what)


def keep_lazy(images: LazyImages, storage: str) -> bool:
    """Whether to keep ``images`` lazy: always for ``"lazy"``, never for ``"memory"``, above the limit for auto."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    return storage == "lazy" or (storage == "auto" and images.nbytes > memory_limit_bytes())


def is_lazy(dataset: Any) -> bool:
    return isinstance(getattr(dataset, "images", None), LazyImages)


class _Rows(torch.utils.data.Dataset):
    """The map-style dataset a DataLoader worker sees: a whole batch per fetch (``__getitems__``)."""

    def __init__(self, dataset: Any):
        self.images, self.labels = dataset.images, dataset.labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return {"images": self.images[index], "labels": self.labels[index], "index": index}

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.__getitems__([i])


class _IndexLists:
    """A batch sampler over precomputed index tensors (the loaders' seeded, sharded order)."""

    def __init__(self, batches: Iterable[Tensor]):
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return (b.tolist() for b in self.batches)


def _whole(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return batch


def decoded_batches(dataset: Any, index_batches: Iterable[Tensor], device: torch.device | str | None = None,
                    workers: int | None = None) -> Iterator[dict[str, Tensor]]:
    """``{"images", "labels", "index"}`` for each index tensor of ``index_batches``, in order, decoded by workers.

    ``index_batches`` may be endless; the workers decode a few batches ahead of the consumer.
    """
    workers = data_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(_Rows(dataset), batch_sampler=_IndexLists(index_batches),
                                         num_workers=workers, collate_fn=_whole,
                                         prefetch_factor=4 if workers else None)
    try:
        for batch in loader:
            if device is not None:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            yield batch
    except UserError as exc:
        # A worker's error comes back wrapped with the worker's traceback as text; keep the user's one line.
        text = str(exc).strip()
        if "Original Traceback" not in text:
            raise
        last = text.splitlines()[-1]
        raise UserError(last.split(": ", 1)[1] if last.startswith("sslbench.") and ": " in last else last) from None
