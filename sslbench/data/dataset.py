"""In-memory image datasets and the loaders that feed the trainer and the feature extractor.

Design: on a small CPU machine the trainer must never wait for data. Small datasets (Fashion-MNIST, digits,
CIFAR-size) are decoded **once** into a ``uint8`` tensor ``(N, C, H, W)``; a training batch is then one
index-gather, and all augmentation happens batched on tensors (see :mod:`sslbench.data.views`). No DataLoader workers.
Datasets too large for that (ImageNet) hold :class:`sslbench.data.lazy.LazyImages` instead, and the same loaders
decode their batches in DataLoader workers — same order, same batches.

The sources that produce an :class:`ImageDataset` (Hugging Face datasets, Fashion-MNIST IDX files, scikit-learn's
digits) live in :mod:`sslbench.data.sources`; ``BUILTIN_SOURCES`` and the ``load_*`` functions are re-exported here.

>>> ds = ImageDataset(torch.zeros(10, 1, 8, 8, dtype=torch.uint8), torch.arange(10) % 2, ["a", "b"], "toy", "f0")
>>> loader = InMemoryLoader(ds, batch_size=4, seed=0)
>>> [batch["images"].shape[0] for batch in loader.iter_epoch(epoch=0)]
[4, 4]
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from sslbench.core.errors import UserError
from sslbench.data.lazy import LazyImages, decoded_batches, is_lazy
from sslbench.core.options import Option, validate_options

# Number of images hashed into a fingerprint: enough to tell datasets apart, cheap even for ImageNet-size tensors.
_FINGERPRINT_SAMPLE = 1024


def compute_fingerprint(identity: str, images: Tensor, labels: Tensor) -> str:
    """A stable hash of where the data came from (``identity``: source, split, options) and a sample of its content.

    All labels and up to 1024 evenly spaced images are hashed, so two datasets with the same identity but
    different content (another version of the files) get different fingerprints. Used to key feature caches.
    """
    h = hashlib.sha256()
    h.update(identity.encode())
    h.update(repr((tuple(images.shape), str(images.dtype), tuple(labels.shape))).encode())
    h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    n = images.shape[0]
    if n:
        picks = torch.linspace(0, n - 1, min(n, _FINGERPRINT_SAMPLE)).round().long().unique()
        h.update(images[picks].contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


@dataclass
class ImageDataset:
    """A whole dataset in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``.

    ``labels`` are ``-1`` for an unlabelled dataset (then ``classes`` is empty). ``fingerprint`` identifies
    source + split + content (see :func:`compute_fingerprint`). ``images`` may be a
    :class:`~sslbench.data.lazy.LazyImages` (decoded on indexing) for datasets too large for memory.
    """

    images: Tensor
    labels: Tensor
    classes: list[str]
    name: str
    fingerprint: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"labels must be (N,) with N={self.images.shape[0]}, got {tuple(self.labels.shape)}")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> tuple[int, int]:
        """Image ``(height, width)``."""
        return self.images.shape[2], self.images.shape[3]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: Sequence[int] | Tensor) -> "ImageDataset":
        """The samples at ``indices`` (in that order); the fingerprint also hashes the indices."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        digest = hashlib.sha256(self.fingerprint.encode() + index.numpy().tobytes()).hexdigest()[:20]
        images = self.images.select(index) if isinstance(self.images, LazyImages) else self.images[index]
        return ImageDataset(images, self.labels[index], list(self.classes), self.name, digest)

    def __repr__(self) -> str:
        c, (h, w) = self.channels, self.size
        return f"ImageDataset({self.name!r}, n={len(self)}, {c}x{h}x{w}, classes={len(self.classes)})"


@dataclass(frozen=True)
class DataSource:
    """A named way to obtain an :class:`ImageDataset`: its options schema, its ``load(**options)`` function and,
    optionally, ``check(key, **options)``: a quick test (a path exists, the hub has the dataset) that raises a
    one-line :class:`~sslbench.core.errors.UserError` naming ``key``, run before the model is built."""

    name: str
    description: str
    options: dict[str, Option]
    load: Callable[..., ImageDataset]
    check: Callable[..., None] | None = None

    def build(self, given: Mapping[str, Any] | None, key_path: str) -> ImageDataset:
        """Validate the recipe table ``given`` (errors name ``key_path``) and load the dataset."""
        return self.load(**validate_options(self.options, given, key_path))


def _epoch_seed(seed: int, epoch: int) -> int:
    """One 63-bit generator seed per (seed, epoch), so epochs are independent yet reproducible."""
    digest = hashlib.sha256(f"sslbench-loader:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _check_process(num_processes: int, process_index: int) -> None:
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} not in [0, {num_processes})")


def _batch(dataset: ImageDataset, index: Tensor, device: torch.device | str | None) -> dict[str, Tensor]:
    batch = {"images": dataset.images[index], "labels": dataset.labels[index], "index": index}
    if device is not None:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch


