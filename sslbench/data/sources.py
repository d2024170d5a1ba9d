"""Where images come from: Hugging Face datasets (hub, imagefolder, save_to_disk, parquet), Fashion-MNIST, digits.

Every source is a function ``load_<source>(**options) -> ImageDataset`` plus an options schema; together they form
:data:`BUILTIN_SOURCES`, which the plugin layer registers. Each source decodes its images once into a ``uint8``
tensor (see :mod:`sslbench.data.dataset`); Hugging Face sources also cache that tensor on disk, keyed by the dataset's
own fingerprint and our options, so the second run does not decode again. A Hugging Face source larger than
``$SSLBENCH_MEMORY_LIMIT_GB`` (default 4) decoded is kept lazy instead and decoded per batch
(:mod:`sslbench.data.lazy`; option ``storage``).

>>> ds = load_digits(split="test", size=16)
>>> ds.images.shape, ds.classes[:3]
(torch.Size([450, 1, 16, 16]), ['0', '1', '2'])
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sslbench.data.dataset import DataSource, ImageDataset, compute_fingerprint
from sslbench.core.errors import UserError
from sslbench.data.decoding import decode_rows, to_array_checked
from sslbench.data.hub import LOCAL_ALTERNATIVE, hub_offline
from sslbench.data.idx import FASHION_MNIST_ENV, FASHION_MNIST_HUB, FASHION_MNIST_ROOT, find_idx, read_idx
from sslbench.data.source_checks import check_fashion_mnist, check_hf, check_local_path, check_parquet
from sslbench.data.lazy import STORAGES, keep_lazy, lazy_images
from sslbench.core.options import Option

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
CACHE_ENV = "SSLBENCH_CACHE"

_DECODE_CHUNK = 1000  # rows fetched from Arrow at a time while decoding


def default_cache_dir() -> Path:
    """``$SSLBENCH_CACHE/datasets`` or ``~/.cache/sslbench/datasets``: decoded tensors shared by all runs."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sslbench"
    return Path(base) / "datasets"


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text[:limit]


def _take(images: torch.Tensor, labels: torch.Tensor, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    return (images[:limit], labels[:limit]) if limit else (images, labels)


# ------------------------------------------------------------------------------------------------ Hugging Face

def _open_hf(kind: str, path: str, config: str | None, split: str | None, hf_cache_dir: str | None):
    """Open a ``datasets.Dataset`` of the given kind; any failure becomes a one-line :class:`UserError`."""
    import datasets

    from sslbench.core.progress import progress_enabled

    if not progress_enabled():  # --no-progress silences datasets' own bars too
        datasets.disable_progress_bars()
    what = f"{kind} dataset {path!r}" + (f" (config {config!r})" if config else "")
    try:
        if kind == "hf":
            ds = datasets.load_dataset(path, name=config, split=split, cache_dir=hf_cache_dir)
        elif kind == "imagefolder":
            if not Path(path).is_dir():
                raise FileNotFoundError(f"no such folder {path}")
            ds = datasets.load_dataset("imagefolder", data_dir=path, split=split, cache_dir=hf_cache_dir)
        elif kind == "parquet":
            ds = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=hf_cache_dir)
        elif kind == "disk":
            ds = datasets.load_from_disk(path)
        else:
            raise ValueError(f"unknown Hugging Face source kind {kind!r}")
    except Exception as err:  # the hub, the file system and datasets' own checks all fail in their own types
        hint = ("; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, so only the Hugging Face cache is used: unset it to "
                f"download, or {LOCAL_ALTERNATIVE}" if kind == "hf" and hub_offline() else "")
        raise UserError(f"could not load {what}: {_first_line(err)}{hint}") from err
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise UserError(f"{what} holds splits {sorted(ds)}; set split to one of them (got {split!r})")
        ds = ds[split]
    elif kind == "disk" and split is not None:
        raise UserError(f"{what} holds a single split; remove the split option (got {split!r})")
    return ds


def _image_column(features: dict, requested: str, what: str) -> str:
    import datasets

    if requested != "auto":
        if not isinstance(features.get(requested), datasets.Image):
            raise UserError(f"{what}: image_column {requested!r} is not an Image column; columns: {sorted(features)}")
        return requested
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise UserError(f"{what}: no Image column among {sorted(features)}; set image_column")


