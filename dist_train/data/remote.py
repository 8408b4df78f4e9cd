"""Opening one shard: local paths, `pipe:` commands, http(s):// URLs, and the node-local download cache.

A remote shard (http(s)://, pipe:) is checked against the manifest's sha256 before anything decoded
from it is used: with `data.cache_dir`, the download is hashed and only a matching file enters the
cache (one download per shard per node, under a file lock every rank and worker of the node shares);
without a cache, the stream is hashed as it is read and the decoder publishes nothing until the hash
matched. A mismatch is retried once, then fails naming the shard. Local files are trusted as they are
(`dist-train data inspect` checks them), so a damaged record there is reported, or skipped, by record.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

from ..files import file_lock
from .shards import DataError, ShardEntry, open_failure

log = logging.getLogger(__name__)

HTTP_TIMEOUT_SECONDS = 60.0


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "pipe:"))


class CountingReader(io.RawIOBase):
    """Counts (and optionally hashes) the bytes read through it: the loader reports bytes read per epoch."""

    def __init__(self, stream: BinaryIO, hashing: bool) -> None:
        self.stream = stream
        self.bytes_read = 0
        self.sha256 = hashlib.sha256() if hashing else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.bytes_read += n
        if self.sha256 is not None:
            self.sha256.update(data)
        return n

    def drain(self) -> None:
        """Read to the end: tar readers stop at the end-of-archive block, the hash needs the padding after it."""
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            super().close()


def _open_url(url: str, shard_name: str) -> BinaryIO:
    try:
        if url.startswith(("http://", "https://")):
            return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS)  # noqa: S310 - the user's own shard URL
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - a missing file, a refused connection, a bad scheme: one error naming the shard
        raise open_failure(shard_name, url, e) from None


def sha_mismatch(entry: ShardEntry, url: str, digest: str, size: int) -> str:
    return (
        f"shard {entry.name} ({url}): its bytes have sha256 {digest[:12]}... ({size} bytes), the manifest says "
        f"{entry.sha256[:12]}... ({entry.bytes} bytes); the shard was changed after its manifest was written (`dist-train data prepare` or `data index`) or damaged in transit"
    )


@dataclass(frozen=True)
class ShardCache:
    """`data.cache_dir`: verified copies of remote shards, one per (sha256, name), evicted least recently used first."""

    directory: Path
    max_bytes: int

    def open(self, url: str, entry: ShardEntry) -> tuple[BinaryIO, int]:
        """An open verified copy of the shard, and the bytes this call downloaded (0 on a hit)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{entry.sha256[:16]}-{entry.name}"
        with file_lock(path.with_name(path.name + ".lock")):
            downloaded = 0
            if not (path.is_file() and path.stat().st_size == entry.bytes):
                downloaded = self._download(url, entry, path)
                self._evict(keep=path)
            else:
                os.utime(path)  # recently used: evicted last
            # Opened under the lock: an eviction by another process may unlink it now, the open file stays readable.
            return open(path, "rb"), downloaded

    def _download(self, url: str, entry: ShardEntry, path: Path) -> int:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        total = 0
        for attempt in (1, 2):
            reader = CountingReader(_open_url(url, entry.name), hashing=True)
            try:
                with open(tmp, "wb") as out:
                    for block in iter(lambda: reader.read(1 << 20), b""):
                        out.write(block)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise DataError(f"shard {entry.name} cannot be downloaded ({url}) into data.cache_dir={self.directory}: {e}") from None
            finally:
                reader.close()
            total += reader.bytes_read
            assert reader.sha256 is not None
            digest = reader.sha256.hexdigest()
            if digest == entry.sha256 and reader.bytes_read == entry.bytes:
                tmp.rename(path)
                return total
            tmp.unlink(missing_ok=True)
            problem = sha_mismatch(entry, url, digest, reader.bytes_read)
            if attempt == 1:
                log.warning("%s; downloading it once more", problem)
        raise DataError(f"{problem} (downloaded twice); refusing to use it")

    def _evict(self, keep: Path) -> None:
        shards = [p for p in self.directory.iterdir() if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".lock") and p != keep]
        total = keep.stat().st_size + sum(p.stat().st_size for p in shards)
        for victim in sorted(shards, key=lambda p: p.stat().st_mtime):
            if total <= self.max_bytes:
                break
            with open(victim.with_name(victim.name + ".lock"), "a+b") as lock:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being fetched or opened right now
                total -= victim.stat().st_size
                victim.unlink()
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def open_shard(url: str, entry: ShardEntry, cache: Optional[ShardCache]) -> CountingReader:
    """A byte stream of the whole shard; `.sha256` is set when the caller must check it after reading."""
    if cache is not None and is_remote(url):
        stream, _ = cache.open(url, entry)
        return CountingReader(stream, hashing=False)
    return CountingReader(_open_url(url, entry.name), hashing=is_remote(url))
