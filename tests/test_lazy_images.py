"""Lazily decoded datasets (ImageNet-size): a small imagefolder loaded lazily gives exactly the batches, order and
fingerprint of the same folder decoded in memory, with and without DataLoader workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslbench.data.dataset import InMemoryLoader, iter_eval_batches
from sslbench.data.sources import load_imagefolder
from sslbench.core.errors import UserError
from sslbench.data.lazy import LazyImages, is_lazy

CLASSES = ["ant", "bee", "cow"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 RGB images of mixed sizes (some not square) in <class>/<file>.png folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(3)
    for i in range(12):
        height, width = (10, 14) if i % 3 else (12, 12)
        sub = root / CLASSES[i % 3]
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(sub / f"{i:02d}.png")
    return root


def load(folder, tmp_path, **options):
    return load_imagefolder(path=str(folder), resize=8, hf_cache_dir=str(tmp_path / "hf"),
                            cache_dir=str(tmp_path / "decoded"), **options)


def test_lazy_equals_memory(folder, tmp_path):
    memory = load(folder, tmp_path, storage="memory")
    lazy = load(folder, tmp_path, storage="lazy")
    assert is_lazy(lazy) and not is_lazy(memory)
    assert lazy.images.shape == memory.images.shape == (12, 3, 8, 8) and lazy.channels == 3
    assert lazy.fingerprint == memory.fingerprint  # feature caches are shared between the two paths
    assert torch.equal(lazy.labels, memory.labels) and lazy.classes == memory.classes == CLASSES
    index = torch.tensor([5, 0, 11])
    assert torch.equal(lazy.images[index], memory.images[index])
    assert torch.equal(lazy.images[3], memory.images[3])
    sub = lazy.subset([7, 2])
    assert isinstance(sub.images, LazyImages) and torch.equal(sub.images[:], memory.images[[7, 2]])
    assert sub.fingerprint == memory.subset([7, 2]).fingerprint
    assert not list((tmp_path / "decoded").glob("*lazy*"))


@pytest.mark.parametrize("workers", ["0", "1"])
def test_lazy_batches_match_in_order(folder, tmp_path, monkeypatch, workers):
    monkeypatch.setenv("SSLBENCH_DATA_WORKERS", workers)
    memory = load(folder, tmp_path, storage="memory")
    lazy = load(folder, tmp_path, storage="lazy")
    for process in range(2):
        kwargs = dict(batch_size=4, seed=5, num_processes=2, process_index=process, start_step=1)
        expected, got = iter(InMemoryLoader(memory, **kwargs)), iter(InMemoryLoader(lazy, **kwargs))
        for _ in range(5):  # past the end of the first epoch (3 steps)
            a, b = next(expected), next(got)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    eval_memory = list(iter_eval_batches(memory, 5, num_processes=2, process_index=1))
    eval_lazy = list(iter_eval_batches(lazy, 5, num_processes=2, process_index=1))
    assert len(eval_lazy) == len(eval_memory) == 2
    assert all(torch.equal(a["images"], b["images"]) and torch.equal(a["index"], b["index"])
               for a, b in zip(eval_memory, eval_lazy))


def test_auto_storage_uses_the_memory_limit(folder, tmp_path, monkeypatch):
    assert not is_lazy(load(folder, tmp_path))  # 12 x 3 x 8 x 8 bytes: far below 4 GB
    monkeypatch.setenv("SSLBENCH_MEMORY_LIMIT_GB", "1e-6")  # 1,000 bytes < 2,304
    assert is_lazy(load(folder, tmp_path))
    monkeypatch.setenv("SSLBENCH_MEMORY_LIMIT_GB", "lots")
    with pytest.raises(UserError, match="SSLBENCH_MEMORY_LIMIT_GB"):
        load(folder, tmp_path)


def test_lazy_needs_one_size(folder, tmp_path):
    with pytest.raises(UserError, match=r"image \d+ is 14x10, image 0 is 12x12; set the source.s resize"):
        load_imagefolder(path=str(folder), storage="lazy", hf_cache_dir=str(tmp_path / "hf"))
