"""Quick checks of the data sources, run before the model is built (``DataSource.check``): a missing folder or an
unreachable Hub dataset is then reported in a second, not after building a ViT-L and waiting for the hub client's
retries. Each raises a one-line :class:`~sslbench.core.errors.UserError` naming the recipe key."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from sslbench.core.errors import UserError
from sslbench.data.hub import LOCAL_ALTERNATIVE, check_hub_dataset, hub_offline
from sslbench.data.idx import FASHION_MNIST_ENV, FASHION_MNIST_HUB, FASHION_MNIST_ROOT, find_idx

__all__ = ["check_hf", "check_local_path", "check_parquet", "check_fashion_mnist"]


def check_hf(key: str, path: str, config: str | None = None, hf_cache_dir: str | None = None, **_: Any) -> None:
    if not hub_offline():
        check_hub_dataset(path, key)
        return
    import datasets   # offline: the dataset must be in the Hugging Face cache; its builder says so without loading

    if not Path(path).exists():
        try:
            datasets.load_dataset_builder(path, name=config, cache_dir=hf_cache_dir)
        except Exception as err:  # noqa: BLE001 - any failure means the load would fail the same way
            raise UserError(f"{key}: Hugging Face dataset {path!r} is not in the Hugging Face cache and "
                            f"HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set ({_first_line(err)}): unset it to "
                            f"download, or {LOCAL_ALTERNATIVE}") from None


def check_local_path(key: str, path: str, **_: Any) -> None:
    if not Path(path).exists():
        raise UserError(f"{key}.path: no such file or folder: {path} (from {Path.cwd()})")


def check_parquet(key: str, path: str, **_: Any) -> None:
    if not glob.glob(path):
        raise UserError(f"{key}.path: no parquet file matches {path} (from {Path.cwd()})")


def check_fashion_mnist(key: str, root: str | None = None, **_: Any) -> None:
    folder = Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_ROOT)
    if not find_idx(folder, "train-images-idx3-ubyte"):
        try:
            check_hub_dataset(FASHION_MNIST_HUB, key)
        except UserError as err:
            raise UserError(f"{key}: Fashion-MNIST: no IDX files in {folder} (install them with `apt-get install "
                            f"dataset-fashion-mnist`, or point option root / ${FASHION_MNIST_ENV} at them), and "
                            f"the hub fallback failed: {err}") from None


def _first_line(err: BaseException, limit: int = 120) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
