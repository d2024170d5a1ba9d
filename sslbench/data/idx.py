"""The IDX file format (LeCun et al.'s MNIST format, also Fashion-MNIST's) and where Fashion-MNIST's files are
looked for: read by :mod:`sslbench.data.sources` and checked by :mod:`sslbench.data.source_checks`."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from sslbench.core.errors import UserError

__all__ = ["read_idx", "find_idx", "FASHION_MNIST_ROOT", "FASHION_MNIST_ENV", "FASHION_MNIST_HUB"]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian/Ubuntu package `dataset-fashion-mnist`
FASHION_MNIST_ENV = "SSLBENCH_FASHION_MNIST"
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"


# IDX type codes (http://yann.lecun.com/exdb/mnist/): the third magic byte; data is big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): magic ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 dims, data."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise UserError(f"{path}: IDX dims {dims} need {count * dtype.itemsize} bytes, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype, count, header).reshape(dims).astype(dtype.newbyteorder("="))


def find_idx(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None