def _batches(dataset: ImageDataset, indices: Iterator[Tensor],
             device: torch.device | str | None) -> Iterator[dict[str, Tensor]]:
    """The batches of a sequence of index tensors: gathered from memory, or decoded by workers when lazy."""
    if is_lazy(dataset):
        return decoded_batches(dataset, indices, device)
    return (_batch(dataset, index, device) for index in indices)


class InMemoryLoader:
    """Shuffled training batches from an in-memory dataset, sharded across processes, resumable mid-epoch.

    ``batch_size`` is the **global** batch (summed over processes) and must be divisible by ``num_processes``.
    Each epoch draws one permutation from a generator seeded with ``(seed, epoch)``; step ``s`` uses the
    global batch ``perm[s*B:(s+1)*B]`` and process ``p`` takes its contiguous slice
    ``[p*B/P, (p+1)*B/P)`` of it — so the union over processes of a step is exactly the one-process batch,
    and ``N`` processes train on the same data as one process with the same global batch. The incomplete last
    batch is dropped (``drop_last``), which keeps every step's global batch the same size.

    Iterating the loader runs through epoch after epoch without end, starting at ``start_step`` counted from
    the beginning of epoch 0 (a resumed run passes the number of batches already consumed); ``iter_epoch``
    gives a single epoch. Batches are ``{"images": uint8 (b, C, H, W), "labels": (b,), "index": (b,)}``,
    ``b = B / P``, on ``device`` when given. A lazy dataset's batches are decoded by DataLoader workers
    (:mod:`sslbench.data.lazy`), in the same order.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int = 0, num_processes: int = 1,
                 process_index: int = 0, start_step: int = 0, shuffle: bool = True,
                 device: torch.device | str | None = None):
        _check_process(num_processes, process_index)
        if batch_size < 1 or batch_size % num_processes:
            raise UserError(f"batch_size {batch_size} must be a positive multiple of the number of processes "
                            f"({num_processes})")
        if len(dataset) < batch_size:
            raise UserError(f"dataset {dataset.name!r} has {len(dataset)} samples, fewer than one batch "
                            f"(batch_size {batch_size}); lower batch_size")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.local_batch_size = batch_size // num_processes
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        self.start_step = start_step
        self.shuffle = shuffle
        self.device = device

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def __len__(self) -> int:
        return self.steps_per_epoch

    def permutation(self, epoch: int) -> Tensor:
        """The epoch's order of dataset indices (identity when ``shuffle`` is off)."""
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(n, generator=generator)

    def epoch_indices(self, epoch: int, start_step: int = 0) -> Iterator[Tensor]:
        """This process's dataset indices of each batch of ``epoch``, beginning at step ``start_step``."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        perm = self.permutation(epoch)
        lo = self.process_index * self.local_batch_size
        for step in range(start_step, self.steps_per_epoch):
            global_batch = perm[step * self.batch_size:(step + 1) * self.batch_size]
            yield global_batch[lo:lo + self.local_batch_size]

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
        """This process's batches of ``epoch``, beginning at step ``start_step`` of that epoch."""
        return _batches(self.dataset, self.epoch_indices(epoch, start_step), self.device)

    def _endless_indices(self) -> Iterator[Tensor]:
        epoch, step = divmod(self.start_step, self.steps_per_epoch)
        while True:
            yield from self.epoch_indices(epoch, step)
            epoch, step = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return _batches(self.dataset, self._endless_indices(), self.device)


def eval_shard(num_samples: int, num_processes: int = 1, process_index: int = 0) -> range:
    """The contiguous range of dataset indices that ``process_index`` handles during evaluation.

    Shards differ in size by at most one and are concatenated in process order, so gathering the per-process
    results (after trimming any padding the gather adds) gives the dataset in its own order, each sample once.
    """
    _check_process(num_processes, process_index)
    return range(num_samples * process_index // num_processes, num_samples * (process_index + 1) // num_processes)


def iter_eval_batches(dataset: ImageDataset, batch_size: int, num_processes: int = 1, process_index: int = 0,
                      device: torch.device | str | None = None) -> Iterator[dict[str, Tensor]]:
    """This process's shard of ``dataset`` in order, in batches of ``batch_size`` (per process; last may be smaller).

    No padding duplicates: every sample is in exactly one process's shard (see :func:`eval_shard`). Note that
    processes may get different numbers of batches — gather once at the end rather than per batch.
    """
    if batch_size < 1:
        raise UserError(f"evaluation batch_size must be >= 1, got {batch_size}")
    shard = eval_shard(len(dataset), num_processes, process_index)
    indices = (torch.arange(start, min(start + batch_size, shard.stop))
               for start in range(shard.start, shard.stop, batch_size))
    return _batches(dataset, indices, device)
