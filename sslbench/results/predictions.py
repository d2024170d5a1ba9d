"""Per-sample records of a run's results: ``predictions.npz`` beside its ``metrics.csv``.

An interval over test samples and a paired test between two runs both need to know *which* test samples a run got
right, not only how many. Every result an evaluator can decompose (a :class:`~sslbench.core.evaluator.PerSample`)
is kept here, keyed like its row in ``metrics.csv`` (stage, evaluator, metric, variant), together with the test
labels once per run and their fingerprint — two runs are compared sample by sample only when their fingerprints
match, i.e. on the same test images in the same order.

The file is small enough to commit for reference runs: 0/1 scores are bit-packed (10,000 test images: 1.25 KB per
result, less compressed), shares of splits (k of 3) take one byte each, cluster ids two. It holds only arrays and
one JSON index, read with ``allow_pickle=False``: opening a foreign file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from sslbench.core.errors import UserError
from sslbench.core.evaluator import PerSample
from sslbench.core.io import atomic_write_bytes, file_lock

__all__ = ["FILENAME", "RunPredictions", "labels_fingerprint", "write_predictions", "read_predictions"]

FILENAME = "predictions.npz"
_KEY = ("stage", "evaluator", "metric", "variant")


def labels_fingerprint(labels) -> str:
    """A short hash of the test labels (their number and order): equal fingerprints ⇒ comparable per-sample."""
    array = np.ascontiguousarray(np.asarray(labels, dtype=np.int64))
    return hashlib.sha256(array.tobytes()).hexdigest()[:16] + f"-{len(array)}"


@dataclass
class RunPredictions:
    """One run's per-sample records: ``records[(stage, evaluator, metric, variant)] -> PerSample``."""

    labels: np.ndarray
    fingerprint: str
    records: dict[tuple[str, str, str, str], PerSample]


def _encode(record: PerSample) -> tuple[str, np.ndarray]:
    values = np.asarray(record.values)
    if record.kind == "partition":
        return "int16", values.astype(np.int16)
    as_float = values.astype(np.float64)
    if np.isin(as_float, (0.0, 1.0)).all():
        return "bits", np.packbits(as_float.astype(bool))
    for denominator in range(2, 256):       # shares of splits (k/3): one byte each, decoded exactly as k/3
        numerators = np.rint(as_float * denominator)
        if (numerators / denominator == as_float).all():
            return f"fraction/{denominator}", numerators.astype(np.uint8)
    return "float64", as_float


def _decode(encoding: str, data: np.ndarray, n: int) -> np.ndarray:
    if encoding == "bits":
        return np.unpackbits(data, count=n).astype(bool)
    if encoding.startswith("fraction/"):
        return data.astype(np.float64) / int(encoding.split("/", 1)[1])
    return data.astype(np.int64 if encoding == "int16" else np.float64)


def write_predictions(run_dir: str | os.PathLike, records: Iterable[tuple[Mapping, PerSample]], labels) -> Path | None:
    """Add ``records`` (each a row dict with the ``metrics.csv`` key columns and its :class:`PerSample`) to
    ``run_dir/predictions.npz``, replacing records with the same key; atomic, under a lock. Records made on other
    test labels than the file's replace the whole file (the test set of a run does not change). Returns the path,
    or ``None`` when there was nothing to write."""
    labels = np.asarray(labels, dtype=np.int64)
    new = {tuple(str(row[k]) for k in _KEY): record for row, record in records}
    if not new:
        return None
    for key, record in new.items():
        if len(np.asarray(record.values)) != len(labels):
            raise ValueError(f"per-sample record {key}: {len(np.asarray(record.values))} values for "
                             f"{len(labels)} test labels")
    path = Path(run_dir) / FILENAME
    with file_lock(path.with_name(path.name + ".lock")):
        merged = dict(new)
        if path.exists():
            old = read_predictions(path)
            if old.fingerprint == labels_fingerprint(labels):
                merged = {**old.records, **new}
        arrays: dict[str, np.ndarray] = {"labels": labels.astype(np.int32)}
        index = []
        for i, (key, record) in enumerate(merged.items()):
            encoding, data = _encode(record)
            arrays[f"r{i}"] = data
            index.append({**dict(zip(_KEY, key)), "kind": record.kind, "encoding": encoding, "array": f"r{i}"})
        arrays["index"] = np.array(json.dumps({"fingerprint": labels_fingerprint(labels), "records": index}))
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
    return path


def read_predictions(path: str | os.PathLike) -> RunPredictions:
    """A ``predictions.npz`` written by :func:`write_predictions`; anything else is a one-line error naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            labels = data["labels"].astype(np.int64)
            meta = json.loads(str(data["index"]))
            records = {}
            for entry in meta["records"]:
                values = _decode(entry["encoding"], data[entry["array"]], len(labels))
                records[tuple(entry[k] for k in _KEY)] = PerSample(entry["kind"], values)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: not a readable sslbench predictions file ({type(exc).__name__}: {exc})") from None
    return RunPredictions(labels, meta["fingerprint"], records)
