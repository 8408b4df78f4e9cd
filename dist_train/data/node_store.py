"""Decoded shards shared by every rank and DataLoader worker of one node: each record decoded once per node.

The global order (streaming.py) draws each rank's micro-batches from shuffle windows that span the whole
stream, so every rank and worker needs samples from nearly every shard. Rather than each of them reading
and decoding what it draws from (world_size x num_workers reads of the split per epoch), the first process
of the node that needs a shard decodes all of it (from the pass's start on) into a folder of .npy files,
under a lock file, and publishes it with one rename; every other process maps those files read-only and
copies out only its own rows. The folder of one pass (an epoch from a start position) lives in /dev/shm
(or `data.cache_dir`) and holds only the shards some process of the node still needs: each process knows,
from the global order alone, which shards every consumer of its node (rank x worker) touches, and the last
consumer to finish with a shard deletes it. So a node holds a few shards decoded at a time, whatever the
world size, and a worker holds only its micro-batches.

Bad samples (records that fail to decode, labels outside the classes, non-finite inputs) are decided
here, once per node, and stored beside the arrays: every process sees the same verdict.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..config import BatchArithmetic
from ..distributed.environment import DistEnv
from .remote import ShardCache, file_lock, open_shard, sha_mismatch
from .shards import DataError, Manifest, bad_sample_reasons, close_shard_stream


def node_scratch(cache_dir: Optional[str], room_needed: int) -> Path:
    """Where this rank would keep its node's decoded shards: data.cache_dir if set, else shared memory if it has
    `room_needed` bytes free (containers often mount a 64 MB /dev/shm), else the temp folder. The node uses its
    first rank's answer (streaming.job_token_and_scratch), so the node's ranks cannot disagree."""
    if cache_dir:
        return Path(cache_dir) / "decoded"
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= room_needed:
        return shm
    return Path(tempfile.gettempdir())


def node_ranks(dist_env: DistEnv) -> tuple[int, ...]:
    """Ranks sharing this node's decoded shards: launchers number a node's ranks contiguously."""
    first = dist_env.global_rank - dist_env.local_rank
    if first != dist_env.node_rank * dist_env.local_world_size or first + dist_env.local_world_size > dist_env.world_size:
        return (dist_env.global_rank,)  # numbered otherwise (srun --distribution=cyclic): this rank keeps its own store
    return tuple(range(first, first + dist_env.local_world_size))


def decoded_shard_bytes(manifest: Manifest) -> int:
    """The largest shard's inputs as the store holds them (uint8 images, float32 vectors)."""
    per_sample = int(np.prod(manifest.shape)) * (1 if manifest.kind == "image" else 4)
    return max(s.count for s in manifest.shards) * per_sample


