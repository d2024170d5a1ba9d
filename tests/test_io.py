"""Atomic writes: a failure mid-write keeps the old file and leaves no temp files; concurrent writers never tear."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from sslbench.core.io import (
    atomic_directory,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_text,
    file_lock,
    remove_stale_temp_files,
)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_text_bytes_round_trip_and_replace(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"  # parent is created on demand
    atomic_write_text(target, "first")
    atomic_write_text(target, "second ü")
    assert target.read_text(encoding="utf-8") == "second ü"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01\xff"
    assert _names(tmp_path / "sub") == ["a.txt"]
    # mkstemp makes 0600 files; the result must get ordinary permissions (umask-respecting), like open() would.
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_exception_mid_write_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.arange(3)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom while serialising")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"w": torch.zeros(1000), "bad": Unpicklable()}, target)
    assert torch.equal(torch.load(target)["w"], torch.arange(3))
    assert _names(tmp_path) == ["model.pt"]


def test_keyboard_interrupt_mid_write_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "m.csv"
    atomic_write_csv(pd.DataFrame({"a": [1, 2]}), target)

    class Interrupting(pd.DataFrame):
        def to_csv(self, *args, **kwargs):  # simulates Ctrl-C while the data is being produced
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_csv(Interrupting({"a": [9]}), target)
    assert pd.read_csv(target)["a"].tolist() == [1, 2]
    assert _names(tmp_path) == ["m.csv"]


def test_csv_has_no_index_column(tmp_path: Path) -> None:
    df = pd.DataFrame({"x": [1.5, 2.5], "y": ["a", "b"]})
    atomic_write_csv(df, tmp_path / "d.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "d.csv"), df)


def test_atomic_directory_success_replace_and_failure(tmp_path: Path) -> None:
    final = tmp_path / "cache"
    with atomic_directory(final) as tmp:
        assert tmp.name == f".tmp-cache-{os.getpid()}" and tmp.parent == tmp_path
        (tmp / "a.txt").write_text("v1")
        assert not final.exists()  # nothing visible until the block ends
    assert (final / "a.txt").read_text() == "v1"

    with pytest.raises(ValueError):
        with atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text("half-written")
            raise ValueError("fail")
    assert (final / "a.txt").read_text() == "v1"
    assert _names(tmp_path) == ["cache"]

    with atomic_directory(final) as tmp:
        (tmp / "b.txt").write_text("v2")
    assert _names(final) == ["b.txt"]  # replaced as a whole, not merged
    assert _names(tmp_path) == ["cache"]


# --- concurrency: real processes --------------------------------------------------------------------------------

def _writer(path: str, letter: str, rounds: int) -> None:
    # Large enough (1 MB) that a non-atomic write would be observable half-done by the reader.
    payload = letter * (1 << 20)
    for _ in range(rounds):
        atomic_write_text(path, payload)


def _locked_increment(path: str, rounds: int) -> None:
    for _ in range(rounds):
        with file_lock(path + ".lock"):
            value = int(Path(path).read_text())
            atomic_write_text(path, str(value + 1))


def _fork_context() -> multiprocessing.context.BaseContext:
    # fork keeps the test fast (no re-import of torch in the children); these children only do file I/O.
    return multiprocessing.get_context("fork")


def test_concurrent_writers_never_tear(tmp_path: Path) -> None:
    target = tmp_path / "shared.txt"
    atomic_write_text(target, "a" * (1 << 20))
    ctx = _fork_context()
    procs = [ctx.Process(target=_writer, args=(str(target), letter, 15)) for letter in "ab"]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs):
        text = target.read_text()
        assert len(text) == 1 << 20 and len(set(text)) == 1, "torn file observed"
        reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert reads > 0
    assert set(target.read_text()) <= {"a", "b"}
    assert _names(tmp_path) == ["shared.txt"]


def test_file_lock_serialises_read_modify_write(tmp_path: Path) -> None:
    counter = tmp_path / "counter.txt"
    atomic_write_text(counter, "0")
    ctx = _fork_context()
    procs = [ctx.Process(target=_locked_increment, args=(str(counter), 40)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    # Without the lock, interleaved read-modify-write cycles would lose increments.
    assert int(counter.read_text()) == 80


def _hold_lock(lock: str, ready: str, seconds: float) -> None:
    with file_lock(lock):
        Path(ready).write_text("held")
        time.sleep(seconds)
        Path(ready).write_text("releasing")


def test_file_lock_says_when_it_waits_and_then_gets_the_lock(tmp_path: Path) -> None:
    lock, ready = tmp_path / "x.lock", tmp_path / "ready"
    waits: list[float] = []
    with file_lock(lock, on_wait=lambda: waits.append(time.monotonic())):
        pass
    assert waits == []                                  # a free lock: no message
    holder = _fork_context().Process(target=_hold_lock, args=(str(lock), str(ready), 0.5))
    holder.start()
    while not ready.exists():
        time.sleep(0.01)
    with file_lock(lock, on_wait=lambda: waits.append(time.monotonic())):
        assert ready.read_text() == "releasing"         # acquired only after the holder let go
    holder.join()
    assert holder.exitcode == 0 and len(waits) == 1     # told once, before blocking


def test_stale_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    """A writer killed mid-save leaves ``.tmp-<name>-<random>-<pid>``; a later run removes it, but never the
    temporary file of a process that is still writing."""
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    stale = tmp_path / f".tmp-last.pt-abc123-{dead.pid}"
    stale.write_bytes(b"")
    stale_dir = tmp_path / f".tmp-run-{dead.pid}"
    stale_dir.mkdir()
    live = tmp_path / f".tmp-metrics.csv-xyz-{os.getppid()}"
    live.write_bytes(b"partial")
    keep = tmp_path / "last.pt"
    keep.write_bytes(b"checkpoint")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted([stale, stale_dir])
    assert _names(tmp_path) == sorted([live.name, keep.name])
