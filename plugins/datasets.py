"""Built-in data sources: Hugging Face datasets (hub, imagefolder, save_to_disk folders, parquet), Fashion-MNIST
(Debian's IDX files or the hub) and scikit-learn's bundled digits (no network, no apt: the quickstart's data)."""

from __future__ import annotations

import sslbench
from sslbench.data.sources import BUILTIN_SOURCES


@sslbench.hookimpl
def register_datasets(register):
    for name, source in BUILTIN_SOURCES.items():
        register(name, source)