def _labels(ds, requested: str, what: str) -> tuple[torch.Tensor, list[str]]:
    """Labels and class names: a ClassLabel column, an int or string column, or ``-1`` for ``"none"``."""
    import datasets

    features = ds.features
    if requested == "none":
        return torch.full((len(ds),), -1, dtype=torch.int64), []
    if requested == "auto":
        names = [n for n, f in features.items() if isinstance(f, datasets.ClassLabel)]
        names = names or [n for n in ("label", "labels") if n in features]
        if not names:
            return torch.full((len(ds),), -1, dtype=torch.int64), []
        requested = names[0]
    if requested not in features:
        raise UserError(f"{what}: label_column {requested!r} not found; columns: {sorted(features)}")
    feature, values = features[requested], ds.select_columns([requested])[:][requested]
    if isinstance(feature, datasets.ClassLabel):
        return torch.tensor(values, dtype=torch.int64), list(feature.names)
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        return torch.tensor(values, dtype=torch.int64), [str(i) for i in range(max(values, default=-1) + 1)]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        classes = sorted(set(values))
        lookup = {c: i for i, c in enumerate(classes)}
        return torch.tensor([lookup[v] for v in values], dtype=torch.int64), classes
    raise UserError(f"{what}: label_column {requested!r} has type {feature}; expected class labels, ints or strings")


def _decode_images(ds, column: str, channels: int | None, resize: int | None, resize_mode: str,
                   what: str) -> torch.Tensor:
    """Decode the Image column with ``datasets``' Image feature, chunk by chunk, into one ``(N, C, H, W)`` tensor."""
    n = len(ds)
    if n == 0:
        raise UserError(f"{what} is empty")
    ds = ds.select_columns([column])  # fetch (and decode) nothing else
    out: np.ndarray | None = None
    for start in range(0, n, _DECODE_CHUNK):
        rows = list(range(start, min(n, start + _DECODE_CHUNK)))
        for offset, image in enumerate(decode_rows(ds, column, rows, what)):
            if out is None:  # the first image fixes channels (unless given) and size
                channels = channels or (1 if image.mode in ("1", "L", "LA", "I", "I;16", "F") else 3)
                mode = "L" if channels == 1 else "RGB"
            array = to_array_checked(ds, column, start + offset, image, mode, resize, resize_mode, what)
            if out is None:
                out = np.empty((n, *array.shape[:2], channels), dtype=np.uint8)
            if array.shape[:2] != out.shape[1:3]:
                raise UserError(f"{what}: image {start + offset} is {array.shape[1]}x{array.shape[0]}, the first is "
                                f"{out.shape[2]}x{out.shape[1]}; set the resize option to store them at one size")
            out[start + offset] = array.reshape(out.shape[1:])
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)  # atomic: concurrent runs see either no file or a whole one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path) -> ImageDataset | None:
    try:
        return ImageDataset(**torch.load(path, weights_only=True))
    except Exception:  # missing, or a file from an incompatible version: decode again
        return None


def _load_hf_kind(kind: str, path: str, split: str | None = "train", config: str | None = None,
                  image_column: str = "auto", label_column: str = "auto", resize: int | None = None,
                  resize_mode: str = "center_crop", channels: int | None = None, limit: int | None = None,
                  cache: bool = True, cache_dir: str | None = None, hf_cache_dir: str | None = None,
                  storage: str = "auto") -> ImageDataset:
    ds = _open_hf(kind, path, config, split, hf_cache_dir)
    what = f"{kind} dataset {path!r}"
    column = _image_column(ds.features, image_column, what)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    content = {"config": config, "split": split, "image_column": column, "label_column": label_column,
               "resize": resize, "resize_mode": resize_mode if resize else None, "channels": channels, "limit": limit}
    # Local paths are left out of the identity so a moved folder keeps its fingerprint (content is hashed anyway).
    identity = json.dumps({"source": kind, "path": path if kind == "hf" else None, **content}, sort_keys=True)
    location = path if kind == "hf" else str(Path(path).resolve())
    key = hashlib.sha256(json.dumps([identity, location, getattr(ds, "_fingerprint", None), len(ds)]).encode())
    label = path if kind == "hf" else Path(path).name
    name = f"{label}" + (f"/{config}" if config else "") + (f":{split}" if split else "")
    cache_file = Path(cache_dir or default_cache_dir()) / f"{kind}-{key.hexdigest()[:24]}.pt"
    if storage != "memory":
        lazy = lazy_images(ds, column, channels, resize, resize_mode, what)
        if keep_lazy(lazy, storage):  # ImageNet-size: decoded per batch, never cached whole
            labels, classes = _labels(ds, label_column, what)
            return ImageDataset(lazy, labels, classes, name, compute_fingerprint(identity, lazy, labels))
    if cache and (cached := _load_cached(cache_file)) is not None:
        return cached
    labels, classes = _labels(ds, label_column, what)
    images = _decode_images(ds, column, channels, resize, resize_mode, what)
    dataset = ImageDataset(images, labels, classes, name, compute_fingerprint(identity, images, labels))
    if cache:
        _atomic_save({"images": images, "labels": labels, "classes": classes, "name": name,
                      "fingerprint": dataset.fingerprint}, cache_file)
    return dataset


