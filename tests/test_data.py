"""Data sources read tiny synthetic data written in the real formats (IDX, PNG folders, save_to_disk, parquet);
the loaders' sharding and resume invariants are checked exactly."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import sslbench.data.sources as sources
from sslbench.data.dataset import (
    ImageDataset, InMemoryLoader, compute_fingerprint, eval_shard, iter_eval_batches,
)
from sslbench.data.sources import (
    BUILTIN_SOURCES, FASHION_MNIST_CLASSES, load_digits, load_disk, load_fashion_mnist, load_hf, load_imagefolder, load_parquet,
    read_idx,
)
from sslbench.core.errors import RecipeError, UserError
from sslbench.core.options import validate_options

CLASSES = ["cat", "dog", "eel"]


def toy(n: int = 103, c: int = 1, size: int = 4) -> ImageDataset:
    images = torch.arange(n * c * size * size, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, c, size, size)
    return ImageDataset(images, torch.arange(n) % 7, [str(i) for i in range(7)], "toy", "toy-fp")


# --------------------------------------------------------------------------------------------------------- IDX

def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """IDX by the spec: 00 00 <type> <ndim>, big-endian uint32 dims, big-endian data."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def write_fashion_mnist(root: Path, n_train: int = 12, n_test: int = 5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = {}
    root.mkdir(parents=True, exist_ok=True)
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[split] = images, labels
    return out


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trip(tmp_path, gz, dtype):
    array = (np.arange(2 * 3 * 5) * 37 - 100).reshape(2, 3, 5).astype(dtype)
    if dtype == np.uint8:
        array = (np.arange(30) * 37 % 256).reshape(2, 3, 5).astype(np.uint8)
    write_idx(tmp_path / "x.idx", array, gz=gz)
    parsed = read_idx(tmp_path / "x.idx")
    assert parsed.shape == (2, 3, 5) and np.array_equal(parsed, array) and parsed.dtype.isnative


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(UserError, match="bad magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc")
    with pytest.raises(UserError, match="need 5 bytes"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_idx_root_and_env(tmp_path, monkeypatch):
    written = write_fashion_mnist(tmp_path / "fm")
    ds = load_fashion_mnist(split="test", root=str(tmp_path / "fm"))
    images, labels = written["test"]
    assert torch.equal(ds.images, torch.from_numpy(images).unsqueeze(1))
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    assert ds.classes == FASHION_MNIST_CLASSES and ds.classes[0] == "T-shirt/top" and ds.name == "fashion_mnist:test"
    monkeypatch.setenv("SSLBENCH_FASHION_MNIST", str(tmp_path / "fm"))
    train = load_fashion_mnist(split="train", limit=4)
    assert torch.equal(train.images, torch.from_numpy(written["train"][0][:4]).unsqueeze(1))


def test_fashion_mnist_falls_back_to_the_hub_with_the_same_fingerprint(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "fm")
    from_idx = load_fashion_mnist(split="train", root=str(tmp_path / "fm"))
    calls = []

    def fake_hub(split, limit, hf_cache_dir):
        calls.append(split)
        return ImageDataset(from_idx.images.clone(), from_idx.labels.clone(), ["T - shirt / top"] * 10, "hub", "x")

    monkeypatch.setattr(sources, "_fashion_mnist_from_hub", fake_hub)
    from_hub = load_fashion_mnist(split="train", root=str(tmp_path / "empty"))
    assert calls == ["train"] and torch.equal(from_hub.images, from_idx.images)
    assert from_hub.fingerprint == from_idx.fingerprint and from_hub.classes == FASHION_MNIST_CLASSES


def test_fashion_mnist_missing_everywhere_names_both_ways(tmp_path, monkeypatch):
    def offline(*args):
        raise ConnectionError("offline")

    monkeypatch.setattr(sources, "_fashion_mnist_from_hub", offline)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist") as err:
        load_fashion_mnist(root=str(tmp_path))
    assert "network" in str(err.value) and str(tmp_path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(not Path(sources.FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_test_split(monkeypatch):
    monkeypatch.delenv("SSLBENCH_FASHION_MNIST", raising=False)
    ds = load_fashion_mnist(split="test")
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.labels.bincount(), torch.full((10,), 1000))


# ------------------------------------------------------------------------------------------------------ digits

def bilinear_upsample(image: np.ndarray, size: int) -> np.ndarray:
    """Independent separable bilinear resize (pixel centres, edge clamped) with np.interp."""
    n = image.shape[0]
    src = (np.arange(size) + 0.5) * n / size - 0.5  # np.interp clamps outside [0, n-1], like align_corners=False
    rows = np.stack([np.interp(src, np.arange(n), image[:, j]) for j in range(n)], axis=1)
    return np.stack([np.interp(src, np.arange(n), rows[i]) for i in range(size)], axis=0)


def test_digits_split_scaling_and_upsampling():
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    train, test = load_digits(split="train", size=8), load_digits(split="test", size=8)
    assert (len(train), len(test)) == (1347, 450) and train.channels == 1 and train.size == (8, 8)
    full = torch.bincount(torch.from_numpy(bunch.target), minlength=10)
    assert torch.equal(train.labels.bincount(minlength=10) + test.labels.bincount(minlength=10), full)
    assert ((test.labels.bincount(minlength=10).double() - 0.25 * full.double()).abs() <= 1).all()  # stratified
    # Every sample is in exactly one split: the multiset of (image, label) rows is the whole dataset's.
    def rows(images, labels) -> list[tuple]:
        return [tuple(np.asarray(im).flatten().tolist()) + (int(y),) for im, y in zip(images, labels)]

    scaled = np.round(bunch.images * 255 / 16).astype(np.uint8)
    split_rows = rows(train.images, train.labels) + rows(test.images, test.labels)
    assert sorted(split_rows) == sorted(rows(scaled, bunch.target))

    big = load_digits(split="train", size=20, limit=5)
    assert big.images.shape == (5, 1, 20, 20)
    reference = np.round(bilinear_upsample(bunch.images[_first_train_index()] * 255 / 16, 20))
    assert np.abs(big.images[0, 0].numpy().astype(int) - reference).max() <= 1  # float32 vs float64 rounding


def _first_train_index() -> int:
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    target = sklearn_digits().target
    train, _ = train_test_split(np.arange(len(target)), test_size=0.25, stratify=target, random_state=0)
    return int(np.sort(train)[0])


def test_digits_is_deterministic_and_seeded():
    a, b, c = load_digits(split="test"), load_digits(split="test"), load_digits(split="test", seed=1)
    assert torch.equal(a.images, b.images) and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint and a.fingerprint != load_digits(split="train").fingerprint


# ------------------------------------------------------------------------------------------ Hugging Face formats

@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    """The same 9 RGB 8x10 images as a save_to_disk folder, a DatasetDict folder, parquet and an imagefolder."""
    import datasets
    from PIL import Image

    root = tmp_path_factory.mktemp("hf")
    arrays = np.random.default_rng(1).integers(0, 256, (9, 8, 10, 3), dtype=np.uint8)
    labels = [i % 3 for i in range(9)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                                  "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays], "label": labels,
                                     "caption": [CLASSES[(i + 1) % 3] for i in range(9)]}, features=features)
    ds.save_to_disk(str(root / "disk"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(root / "dict"))
    ds.to_parquet(str(root / "data.parquet"))
    for i, array in enumerate(arrays):
        folder = root / "folder" / CLASSES[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{i:03d}.png")
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    return {"root": root, "images": images, "labels": torch.tensor(labels), "hf_cache": str(root / "hf_cache")}


def test_disk_parquet_and_imagefolder_load_the_same_tensors(hf_files):
    root, hf_cache = hf_files["root"], hf_files["hf_cache"]
    disk = load_disk(path=str(root / "disk"))
    parquet = load_parquet(path=str(root / "data.parquet"), hf_cache_dir=hf_cache)
    for ds in (disk, parquet):
        assert torch.equal(ds.images, hf_files["images"]) and torch.equal(ds.labels, hf_files["labels"])
        assert ds.classes == CLASSES and ds.images.dtype == torch.uint8
    folder = load_imagefolder(path=str(root / "folder"), hf_cache_dir=hf_cache)
    assert folder.classes == CLASSES
    # imagefolder orders files its own way: compare the (label, pixels) multisets.
    key = lambda ds: sorted((int(y), im.numpy().tobytes()) for im, y in zip(ds.images, ds.labels))
    assert key(folder) == key(disk)


def test_hf_loads_a_local_data_folder(hf_files, tmp_path):
    parquet_dir = tmp_path / "pq"
    parquet_dir.mkdir()
    (parquet_dir / "data.parquet").write_bytes((hf_files["root"] / "data.parquet").read_bytes())
    ds = load_hf(path=str(parquet_dir), split="train", hf_cache_dir=hf_files["hf_cache"])
    assert torch.equal(ds.images, hf_files["images"]) and ds.classes == CLASSES


def test_dataset_dict_folder_needs_a_split(hf_files):
    with pytest.raises(UserError, match="splits"):
        load_disk(path=str(hf_files["root"] / "dict"))
    test = load_disk(path=str(hf_files["root"] / "dict"), split="test")
    assert torch.equal(test.images, hf_files["images"][:3])
    with pytest.raises(UserError, match="single split"):
        load_disk(path=str(hf_files["root"] / "disk"), split="train")


def test_decoded_tensor_is_cached(hf_files, tmp_path, monkeypatch):
    options = {"path": str(hf_files["root"] / "disk"), "cache_dir": str(tmp_path / "c")}
    first = load_disk(**options)
    assert len(list((tmp_path / "c").glob("disk-*.pt"))) == 1 and not list((tmp_path / "c").glob(".*tmp"))

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(sources, "_decode_images", must_not_decode)
    second = load_disk(**options)
    assert torch.equal(second.images, first.images) and second.fingerprint == first.fingerprint
    with pytest.raises(AssertionError, match="decoded again"):
        load_disk(**options, cache=False)
    with pytest.raises(AssertionError, match="decoded again"):
        load_disk(**options, limit=3)  # other options, other cache entry


def test_resize_channels_limit_and_label_columns(hf_files):
    from PIL import Image

    path = str(hf_files["root"] / "disk")
    grey = load_disk(path=path, channels=1, limit=4)
    expected = [np.asarray(Image.fromarray(a.permute(1, 2, 0).numpy()).convert("L")) for a in hf_files["images"][:4]]
    assert grey.images.shape == (4, 1, 8, 10) and torch.equal(grey.images[:, 0], torch.tensor(np.stack(expected)))
    small = load_disk(path=path, resize=4)
    pil = Image.fromarray(hf_files["images"][0].permute(1, 2, 0).numpy())
    reference = np.asarray(pil.resize((5, 4), Image.Resampling.BICUBIC).crop((0, 0, 4, 4)))  # 8x10 -> 4x5 -> centre
    assert small.images.shape == (9, 3, 4, 4) and torch.equal(small.images[0], torch.tensor(reference).permute(2, 0, 1))
    squashed = load_disk(path=path, resize=4, resize_mode="squash")
    reference = np.asarray(pil.resize((4, 4), Image.Resampling.BICUBIC))
    assert torch.equal(squashed.images[0], torch.tensor(reference).permute(2, 0, 1))
    captions = load_disk(path=path, label_column="caption")
    assert captions.classes == CLASSES and torch.equal(captions.labels, (hf_files["labels"] + 1) % 3)
    unlabelled = load_disk(path=path, label_column="none")
    assert unlabelled.classes == [] and (unlabelled.labels == -1).all()
    with pytest.raises(UserError, match="image_column 'label'"):
        load_disk(path=path, image_column="label")


def test_mixed_image_sizes_ask_for_resize(tmp_path):
    from PIL import Image

    for i, size in enumerate([(6, 6), (7, 5)]):
        (tmp_path / "f" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(tmp_path / "f" / "a" / f"{i}.png")
    with pytest.raises(UserError, match="resize"):
        load_imagefolder(path=str(tmp_path / "f"), hf_cache_dir=str(tmp_path / "hf"))
    assert load_imagefolder(path=str(tmp_path / "f"), resize=4, hf_cache_dir=str(tmp_path / "hf")).size == (4, 4)


def test_missing_local_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="could not load imagefolder"):
        load_imagefolder(path=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="could not load disk"):
        load_disk(path=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------- dataset and registry

def test_fingerprint_and_subset():
    ds = toy()
    assert compute_fingerprint("a", ds.images, ds.labels) == compute_fingerprint("a", ds.images.clone(), ds.labels)
    assert compute_fingerprint("a", ds.images, ds.labels) != compute_fingerprint("b", ds.images, ds.labels)
    changed = ds.images.clone()
    changed[-1] += 1  # the last image is always in the hashed sample
    assert compute_fingerprint("a", changed, ds.labels) != compute_fingerprint("a", ds.images, ds.labels)
    sub = ds.subset([5, 2, 9])
    assert torch.equal(sub.images, ds.images[[5, 2, 9]]) and sub.labels.tolist() == [5, 2, 2]
    assert sub.fingerprint not in (ds.fingerprint, ds.subset([2, 5, 9]).fingerprint)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(ds.images.float(), ds.labels, [], "x", "y")


def test_builtin_sources_schemas_validate():
    assert set(BUILTIN_SOURCES) == {"hf", "imagefolder", "disk", "parquet", "fashion_mnist", "digits"}
    for name, source in BUILTIN_SOURCES.items():
        given = {"path": "x"} if "path" in source.options else {}
        assert set(validate_options(source.options, given, f"data.{name}")) == set(source.options)
    with pytest.raises(RecipeError, match="data.train.channels"):
        BUILTIN_SOURCES["hf"].build({"path": "x", "channels": 2}, "data.train")
    ds = BUILTIN_SOURCES["digits"].build({"split": "test", "size": 8, "limit": 10}, "data.test")
    assert ds.images.shape == (10, 1, 8, 8)


# ------------------------------------------------------------------------------------------------------ loaders

@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_process_slices_union_to_the_one_process_batch(processes):
    ds, batch = toy(), 12
    single = list(InMemoryLoader(ds, batch, seed=3).iter_epoch(1))
    shards = [list(InMemoryLoader(ds, batch, seed=3, num_processes=processes, process_index=p).iter_epoch(1))
              for p in range(processes)]
    assert len(single) == 103 // 12 and all(len(s) == len(single) for s in shards)
    for step, whole in enumerate(single):
        parts = [shards[p][step] for p in range(processes)]
        assert all(part["index"].numel() == batch // processes for part in parts)
        assert torch.equal(torch.cat([part["index"] for part in parts]), whole["index"])
        for part in parts:
            assert torch.equal(part["images"], ds.images[part["index"]])
            assert torch.equal(part["labels"], ds.labels[part["index"]])


def test_epochs_are_seeded_permutations_without_repeats():
    ds = toy()
    loader = InMemoryLoader(ds, 10, seed=0)
    epoch0 = torch.cat([b["index"] for b in loader.iter_epoch(0)])
    assert epoch0.numel() == 100 and epoch0.unique().numel() == 100  # drop_last, no sample twice
    assert torch.equal(epoch0, torch.cat([b["index"] for b in InMemoryLoader(ds, 10, seed=0).iter_epoch(0)]))
    assert not torch.equal(epoch0, torch.cat([b["index"] for b in loader.iter_epoch(1)]))
    assert not torch.equal(epoch0, torch.cat([b["index"] for b in InMemoryLoader(ds, 10, seed=1).iter_epoch(0)]))
    ordered = torch.cat([b["index"] for b in InMemoryLoader(ds, 10, shuffle=False).iter_epoch(0)])
    assert torch.equal(ordered, torch.arange(100))


def test_resume_mid_epoch_and_endless_iteration():
    ds = toy()
    loader = InMemoryLoader(ds, 12, seed=5, num_processes=2, process_index=1)
    stream = iter(loader)
    uninterrupted = [next(stream)["index"] for _ in range(20)]  # 8 steps per epoch: crosses two epoch ends
    expected = [b["index"] for e in range(3) for b in loader.iter_epoch(e)][:20]
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, expected))
    resumed = iter(InMemoryLoader(ds, 12, seed=5, num_processes=2, process_index=1, start_step=11))
    assert all(torch.equal(next(resumed)["index"], uninterrupted[s]) for s in range(11, 20))
    tail = [b["index"] for b in loader.iter_epoch(1, start_step=3)]
    assert all(torch.equal(a, b) for a, b in zip(tail, uninterrupted[11:16]))


def test_loader_rejects_bad_batches():
    with pytest.raises(UserError, match="multiple of the number of processes"):
        InMemoryLoader(toy(), 10, num_processes=3)
    with pytest.raises(UserError, match="fewer than one batch"):
        InMemoryLoader(toy(n=5), 8)


@pytest.mark.parametrize("processes", [1, 2, 3, 4, 7])
def test_eval_batches_cover_each_sample_once(processes):
    ds = toy()
    seen, sizes = [], []
    for p in range(processes):
        shard = [b["index"] for b in iter_eval_batches(ds, 10, processes, p)]
        assert all(1 <= i.numel() <= 10 for i in shard)
        indices = torch.cat(shard)
        assert torch.equal(indices, torch.arange(eval_shard(103, processes, p).start,
                                                 eval_shard(103, processes, p).stop))  # contiguous, in order
        seen.append(indices)
        sizes.append(indices.numel())
    assert torch.equal(torch.cat(seen), torch.arange(103)) and max(sizes) - min(sizes) <= 1
    batch = next(iter_eval_batches(ds, 10))
    assert torch.equal(batch["images"], ds.images[:10]) and torch.equal(batch["labels"], ds.labels[:10])
