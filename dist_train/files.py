"""Writing files so that a crash or a full disk never leaves a truncated file at the final path.

Every output of a run (model.pt, summary.json, config.yaml, run.json, checkpoint metadata) goes through
`atomic_write`: the bytes go to a hidden temporary file in the same directory, are fsynced, and only then
renamed over the final name. A reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, IO, Iterator, Union


def atomic_write(path: Union[str, Path], data: Union[str, bytes, Callable[[IO[bytes]], None]]) -> None:
    """Write `data` (text, bytes, or a function that writes into a binary file) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def write_synced(path: Union[str, Path], text: str) -> None:
    """Write a new file inside a directory that is itself renamed into place later (a checkpoint's .tmp)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Union[str, Path]) -> None:
    """Make a rename inside `path` durable (a COMPLETE marker must not outlive the files it vouches for)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Union[str, Path]) -> None:
    """fsync every file and folder under `path`: the files a library wrote without syncing them (DeepSpeed's
    torch.save) are on disk before a COMPLETE marker vouches for them. Files already synced cost little."""
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            except OSError:
                continue  # another rank's file that is being renamed; that rank syncs its own
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock: shared by the processes of one node, released by the kernel if the holder dies."""
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