def load_hf(**options: Any) -> ImageDataset:
    """Any dataset ``datasets.load_dataset(path, name=config, split=split)`` can open (hub name or script)."""
    return _load_hf_kind("hf", **options)


def load_imagefolder(**options: Any) -> ImageDataset:
    """A local folder ``<path>/<class>/<image>`` (or with ``train``/``test`` sub-folders), via ``imagefolder``."""
    return _load_hf_kind("imagefolder", **options)


def load_disk(**options: Any) -> ImageDataset:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``datasets.load_from_disk``)."""
    return _load_hf_kind("disk", **{"split": None, **options})


def load_parquet(**options: Any) -> ImageDataset:
    """Parquet file(s) (a path or glob) written by ``Dataset.to_parquet`` or any tool, as one split."""
    return _load_hf_kind("parquet", split="train", **options)


# ----------------------------------------------------------------------------------------------- Fashion-MNIST

def _fashion_mnist_from_hub(split: str, limit: int | None, hf_cache_dir: str | None) -> ImageDataset:
    return load_hf(path=FASHION_MNIST_HUB, split=split, channels=1, limit=limit, hf_cache_dir=hf_cache_dir)


def load_fashion_mnist(split: str = "train", root: str | None = None, limit: int | None = None,
                       hf_cache_dir: str | None = None) -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017): 28x28 grey images of 10 clothing classes, 60,000 train / 10,000 test.

    Read from the IDX files in ``root`` (else ``$SSLBENCH_FASHION_MNIST``, else Debian's
    ``/usr/share/datasets/fashion-mnist``); when they are absent, from the Hugging Face hub. Both ways give the
    same fingerprint for the same content, so feature caches are shared.
    """
    folder = Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_ROOT)
    prefix = "train" if split == "train" else "t10k"
    image_file = find_idx(folder, f"{prefix}-images-idx3-ubyte")
    label_file = find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if image_file and label_file:
        images = torch.from_numpy(read_idx(image_file).astype(np.uint8)).unsqueeze(1)
        labels = torch.from_numpy(read_idx(label_file).astype(np.int64))
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise UserError(f"{image_file}: {tuple(images.shape)} images do not match {tuple(labels.shape)} labels")
    else:
        try:
            hub = _fashion_mnist_from_hub(split, limit, hf_cache_dir)
        except Exception as err:
            raise UserError(f"Fashion-MNIST not found: no IDX files in {folder} (install them with `apt-get install "
                            f"dataset-fashion-mnist`, or point option root / ${FASHION_MNIST_ENV} at them) and the "
                            f"Hugging Face hub failed ({_first_line(err, 160)}; needs network access)") from err
        images, labels = hub.images, hub.labels
    images, labels = _take(images, labels, limit)
    identity = json.dumps({"source": "fashion_mnist", "split": split, "limit": limit})
    return ImageDataset(images.contiguous(), labels, list(FASHION_MNIST_CLASSES), f"fashion_mnist:{split}",
                        compute_fingerprint(identity, images, labels))


# ------------------------------------------------------------------------------------------------------ digits

def load_digits(split: str = "train", size: int = 32, test_fraction: float = 0.25, seed: int = 0,
                 limit: int | None = None) -> ImageDataset:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, values 0-16): no network, no files.

    Values are scaled to 0-255 and upsampled to ``size`` with bilinear interpolation; the train/test split is
    stratified and seeded (``train_test_split``), so it is the same on every machine.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    indices = np.arange(len(bunch.target))
    train, test = train_test_split(indices, test_size=test_fraction, stratify=bunch.target, random_state=seed)
    chosen = np.sort(train if split == "train" else test)
    pixels = torch.from_numpy(bunch.images[chosen]).float().unsqueeze(1) * (255.0 / 16.0)
    if size != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = pixels.round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(bunch.target[chosen].astype(np.int64))
    images, labels = _take(images, labels, limit)
    identity = json.dumps({"source": "digits", "split": split, "size": size, "test_fraction": test_fraction,
                           "seed": seed, "limit": limit})
    return ImageDataset(images.contiguous(), labels, [str(d) for d in range(10)], f"digits:{split}",
                        compute_fingerprint(identity, images, labels))


