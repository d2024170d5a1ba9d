"""Atomic file writes and advisory file locks — every file sslbench writes goes through here.

A run can be killed at any moment (Ctrl-C, a pre-empted GPU node, an out-of-memory kill), and several runs may
write to the same ``results/`` tree at once. So a file is never written in place: the bytes go to a temporary file
*in the same directory* (so the final rename never crosses a file system), are flushed and fsync'ed, and only then
``os.replace`` swaps it in. ``os.replace`` is atomic on POSIX: a reader sees either the complete old file or the
complete new one, never a torn mixture. On an exception the temporary file is removed and the old file is untouched.

Read-modify-write sequences (the leaderboard, a run's ``metrics.csv``) additionally hold :func:`file_lock`, so two
writers cannot both read the old contents and silently drop each other's rows.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
    >>> atomic_write_text(path, "hello")
    >>> path.read_text()
    'hello'
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_torch_save",
    "atomic_write_csv",
    "atomic_directory",
    "file_lock",
    "remove_stale_temp_files",
]


def _fsync_directory(directory: Path) -> None:
    """Persist a rename: the directory entry must reach the disk too, or a power cut can lose the new name."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening a directory; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_binary_file(path: str | os.PathLike) -> Iterator[io.BufferedWriter]:
    """Yield a binary file object whose contents replace ``path`` atomically when the block exits cleanly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name starts with a dot and carries the final name, so a crash leaves an obviously stale, hidden file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", suffix=f"-{os.getpid()}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates files with mode 0600; give the result the usual permissions of a newly created file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``)."""
    with _atomic_binary_file(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically — a checkpoint is either the old one or the complete new one."""
    import torch  # imported lazily: the CSV/leaderboard paths should not pay for importing torch

    with _atomic_binary_file(path) as handle:
        torch.save(obj, handle)


def atomic_write_csv(df: "pd.DataFrame", path: str | os.PathLike, **to_csv_kwargs: Any) -> None:
    """``df.to_csv(path, index=False)``, atomically. Extra keyword arguments go to ``DataFrame.to_csv``."""
    to_csv_kwargs.setdefault("index", False)
    atomic_write_text(path, df.to_csv(**to_csv_kwargs))


@contextlib.contextmanager
def atomic_directory(final_path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a sibling temp dir ``.tmp-<name>-<pid>`` and rename it to ``final_path`` at the end.

    Yields the temporary directory to fill. On an exception it is removed and ``final_path`` is left as it was.
    If ``final_path`` already exists it is replaced: the old directory is first renamed aside (atomic), the new one
    renamed in (atomic), then the old one deleted — so at every moment one complete version exists on disk.

        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_directory(root / "run") as tmp:
        ...     _ = (tmp / "a.txt").write_text("1")
        >>> sorted(p.name for p in root.iterdir())
        ['run']
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_path.parent / f".tmp-{final_path.name}-{os.getpid()}"
    if tmp_dir.exists():  # left over by a crashed process that had our pid; it is ours to reclaim
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    try:
        yield tmp_dir
        if final_path.exists():
            old_dir = final_path.parent / f".old-{final_path.name}-{os.getpid()}"
            if old_dir.exists():
                shutil.rmtree(old_dir)
            os.replace(final_path, old_dir)
            os.replace(tmp_dir, final_path)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(tmp_dir, final_path)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _fsync_directory(final_path.parent)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, shared: bool = False,
              on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an advisory ``fcntl.flock`` on ``path`` (created if missing) for the duration of the block.

    Lock a dedicated lock file (e.g. ``leaderboard.csv.lock``), not the file being replaced: ``os.replace`` swaps
    the inode, so a lock on the data file itself would not exclude a writer that opened the new inode.
    ``shared=True`` takes a read lock. Advisory: it only excludes other code that also calls :func:`file_lock`.
    ``on_wait`` is called once, before blocking, if another process holds the lock (to tell the user why nothing
    happens). The operating system releases the lock when its holder exits, even by SIGKILL.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, mode)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp-*`` files and folders that killed writers left in ``directory`` (not recursive).

    Every temporary name ends with its writer's pid (``.tmp-<name>-<random>-<pid>``, ``.tmp-<name>-<pid>``); one
    whose process no longer exists was abandoned mid-write (``kill -9`` during a checkpoint save) and is removed.
    Files of live processes are left alone, so this is safe while other runs write beside us. Returns what was
    removed.
    """
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        if not path.name.startswith((".tmp-", ".old-")):
            continue
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed
