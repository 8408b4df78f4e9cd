"""Streaming training from webdataset shards, with the same exact distributed batching as memory.

Each epoch has one global order over every sample of the split, a function of (seed, epoch) only: the
shards are permuted, their samples concatenated into a stream, and the stream is shuffled inside
consecutive windows of `data.shuffle_buffer` samples. Optimizer step k takes global positions
[k*G, (k+1)*G); rank r takes the r-th contiguous slice of G/world_size and cuts it into micro-batches,
exactly as `loader.GlobalBatchPlan` does in memory. So every sample is seen once per epoch (the last
`N % G` positions are dropped, a different subset each epoch), every rank runs the same number of steps,
and "samples consumed this epoch" resumes exactly on any world size and any number of workers.

Work is split by micro-batch, never by shard: DataLoader worker w builds micro-batches w, w + W, ... of
its rank and yields each whole (`batch_size=None`), and the DataLoader's round-robin over workers puts
them back in order. A worker reads the stream window by window; shards it does not need are never opened,
and records before a resume point are skipped by name inside one shard, never decoded. The price of an
order that does not depend on the world size: every worker reads each window it draws samples from,
so a split is read about world_size x num_workers times per epoch (sequentially, in records of many
samples; benchmarks/bench_loader.py shows it is still faster than an in-memory map-style DataLoader).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import BatchArithmetic, Config, ConfigError, DataConfig
from ..env import DistEnv
from ..models import ModelSpec
from . import DataBundle
from .loader import GlobalBatchPlan, MapStyleTrainLoader, _identity, worker_seed_generator
from .shards import MANIFEST, RECORD_MEMBERS, DataError, Manifest, Record, decode_record, iter_shard, record_index
from .sources import SourceData, Split, check_compatible
from .transforms import adapt_images

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- where the shards are


@dataclass(frozen=True)
class ShardSource:
    """One split: its manifest and a URL per shard (a local path, or what `data.shard_urls` expands to)."""

    manifest: Manifest
    urls: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.manifest.kind == "image" else np.dtype(np.float32)

    @property
    def target_dtype(self) -> np.dtype:
        return np.dtype(np.int64) if self.manifest.num_classes else np.dtype(np.float32)


def open_split(cfg: DataConfig, split: str) -> ShardSource:
    if not cfg.path:
        raise ConfigError("data.source=shards needs data.path: the directory `dist-train data prepare --out DIR` wrote")
    manifest = Manifest.load(Path(cfg.path) / split / MANIFEST)
    if not manifest.shards:
        raise DataError(f"manifest {manifest.path} lists no shards")
    if not cfg.shard_urls:
        return ShardSource(manifest, tuple(str(manifest.directory / s.name) for s in manifest.shards))
    from webdataset.shardlists import expand_urls

    urls = expand_urls(cfg.shard_urls.replace("{split}", split))
    by_name = {}
    for url in urls:
        for shard in manifest.shards:
            if url.rstrip(" '\"").endswith(shard.name):
                by_name[shard.name] = url
    missing = [s.name for s in manifest.shards if s.name not in by_name]
    if missing:
        raise ConfigError(
            f"data.shard_urls={cfg.shard_urls} gives no URL ending in {missing[0]} (one of {len(missing)} shards of "
            f"{manifest.path} without a URL); the pattern must expand to every shard name in the manifest"
        )
    return ShardSource(manifest, tuple(by_name[s.name] for s in manifest.shards))


def check_fits(source: ShardSource, spec: ModelSpec) -> None:
    """Fail before training when the shards cannot feed the model (the same checks as in-memory sources)."""
    manifest = source.manifest
    what = f"shard manifest {manifest.path}"
    empty = Split(torch.from_numpy(np.zeros((0, *manifest.shape), source.input_dtype)), torch.zeros(0), [])
    check_compatible(SourceData(empty, empty, manifest.kind, manifest.num_classes), spec, what)
    if manifest.kind == "image" and len(spec.input_shape) == 3 and len(manifest.shape) == 3:
        stored, wanted = manifest.shape[0], spec.input_shape[0]
        if stored != wanted and 1 not in (stored, wanted):
            raise ConfigError(f"{what} holds {stored}-channel images; model.name={spec.name} takes {wanted} channels")


# ---------------------------------------------------------------- the global order


@dataclass(frozen=True)
class StreamOrder:
    """Per epoch: a shard permutation, then a shuffle inside each window of `window` stream positions."""

    shard_counts: tuple[int, ...]
    seed: int
    shuffle: bool
    window: int

    @property
    def num_samples(self) -> int:
        return sum(self.shard_counts)

    def shard_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.shard_counts))
        return np.random.default_rng([self.seed % 2**63, epoch, 0]).permutation(len(self.shard_counts))

    def window_permutation(self, epoch: int, window_index: int, size: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([self.seed % 2**63, epoch, 1, window_index]).permutation(size)


@dataclass
class Chunk:
    """Consecutive or gathered samples; `bad` marks samples that failed to decode (skipped, never trained on)."""

    inputs: np.ndarray
    targets: np.ndarray
    keys: np.ndarray  # str objects
    bad: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, rows: np.ndarray | slice) -> "Chunk":
        return Chunk(self.inputs[rows], self.targets[rows], self.keys[rows], self.bad[rows])

    @staticmethod
    def concat(parts: Sequence["Chunk"]) -> "Chunk":
        if len(parts) == 1:
            return parts[0]
        return Chunk(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("inputs", "targets", "keys", "bad")))


class _StreamCursor:
    """Reads samples [start, stop) of the stream (the split's shards in a given order) from any position.

    Moving forward inside the open shard passes over records without decoding them; moving elsewhere
    opens the shard holding the target at the record holding it (tarfile skips earlier records by name),
    so a resume reads the head of one shard at most.
    """

    def __init__(self, source: ShardSource, shard_order: Sequence[int], skip_bad: bool) -> None:
        self.source = source
        self.order = [int(i) for i in shard_order]
        self.starts = np.cumsum([0] + [source.manifest.shards[i].count for i in self.order])
        self.skip_bad = skip_bad
        self.bad_reasons: dict[str, str] = {}  # key of a sample that failed to decode -> why
        self.decoded_records = 0  # tests check that a resume decodes only the records it needs
        self.open_shard = -1
        self.records: Optional[Iterator[tuple[int, dict]]] = None
        self.record: Optional[Chunk] = None
        self.record_start = 0

    def read(self, start: int, stop: int) -> Chunk:
        parts, position = [], start
        while position < stop:
            record = self._record_holding(position)
            end = min(stop, self.record_start + len(record))
            parts.append(record.take(slice(position - self.record_start, end - self.record_start)))
            position = end
        return Chunk.concat(parts)

    def close(self) -> None:
        if self.records is not None:
            self.records.close()  # closes the tar stream (and a pipe: command) now, not at garbage collection
        self.records, self.record, self.open_shard = None, None, -1

    def _record_holding(self, position: int) -> Chunk:
        if self.record is not None and self.record_start <= position < self.record_start + len(self.record):
            return self.record
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        per_record = self.source.manifest.samples_per_record
        wanted = (position - int(self.starts[shard])) // per_record
        if shard != self.open_shard or self.record is None or position < self.record_start:
            self.close()
            self.records = self._shard_records(shard, wanted)
            self.open_shard = shard
        assert self.records is not None
        for index, raw in self.records:
            if index == wanted:
                self.record_start = int(self.starts[shard]) + index * per_record
                self.record = self._decode(shard, index, raw)
                return self.record
        raise AssertionError("unreachable: _shard_records checks the record sequence")

    def _shard_records(self, shard: int, first_record: int) -> Iterator[tuple[int, dict]]:
        entry = self.source.manifest.shards[self.order[shard]]
        url = self.source.urls[self.order[shard]]
        counts = self.source.manifest.records_in(entry)
        expected = first_record
        for raw in iter_shard(url, entry.name, first_record):
            try:
                index = record_index(raw["__key__"])
            except (ValueError, IndexError):
                index = -1
            if index != expected or index >= len(counts):
                raise DataError(f"shard {entry.name} ({url}): member {raw['__key__']} where record {expected} was expected; the shard is corrupt or was not written by `dist-train data prepare`")
            missing = [m for m in RECORD_MEMBERS if m not in raw]
            if missing:
                raise DataError(
                    f"shard {entry.name} ({url}) is truncated or corrupt: record {raw['__key__']} lacks {', '.join(missing)} "
                    f"(after {sum(counts[:expected])} of its {entry.count} samples); run `dist-train data inspect` and prepare the shards again"
                )
            yield index, raw
            expected += 1
        if expected < len(counts):
            raise DataError(
                f"shard {entry.name} ({url}) is truncated: it ends after {sum(counts[:expected])} of its {entry.count} samples; "
                "run `dist-train data inspect` and prepare the shards again"
            )

    def _decode(self, shard: int, index: int, raw: dict) -> Chunk:
        manifest = self.source.manifest
        entry = manifest.shards[self.order[shard]]
        count = manifest.records_in(entry)[index]
        self.decoded_records += 1
        try:
            record: Record = decode_record(raw, manifest, count)
            return Chunk(record.inputs, record.targets.astype(self.source.target_dtype, copy=False), np.array(record.keys, object), np.zeros(count, bool))
        except Exception as e:  # noqa: BLE001 - any decode failure: name the shard and the samples
            keys = _keys_or_placeholders(raw, count)
            reason = f"shard {entry.name} record {raw['__key__']} fails to decode: {type(e).__name__}: {e}"
            if not self.skip_bad:
                raise DataError(f"{reason} (samples {keys[0]}..{keys[-1]}); set data.skip_bad_samples=true to skip bad samples instead") from None
            self.bad_reasons.update((key, reason) for key in keys)
            return Chunk(np.zeros((count, *manifest.shape), self.source.input_dtype), np.zeros(count, self.source.target_dtype), np.array(keys, object), np.ones(count, bool))


def _keys_or_placeholders(raw: dict, count: int) -> list[str]:
    try:
        keys = json.loads(raw["keys.json"])
        if isinstance(keys, list) and len(keys) == count:
            return [str(k) for k in keys]
    except (KeyError, ValueError):
        pass
    return [f"{raw['__key__']}#{i}" for i in range(count)]


def bad_reports(chunk: Chunk, cursor: _StreamCursor) -> list[str]:
    """One line per bad sample in what is about to be delivered (a sample read by two workers is reported once)."""
    if not chunk.bad.any():
        return []
    return [f"{chunk.keys[i]} ({cursor.bad_reasons.get(chunk.keys[i], 'failed to decode')})" for i in np.flatnonzero(chunk.bad).tolist()]


def _to_tensors(inputs: np.ndarray, targets: np.ndarray, input_shape: tuple[int, ...], images: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(inputs)
    return (adapt_images(x, input_shape) if images else x.float()), torch.from_numpy(targets)


# ---------------------------------------------------------------- training


class _WindowReader:
    """One worker's view of an epoch: global positions -> samples, one decoded window (or two) in memory."""

    def __init__(self, source: ShardSource, order: StreamOrder, epoch: int, skip_bad: bool) -> None:
        self.order, self.epoch = order, epoch
        self.cursor = _StreamCursor(source, order.shard_order(epoch), skip_bad)
        self.windows: dict[int, tuple[np.ndarray, Chunk]] = {}

    def gather(self, start: int, count: int) -> Chunk:
        size = self.order.window
        first, last = start // size, (start + count - 1) // size
        for j in [j for j in self.windows if j < first]:
            del self.windows[j]
        parts = []
        for j in range(first, last + 1):
            permutation, window = self._window(j)
            lo, hi = max(start, j * size) - j * size, min(start + count, (j + 1) * size) - j * size
            parts.append(window.take(permutation[lo:hi]))
        return Chunk.concat(parts)

    def _window(self, j: int) -> tuple[np.ndarray, Chunk]:
        if j not in self.windows:
            lo, hi = j * self.order.window, min((j + 1) * self.order.window, self.order.num_samples)
            self.windows[j] = (self.order.window_permutation(self.epoch, j, hi - lo), self.cursor.read(lo, hi))
        return self.windows[j]


class RankEpochStream(IterableDataset):
    """This rank's micro-batches of one epoch from `start_step`; DataLoader worker w makes those with index i % W == w."""

    def __init__(self, source: ShardSource, order: StreamOrder, epoch: int, start_step: int, steps: int, arithmetic: BatchArithmetic, rank: int, input_shape: tuple[int, ...], skip_bad: bool, with_keys: bool = True) -> None:
        self.source, self.order, self.epoch = source, order, epoch
        self.start_step, self.steps, self.arithmetic, self.rank = start_step, steps, arithmetic, rank
        self.input_shape, self.skip_bad, self.with_keys = input_shape, skip_bad, with_keys

    def micro_batch_starts(self) -> list[int]:
        a = self.arithmetic
        per_rank = a.global_batch_size // a.world_size
        return [
            step * a.global_batch_size + self.rank * per_rank + m * a.micro_batch_size
            for step in range(self.start_step, self.steps)
            for m in range(a.grad_accum_steps)
        ]

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = _WindowReader(self.source, self.order, self.epoch, self.skip_bad)
        try:
            yield from self._micro_batches(reader, worker, num_workers)
        except DataError as e:
            # Handed over as a value: an exception raised in a worker reaches the user wrapped in a traceback.
            yield "error", str(e)
        finally:
            reader.cursor.close()

    def _micro_batches(self, reader: "_WindowReader", worker: int, num_workers: int) -> Iterator[tuple]:
        images = self.source.manifest.kind == "image"
        for index, start in enumerate(self.micro_batch_starts()):
            if index % num_workers != worker:
                continue
            chunk = reader.gather(start, self.arithmetic.micro_batch_size)
            reports = bad_reports(chunk, reader.cursor)
            if reports:
                if chunk.bad.all():
                    raise DataError(f"every sample of a micro-batch failed to decode ({chunk.keys[0]}..{chunk.keys[-1]}); the shards need preparing again")
                chunk = chunk.take(np.flatnonzero(~chunk.bad))
            inputs, targets = _to_tensors(chunk.inputs, chunk.targets, self.input_shape, images)
            # Sample keys cross the worker pipe pickled, string by string: only when someone asked for them.
            yield index, inputs, targets, chunk.keys if self.with_keys else None, reports


class StreamingTrainLoader(MapStyleTrainLoader):
    """The map-style loader's interface and position (epoch, samples consumed), fed from shards."""

    def __init__(self, source: ShardSource, order: StreamOrder, arithmetic: BatchArithmetic, dist_env: DistEnv, num_workers: int, input_shape: tuple[int, ...], skip_bad: bool) -> None:
        plan = GlobalBatchPlan(source.num_samples, arithmetic.global_batch_size, order.seed, order.shuffle)
        super().__init__(source, plan, arithmetic, dist_env, num_workers)  # type: ignore[arg-type]
        self.source, self.order, self.input_shape, self.skip_bad = source, order, input_shape, skip_bad
        self.skipped_samples = 0

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        for step in self.iter_steps(with_keys=False):
            yield [(inputs, targets) for inputs, targets, _ in step]

    def iter_steps(self, with_keys: bool = True) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, Optional[list[str]]]]]:
        """Per optimizer step, this rank's micro-batches with their sample keys (None unless `with_keys`)."""
        start_step = self.samples_consumed // self.plan.global_batch_size
        dataset = RankEpochStream(self.source, self.order, self.epoch, start_step, self.steps_per_epoch, self.arithmetic, self.dist_env.global_rank, self.input_shape, self.skip_bad, with_keys)
        # batch_size=None: the dataset yields whole micro-batches, so nothing re-batches (or re-splits) them;
        # no collate either: default_convert would walk every sample key.
        loader = DataLoader(
            dataset, batch_size=None, collate_fn=_identity, num_workers=self.num_workers, persistent_workers=False,
            generator=worker_seed_generator(self.order.seed, self.epoch, self.dist_env.global_rank),  # not the global RNG: see loader.py
        )
        step: list = []
        for expected, item in enumerate(loader):
            if item[0] == "error":
                raise DataError(item[1])
            index, inputs, targets, keys, reports = item
            if index != expected:
                raise RuntimeError(f"micro-batch {index} arrived where {expected} was due: DataLoader workers out of order")
            for report in reports:
                log.warning("rank %d skipped bad sample %s", self.dist_env.global_rank, report)
            self.skipped_samples += len(reports)
            step.append((inputs, targets, keys.tolist() if keys is not None else None))
            if len(step) == self.arithmetic.grad_accum_steps:
                # Count the step before handing it out: a checkpoint taken after this step resumes after it.
                self.samples_consumed += self.plan.global_batch_size
                yield step
                step = []

    def state_dict(self) -> dict:
        return {**super().state_dict(), "shuffle_buffer": self.order.window, "skipped_samples": self.skipped_samples}

    def load_state_dict(self, state: dict) -> None:
        if state.get("shuffle_buffer", self.order.window) != self.order.window:
            raise ConfigError(
                f"the checkpoint was written with data.shuffle_buffer={state['shuffle_buffer']}, which defines the sample "
                f"order; resume with the same value (now {self.order.window})"
            )
        super().load_state_dict(state)
        self.skipped_samples = int(state.get("skipped_samples", 0))