# ----------------------------------------------------------------------------------------------------- schemas

_LIMIT = Option(None, int, "use only the first n samples (quick runs)", min=1, nullable=True)
_HF_CACHE = Option(None, str, "Hugging Face datasets cache folder (default: datasets' own)", nullable=True)


def _hf_schema(path_doc: str, split: Option | None, config: bool = False) -> dict[str, Option]:
    schema = {"path": Option(None, str, path_doc, required=True)}
    if config:
        schema["config"] = Option(None, str, "dataset configuration name (load_dataset's `name`)", nullable=True)
    if split is not None:
        schema["split"] = split
    schema.update({
        "image_column": Option("auto", str, "column of images; auto = the first Image feature"),
        "label_column": Option("auto", str, "column of labels; auto = the first ClassLabel, none = unlabelled"),
        "resize": Option(None, int, "store images resized to this square size", min=1, nullable=True),
        "resize_mode": Option("center_crop", str, "how resize makes a square", choices=("center_crop", "squash")),
        "channels": Option(None, int, "convert to 1 (grey) or 3 (RGB) channels; default: from the first image",
                           choices=(1, 3), nullable=True),
        "limit": _LIMIT,
        "cache": Option(True, bool, "keep the decoded tensor on disk so the next run skips decoding"),
        "cache_dir": Option(None, str, f"decoded-tensor cache folder (default ${CACHE_ENV}/datasets or "
                                       "~/.cache/sslbench/datasets)", nullable=True),
        "hf_cache_dir": _HF_CACHE,
        "storage": Option("auto", str, "memory: decode all once; lazy: decode per batch in DataLoader workers; "
                                       "auto: lazy above $SSLBENCH_MEMORY_LIMIT_GB (4) decoded", choices=STORAGES),
    })
    return schema


HF_OPTIONS = _hf_schema("hub dataset name (or local dataset script/folder)",
                        Option("train", str, "split, slicing allowed (train[:10%])"), config=True)
IMAGEFOLDER_OPTIONS = _hf_schema("folder of <class>/<image> files", Option("train", str, "split"))
DISK_OPTIONS = _hf_schema("folder written by save_to_disk",
                          Option(None, str, "split of a saved DatasetDict", nullable=True))
PARQUET_OPTIONS = _hf_schema("parquet file or glob", None)
FASHION_MNIST_OPTIONS = {
    "split": Option("train", str, "split", choices=("train", "test")),
    "root": Option(None, str, f"folder of the IDX files (default ${FASHION_MNIST_ENV} or {FASHION_MNIST_ROOT})",
                   nullable=True),
    "limit": _LIMIT,
    "hf_cache_dir": _HF_CACHE,
}
DIGITS_OPTIONS = {
    "split": Option("train", str, "split", choices=("train", "test")),
    "size": Option(32, int, "image size after bilinear upsampling from 8x8", min=8),
    "test_fraction": Option(0.25, float, "fraction held out as the test split (stratified)", min=0.0,
                            min_exclusive=True, max=0.9),
    "seed": Option(0, int, "seed of the train/test split"),
    "limit": _LIMIT,
}

BUILTIN_SOURCES: dict[str, DataSource] = {source.name: source for source in [
    DataSource("hf", "Hugging Face hub dataset (datasets.load_dataset)", HF_OPTIONS, load_hf, check_hf),
    DataSource("imagefolder", "local folder of class sub-folders of images", IMAGEFOLDER_OPTIONS, load_imagefolder,
               check_local_path),
    DataSource("disk", "folder written by datasets' save_to_disk", DISK_OPTIONS, load_disk, check_local_path),
    DataSource("parquet", "parquet file(s) with an image column", PARQUET_OPTIONS, load_parquet, check_parquet),
    DataSource("fashion_mnist", "Fashion-MNIST 28x28 grey, 10 classes (Debian IDX files or the hub)",
               FASHION_MNIST_OPTIONS, load_fashion_mnist, check_fashion_mnist),
    DataSource("digits", "scikit-learn's 8x8 digits, upsampled; embedded, no download", DIGITS_OPTIONS,
               load_digits),
]}
