"""Helpers of the hostile-input suite: run a command in-process and check the promises every refusal keeps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sslbench.cli import main


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def refused(capsys):
    """``refused(argv, *expected)``: the command exits 2 with exactly one ``error:`` line on stderr that contains
    every ``expected`` text, and raises no exception (an escaped exception would be a traceback)."""

    def check(argv: list[str], *expected: str) -> str:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, f"exit {code}, stderr: {err}"
        assert len(err) == 1 and err[0].startswith("error: "), err
        for text in expected:
            assert text in err[0], f"{text!r} not in {err[0]!r}"
        return err[0]

    return check


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