# ---------------------------------------------------------------- evaluation


class StreamingEvalLoader:
    """Rank r reads the r-th contiguous slice of the split in stored order; equal batch counts, padding weight 0."""

    def __init__(self, source: ShardSource, batch_size: int, dist_env: DistEnv, input_shape: tuple[int, ...], skip_bad: bool) -> None:
        self.source, self.batch_size, self.dist_env = source, batch_size, dist_env
        self.input_shape, self.skip_bad = input_shape, skip_bad

    def __len__(self) -> int:
        return self.source.num_samples

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n, world, rank = self.source.num_samples, self.dist_env.world_size, self.dist_env.global_rank
        per_rank = -(-n // world)
        lo, hi = min(rank * per_rank, n), min((rank + 1) * per_rank, n)
        cursor = _StreamCursor(self.source, range(len(self.source.manifest.shards)), self.skip_bad)
        manifest = self.source.manifest
        try:
            for offset in range(0, per_rank, self.batch_size):
                size = min(self.batch_size, per_rank - offset)
                start, stop = min(lo + offset, hi), min(lo + offset + size, hi)
                chunk = cursor.read(start, stop) if stop > start else None
                for report in bad_reports(chunk, cursor) if chunk is not None else []:
                    log.warning("rank %d skipped bad eval sample %s", rank, report)
                real = len(chunk) if chunk is not None else 0
                inputs = np.zeros((size, *manifest.shape), self.source.input_dtype)
                targets = np.zeros(size, self.source.target_dtype)
                weights = torch.zeros(size)
                if chunk is not None:
                    inputs[:real], targets[:real] = chunk.inputs, chunk.targets
                    weights[:real] = torch.from_numpy((~chunk.bad).astype(np.float32))
                yield (*_to_tensors(inputs, targets, self.input_shape, manifest.kind == "image"), weights)
        finally:
            cursor.close()


# ---------------------------------------------------------------- assembly


def build_streaming(cfg: Config, spec: ModelSpec, arithmetic: BatchArithmetic, dist_env: DistEnv) -> DataBundle:
    if cfg.data.shuffle_buffer < 1:
        raise ConfigError(f"data.shuffle_buffer must be at least 1, got {cfg.data.shuffle_buffer}")
    train, test = open_split(cfg.data, "train"), open_split(cfg.data, "test")
    for source in (train, test):
        check_fits(source, spec)
    order = StreamOrder(tuple(s.count for s in train.manifest.shards), cfg.train.seed, cfg.data.shuffle, cfg.data.shuffle_buffer)
    train_loader = StreamingTrainLoader(train, order, arithmetic, dist_env, cfg.data.num_workers, spec.input_shape, cfg.data.skip_bad_samples)
    eval_loader = StreamingEvalLoader(test, max(arithmetic.micro_batch_size, 256), dist_env, spec.input_shape, cfg.data.skip_bad_samples)
    return DataBundle(train_loader, eval_loader, train.num_samples, test.num_samples)
