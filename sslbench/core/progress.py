"""Progress bars on the main process only, switched off by ``--no-progress`` (``SSLBENCH_PROGRESS=0``)."""

from __future__ import annotations

import os


def progress_enabled() -> bool:
    return os.environ.get("SSLBENCH_PROGRESS", "1") != "0"


def progress_bar(enabled: bool = True, **kwargs):
    """A tqdm bar, or a disabled one when progress is off or ``enabled`` is False (other processes)."""
    from tqdm.auto import tqdm

    return tqdm(disable=not (enabled and progress_enabled()), dynamic_ncols=True, **kwargs)