@dataclass(frozen=True)
class PassPlan:
    """One pass over an epoch from `start_step`, as every process of a node computes it (picklable for workers)."""

    manifest: Manifest
    urls: tuple[str, ...]
    cache: Optional[ShardCache]
    shard_order: tuple[int, ...]  # manifest indices in the epoch's stream order
    window: int
    start_step: int
    steps: int
    arithmetic: BatchArithmetic
    node_ranks: tuple[int, ...]  # global ranks that share `directory`
    workers_per_rank: int  # consumers per rank: DataLoader workers, or the rank itself
    directory: Path
    bundle: int  # consecutive micro-batches a worker builds and sends together
    starts: tuple[int, ...] = field(init=False)  # stream position of each shard (stream order), then the total

    def __post_init__(self) -> None:
        counts = [self.manifest.shards[i].count for i in self.shard_order]
        object.__setattr__(self, "starts", tuple(np.cumsum([0, *counts]).tolist()))

    @property
    def num_samples(self) -> int:
        return self.starts[-1]

    @property
    def first_stream_position(self) -> int:
        """Samples before the window holding the pass's first position are never needed."""
        return (self.start_step * self.arithmetic.global_batch_size // self.window) * self.window

    def micro_batch_starts(self, rank: int) -> list[int]:
        a = self.arithmetic
        per_rank = a.global_batch_size // a.world_size
        return [
            step * a.global_batch_size + rank * per_rank + m * a.micro_batch_size
            for step in range(self.start_step, self.steps)
            for m in range(a.grad_accum_steps)
        ]

    def worker_of(self, index: int) -> int:
        """The consumer (DataLoader worker) of a rank that builds its micro-batch `index`."""
        return (index // self.bundle) % self.workers_per_rank

    def shard_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.starts), positions, side="right") - 1

    def consumer_uses(self, rank: int, worker: int) -> dict[int, int]:
        """Shard -> index (among the rank's micro-batches) of the last micro-batch this consumer builds from it.

        A micro-batch at positions [start, start + micro) draws from the windows overlapping them, and so
        may touch any shard overlapping those windows' stream ranges: all of them count as used.
        """
        size, micro = self.window, self.arithmetic.micro_batch_size
        starts = np.asarray(self.micro_batch_starts(rank), dtype=np.int64)
        indices = np.flatnonzero((np.arange(len(starts)) // self.bundle) % self.workers_per_rank == worker)
        lo = (starts[indices] // size) * size
        hi = np.minimum(((starts[indices] + micro - 1) // size + 1) * size, self.num_samples)
        last: dict[int, int] = {}
        for index, first_shard, last_shard in zip(indices.tolist(), self.shard_of(lo).tolist(), self.shard_of(hi - 1).tolist()):
            for shard in range(first_shard, last_shard + 1):
                last[shard] = index
        return last

    def consumers_per_shard(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for rank in self.node_ranks:
            for worker in range(self.workers_per_rank):
                for shard in self.consumer_uses(rank, worker):
                    counts[shard] = counts.get(shard, 0) + 1
        return counts


@dataclass
class DecodedShard:
    offset: int  # stream position of row 0
    inputs: np.ndarray  # memory-mapped
    targets: np.ndarray
    keys: list[str]
    bad: np.ndarray
    reasons: dict[int, str]  # row -> why it must not reach the model


DECODE_AHEAD = 2  # shards a consumer may decode for later while it waits: bounds what the store holds beyond the window


class SharedShards:
    """One process's handle on a pass folder: get a decoded shard (decoding it if nobody has), release it when done."""

    def __init__(self, plan: PassPlan, consumers: dict[int, int]) -> None:
        self.plan, self.consumers = plan, consumers
        self.held: dict[int, DecodedShard] = {}
        self.decoded_records = 0  # by this process: the loader sums them to show each record is decoded once per node
        self.bytes_read = 0
        self.reported = (0, 0)

    def new_counts(self) -> tuple[int, int]:
        """Records decoded and bytes read since the last call (what a worker reports with each item)."""
        last, self.reported = self.reported, (self.decoded_records, self.bytes_read)
        return self.decoded_records - last[0], self.bytes_read - last[1]

    def _paths(self, shard: int) -> tuple[Path, Path, Path]:
        d = self.plan.directory
        return d / f"shard-{shard}", d / f"shard-{shard}.lock", d / f"shard-{shard}.done"

    def get(self, shard: int, ahead: Callable[[], Sequence[int]] = tuple) -> DecodedShard:
        """`ahead()`: the shards this consumer needs next. While another process decodes `shard`, this one
        decodes one of those that nobody has started instead of waiting: the node's consumers need the shards
        in nearly the same order, so without this they take turns decoding one shard at a time (what costs
        with webdataset shards of images, ~100 us a PNG: benchmarks/bench_loader.py)."""
        if shard not in self.held:
            final, lock, _ = self._paths(shard)
            if not self._decoded_unless_busy(shard):
                for candidate in ahead()[:DECODE_AHEAD]:
                    self._decoded_unless_busy(candidate)
                    if (final / "meta.json").is_file():
                        break
            with file_lock(lock):  # another process is decoding it: wait for it
                if not (final / "meta.json").is_file():
                    self._decode(shard, final)
            self.held[shard] = _load(final)
        return self.held[shard]

    def _decoded_unless_busy(self, shard: int) -> bool:
        """Decode `shard` if it is not decoded and nobody is decoding it; False only if somebody is."""
        final, lock, _ = self._paths(shard)
        if (final / "meta.json").is_file():
            return True
        with open(lock, "a+b") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                if not (final / "meta.json").is_file():
                    self._decode(shard, final)
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return True

    def release(self, shard: int) -> None:
        """This consumer is done with `shard`; the node's last consumer deletes it."""
        self.held.pop(shard, None)
        final, lock, done = self._paths(shard)
        try:
            with file_lock(lock):
                with open(done, "ab") as f:
                    f.write(b".")
                    finished = f.tell()
                if finished >= self.consumers.get(shard, 0):
                    shutil.rmtree(final, ignore_errors=True)
        except FileNotFoundError:
            pass  # the pass is over on every rank of the node (abandoned early; leave_pass removed its folder)

    def _decode(self, shard: int, final: Path) -> None:
        for attempt in (1, 2):
            problem = self._decode_once(shard, final)
            if problem is None:
                return
            if attempt == 2:
                raise DataError(f"{problem} (read twice); refusing to use it")

    def _decode_once(self, shard: int, final: Path) -> Optional[str]:
        """Decode into a hidden folder, publish it with a rename; a sha256 mismatch of a remote stream is returned."""
        plan, manifest = self.plan, self.plan.manifest
        entry, url = manifest.shards[plan.shard_order[shard]], plan.urls[plan.shard_order[shard]]
        counts = manifest.records_in(entry)
        shard_start = plan.starts[shard]
        first_record = max(0, plan.first_stream_position - shard_start) // manifest.samples_per_record
        skipped = first_record * manifest.samples_per_record
        rows = entry.count - skipped
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()  # never parents=True: a worker still running after its pass ended must not recreate the folder
        try:
            return self._fill(tmp, final, entry, url, counts, first_record, shard_start + skipped, rows)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _fill(self, tmp: Path, final: Path, entry, url: str, counts: list[int], first_record: int, offset: int, rows: int) -> Optional[str]:
        manifest = self.plan.manifest
        input_dtype = np.dtype(np.uint8 if manifest.kind == "image" else np.float32)
        # Written as a plain .npy file, record after record: write() copies into tmpfs faster than page faults on a mapping.
        inputs = open(tmp / "inputs.npy", "wb")
        np.lib.format.write_array_header_1_0(inputs, {"descr": np.lib.format.dtype_to_descr(input_dtype), "fortran_order": False, "shape": (rows, *manifest.shape)})
        sample_bytes = input_dtype.itemsize * int(np.prod(manifest.shape))
        targets: list[Optional[np.ndarray]] = []
        keys: list[str] = []
        reasons: dict[int, str] = {}
        stream = open_shard(url, entry, self.plan.cache)
        finished = False
        try:
            row = 0
            for index, raw in manifest.read_records(url, entry, first_record, stream):
                count = counts[index]
                self.decoded_records += 1
                try:
                    record = manifest.decode(raw, count)
                except Exception as e:  # noqa: BLE001 - any decode failure: every sample of the record is bad
                    record_keys = keys_or_placeholders(raw, count)
                    why = f"shard {entry.name} record {raw['__key__']} fails to decode: {type(e).__name__}: {e}"
                    reasons.update((row + i, why) for i in range(count))
                    targets.append(None)
                    inputs.write(bytes(count * sample_bytes))
                else:
                    inputs.write(np.ascontiguousarray(record.inputs).data)
                    targets.append(record.targets)
                    record_keys = [str(k) for k in record.keys]
                    for i, why in bad_sample_reasons(record, manifest).items():
                        reasons[row + i] = f"shard {entry.name} record {raw['__key__']}: {why}"
                keys += record_keys
                row += count
            stream.drain()  # the tar reader stops at the end-of-archive block: read the padding too, and hash it
            finished = True
        finally:
            inputs.close()
            self.bytes_read += stream.bytes_read
            close_shard_stream(stream, entry.name, url, finished)
        if stream.sha256 is not None and (stream.sha256.hexdigest() != entry.sha256 or stream.bytes_read != entry.bytes):
            shutil.rmtree(tmp, ignore_errors=True)
            return sha_mismatch(entry, url, stream.sha256.hexdigest(), stream.bytes_read)
        bad = np.zeros(rows, bool)
        bad[list(reasons)] = True
        np.save(tmp / "targets.npy", _fill_targets(targets, counts[first_record:], manifest))
        np.save(tmp / "bad.npy", bad)
        (tmp / "meta.json").write_text(json.dumps({"offset": offset, "keys": keys, "reasons": {str(k): v for k, v in reasons.items()}}))
        tmp.rename(final)
        return None

    def close(self) -> None:
        self.held.clear()


def _load(folder: Path) -> DecodedShard:
    meta = json.loads((folder / "meta.json").read_text())
    return DecodedShard(
        int(meta["offset"]),
        np.load(folder / "inputs.npy", mmap_mode="r"),
        np.load(folder / "targets.npy"),
        meta["keys"],
        np.load(folder / "bad.npy"),
        {int(k): v for k, v in meta["reasons"].items()},
    )


def _fill_targets(parts: list[Optional[np.ndarray]], counts: list[int], manifest: Manifest) -> np.ndarray:
    """Targets of the decoded records; a record that failed to decode gets zeros (its samples are marked bad)."""
    good = next((p for p in parts if p is not None), None)
    dtype = np.int64 if manifest.num_classes else np.float32
    tail = good.shape[1:] if good is not None else ()
    return np.concatenate([p.astype(dtype, copy=False) if p is not None else np.zeros((n, *tail), dtype) for p, n in zip(parts, counts)]) if parts else np.zeros((0, *tail), dtype)


def keys_or_placeholders(raw: dict, count: int) -> list[str]:
    if isinstance(raw.get("keys"), list) and len(raw["keys"]) == count:  # an indexed webdataset shard's record (foreign.py)
        return [str(k) for k in raw["keys"]]
    try:
        keys = json.loads(raw["keys.json"])
        if isinstance(keys, list) and len(keys) == count:
            return [str(k) for k in keys]
    except (KeyError, ValueError):
        pass
    return [f"{raw['__key__']}#{i}" for i in range(count)]


PASS_PREFIX = "dist_train-"


def enter_pass(directory: Path) -> None:
    """Called by each rank's main process before its workers start: the folder, and this process as one of its owners.

    Folders whose owners are all gone (a job killed with SIGKILL never left its pass) are removed first;
    a folder without an owners file yet is being created and is left alone.
    """
    for folder in directory.parent.glob(f"{PASS_PREFIX}*"):
        try:
            pids = [int(pid) for pid in (folder / "owners").read_text().split()]
        except (OSError, ValueError):
            continue
        if pids and not any(_alive(pid) for pid in pids):
            shutil.rmtree(folder, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "owners", "a") as f:
        f.write(f"{os.getpid()}\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def leave_pass(directory: Path, node_ranks: int) -> None:
    """Called by each rank's main process when its pass ends (or is abandoned); the node's last one removes the folder."""
    if not directory.is_dir():
        return
    with file_lock(directory / "pass.lock"):
        with open(directory / "left", "ab") as f:
            f.write(b".")
            left = f.tell()
        if left >= node_ranks:
            shutil.rmtree(directory, ignore_errors=True)
