"""Helpers of the hostile-input suite: run a command in-process and check the promises every refusal keeps."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


class Payload:
    """Unpickling this runs a shell command that creates the marker file — what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_file(path: Path, marker: Path, content: dict) -> Path:
    """A torch file holding ``content`` (real tensors in the expected layout) plus a code-running payload."""
    torch.save({**content, "payload": Payload(marker)}, path)
    assert b"system" in path.read_bytes(), "the payload must be in the file"
    return path


def prove_payload_works(path: Path, marker: Path) -> None:
    """The corpus is only meaningful if its files really run code when unpickled without restriction."""
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

