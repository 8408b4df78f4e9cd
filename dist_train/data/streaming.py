"""Streaming training from webdataset shards, with the same exact distributed batching as memory.

Each epoch has one global order over every sample of the split, a function of (seed, epoch) only: the
shards are permuted, their samples concatenated into a stream, and the stream is shuffled inside
consecutive windows of `data.shuffle_window` samples (`data prepare` has already shuffled the whole
split once, so a window mixes classes even when the source is sorted by class). Optimizer step k takes
global positions [k*G, (k+1)*G); rank r takes the r-th contiguous slice of G/world_size and cuts it into
micro-batches, exactly as `loader.GlobalBatchPlan` does in memory. So every sample is seen once per epoch
(the last `N % G` positions are dropped, a different subset each epoch), every rank runs the same number
of steps, and "samples consumed this epoch" resumes exactly on any world size and any number of workers.

Work is split by micro-batch, never by shard: DataLoader worker w builds micro-batches w, w + W, ... of
its rank and yields each whole (`batch_size=None`), and the DataLoader's round-robin over workers puts
them back in order. Reading is split by shard and node: the first process of a node that needs a shard
decodes it once into the node's shared store (node_store.py) and every rank and worker of the node copies
its rows out of it, so a split is read and decoded once per node per epoch, whatever the world size and
worker count. Each step's data is checked on every rank before it is handed out (agreement.py).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import uuid
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import BatchArithmetic, Config, ConfigError, DataConfig
from ..distributed.environment import DistEnv
from ..models import ModelSpec
from .agreement import StepAgreement
from .foreign import describe_plan, open_foreign
from .loader import DataBundle, GlobalBatchPlan, MapStyleTrainLoader, _identity, worker_seed_generator
from .node_store import DECODE_AHEAD, PASS_PREFIX, PassPlan, SharedShards, decoded_shard_bytes, enter_pass, keys_or_placeholders, leave_pass, node_scratch
from .remote import ShardCache, open_shard
from .shards import MANIFEST, DataError, Manifest, Record, bad_sample_reasons, close_shard_stream
from .sources import SourceData, Split, check_compatible
from .transforms import adapt_images
from .node_store import node_ranks

log = logging.getLogger(__name__)

# A DataLoader worker sends up to this many bytes of micro-batches per item (at most MAX_BUNDLE of them):
# each tensor crossing the worker pipe costs about a millisecond of shared-memory setup, whatever its size.
BUNDLE_BYTES = 4 << 20
MAX_BUNDLE = 16


# ---------------------------------------------------------------- where the shards are


@dataclass(frozen=True)
class ShardSource:
    """One split: its manifest and a URL per shard (a local path, or what `data.shard_urls` expands to)."""

    manifest: Manifest
    urls: tuple[str, ...]
    cache: Optional[ShardCache] = None  # data.cache_dir: remote shards are read from node-local verified copies

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.manifest.kind == "image" else np.dtype(np.float32)

    @property
    def target_dtype(self) -> np.dtype:
        return np.dtype(np.int64) if self.manifest.num_classes else np.dtype(np.float32)


def open_split(cfg: DataConfig, split: str, manifest: Optional[Manifest] = None) -> ShardSource:
    """`manifest`: the split of an index of webdataset shards (foreign.py); None reads data.path/SPLIT/manifest.json."""
    if manifest is None:
        if not cfg.path:
            raise ConfigError("data.source=shards needs data.path: the directory `dist-train data prepare --out DIR` or `dist-train data index ... --out DIR` wrote")
        manifest = Manifest.load(Path(cfg.path) / split / MANIFEST)
    if not manifest.shards:
        raise DataError(f"manifest {manifest.path} lists no shards")
    if not cfg.shard_urls:
        return ShardSource(manifest, manifest.shard_urls())
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
        stream = open_shard(url, entry, self.source.cache)
        finished = False
        try:
            yield from self.source.manifest.read_records(url, entry, first_record, stream)
            finished = True
        finally:
            close_shard_stream(stream, entry.name, url, finished)

    def _decode(self, shard: int, index: int, raw: dict) -> Chunk:
        manifest = self.source.manifest
        entry = manifest.shards[self.order[shard]]
        count = manifest.records_in(entry)[index]
        self.decoded_records += 1
        try:
            record: Record = manifest.decode(raw, count)
        except Exception as e:  # noqa: BLE001 - any decode failure: name the shard and the samples
            keys = keys_or_placeholders(raw, count)
            reason = f"shard {entry.name} record {raw['__key__']} fails to decode: {type(e).__name__}: {e}"
            if not self.skip_bad:
                raise DataError(f"{reason} (samples {keys[0]}..{keys[-1]}); set data.skip_bad_samples=true to skip bad samples instead") from None
            self.bad_reasons.update((key, reason) for key in keys)
            return Chunk(np.zeros((count, *manifest.shape), self.source.input_dtype), np.zeros(count, self.source.target_dtype), np.array(keys, object), np.ones(count, bool))
        bad = np.zeros(count, bool)
        for row, why in bad_sample_reasons(record, manifest).items():
            reason = f"shard {entry.name} record {raw['__key__']}: {why}"
            if not self.skip_bad:
                raise DataError(f"{reason} (sample {record.keys[row]}); set data.skip_bad_samples=true to skip bad samples instead")
            self.bad_reasons[str(record.keys[row])] = reason
            bad[row] = True
        return Chunk(record.inputs, record.targets.astype(self.source.target_dtype, copy=False), np.array(record.keys, object), bad)


def _upcoming(uses: dict[int, int], shard: int) -> list[int]:
    """The shards after `shard` that a consumer still needs, nearest first (stream order is shard order)."""
    return heapq.nsmallest(DECODE_AHEAD, (s for s in uses if s > shard))


def bad_reports(chunk: Chunk, cursor: _StreamCursor) -> list[str]:
    """One line per bad sample in what is about to be delivered (a sample read by two workers is reported once)."""
    if not chunk.bad.any():
        return []
    return [f"{chunk.keys[i]} ({cursor.bad_reasons.get(chunk.keys[i], 'failed to decode')})" for i in np.flatnonzero(chunk.bad).tolist()]


def _to_tensors(inputs: np.ndarray, targets: np.ndarray, input_shape: tuple[int, ...], images: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(inputs)
    return (adapt_images(x, input_shape) if images else x.float()), torch.from_numpy(targets)


# ---------------------------------------------------------------- training


class RankEpochStream(IterableDataset):
    """This rank's micro-batches of one pass, sent in bundles of `plan.bundle` consecutive micro-batches;
    DataLoader worker w makes bundles w, w + W, ... (so the DataLoader's round-robin keeps them in order).

    Samples come from the node's shared decoded shards (node_store.py); a worker copies out only the rows
    of its own micro-batches and tells the store when it is done with a shard. A bundle crosses the worker
    pipe as one tensor per field: a tensor sent from a worker costs about a millisecond of shared-memory
    setup, whatever its size, which bundling pays once per few megabytes instead of once per micro-batch.
    """

    def __init__(self, plan: PassPlan, consumers: dict[int, int], order: StreamOrder, epoch: int, rank: int, input_shape: tuple[int, ...], skip_bad: bool, with_keys: bool = True) -> None:
        self.plan, self.consumers, self.order, self.epoch, self.rank = plan, consumers, order, epoch, rank
        self.input_shape, self.skip_bad, self.with_keys = input_shape, skip_bad, with_keys

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        store = SharedShards(self.plan, self.consumers)
        uses = self.plan.consumer_uses(self.rank, worker)
        bundle: list[tuple] = []
        last = len(self.plan.micro_batch_starts(self.rank)) - 1
        try:
            for index, micro_batch in self._micro_batches(store, worker, uses):
                bundle.append(micro_batch)
                if (index + 1) % self.plan.bundle == 0 or index == last:
                    yield self._bundled(bundle, store)
                    bundle = []
        except DataError as e:
            # Handed over as a value: an exception raised in a worker reaches the user wrapped in a traceback.
            # The good micro-batches before the bad one go with it (one item: the round-robin stays in step),
            # so the error comes at its own step.
            yield "error", str(e), store.new_counts(), self._bundled(bundle, store) if bundle else None
        finally:
            for shard in sorted(uses):
                store.release(shard)  # shards this consumer will no longer need (all of them, if it stopped early)
            store.close()

    def _bundled(self, bundle: list[tuple], store: SharedShards) -> tuple:
        images = self.plan.manifest.kind == "image"
        first = bundle[0][0]
        inputs, targets = _to_tensors(np.concatenate([b[1] for b in bundle]), np.concatenate([b[2] for b in bundle]), self.input_shape, images)
        sizes = [len(b[2]) for b in bundle]
        keys = [b[3] for b in bundle] if self.with_keys else None
        return first, inputs, targets, sizes, keys, [b[4] for b in bundle], store.new_counts()

    def _micro_batches(self, store: SharedShards, worker: int, uses: dict[int, int]) -> Iterator[tuple[int, tuple]]:
        plan, micro = self.plan, self.plan.arithmetic.micro_batch_size
        permutations: dict[int, np.ndarray] = {}
        for index, start in enumerate(plan.micro_batch_starts(self.rank)):
            if plan.worker_of(index) != worker:
                continue
            positions = self._stream_positions(start, micro, permutations)
            inputs, targets, keys, reports = self._gather(store, positions, self.with_keys, uses)
            for shard in [s for s, last in uses.items() if last == index]:
                del uses[shard]
                store.release(shard)
            if reports and not self.skip_bad:
                key, why = reports[0]
                raise DataError(f"{why} (sample {key}); set data.skip_bad_samples=true to skip bad samples instead")
            if len(reports) == micro:
                raise DataError(f"every sample of a micro-batch is bad ({reports[0][0]}..{reports[-1][0]}: {reports[0][1]}); the shards need preparing again")
            yield index, (index, inputs, targets, keys, reports)

    def _stream_positions(self, start: int, count: int, permutations: dict[int, np.ndarray]) -> np.ndarray:
        """Global order positions [start, start + count) -> stream positions (the window shuffle)."""
        plan, size = self.plan, self.plan.window
        parts = []
        for j in range(start // size, (start + count - 1) // size + 1):
            if j not in permutations:
                for old in [k for k in permutations if k < j]:
                    del permutations[old]
                n = min((j + 1) * size, plan.num_samples) - j * size
                permutations[j] = self.order.window_permutation(self.epoch, j, n)
            lo, hi = max(start, j * size) - j * size, min(start + count, (j + 1) * size) - j * size
            parts.append(j * size + permutations[j][lo:hi])
        return np.concatenate(parts)

    def _gather(self, store: SharedShards, positions: np.ndarray, with_keys: bool, uses: Optional[dict[int, int]] = None) -> tuple[np.ndarray, np.ndarray, Optional[list[str]], list[tuple[str, str]]]:
        """Rows at these stream positions, in order, without the bad ones; (key, why) per bad sample.
        `uses`: the shards this consumer still needs (it may decode the next ones while it waits for one)."""
        shards = self.plan.shard_of(positions)
        keep = np.ones(len(positions), bool)
        inputs = np.empty((len(positions), *self.plan.manifest.shape), np.uint8 if self.plan.manifest.kind == "image" else np.float32)
        targets: Optional[np.ndarray] = None
        keys: list[str] = [""] * len(positions)
        reports = []
        for shard in np.unique(shards).tolist():
            where = np.flatnonzero(shards == shard)
            decoded = store.get(shard, partial(_upcoming, uses or {}, shard))
            rows = positions[where] - decoded.offset
            inputs[where] = decoded.inputs[rows]
            if targets is None:
                targets = np.empty((len(positions), *decoded.targets.shape[1:]), decoded.targets.dtype)
            targets[where] = decoded.targets[rows]
            if with_keys:
                for i, row in zip(where.tolist(), rows.tolist()):
                    keys[i] = decoded.keys[row]
            for i, row in zip(where[decoded.bad[rows]].tolist(), rows[decoded.bad[rows]].tolist()):
                keep[i] = False
                reports.append((decoded.keys[row], decoded.reasons.get(row, "bad sample")))
        assert targets is not None
        kept = np.flatnonzero(keep) if reports else None
        if kept is not None:
            inputs, targets, keys = inputs[kept], targets[kept], [keys[i] for i in kept.tolist()]
        return inputs, targets, keys if with_keys else None, reports


class StreamingTrainLoader(MapStyleTrainLoader):
    """The map-style loader's interface and position (epoch, samples consumed), fed from shards.

    Counters: `decoded_records` and `bytes_read` (this rank's DataLoader workers, since construction) show
    that each record is read once per node per epoch; `skipped_samples` counts bad samples skipped over
    all ranks (all-reduced with the step verdict; this rank's own count when there is no process group).
    A micro-batch that lost bad samples arrives shorter than `train.micro_batch_size` (one that would lose
    all of them stops every rank instead); `step_samples_kept` is, for the step just handed out, the samples
    of the global batch kept over all ranks: the denominator of a loss that is the mean over the samples
    actually used.
    """

    def __init__(self, source: ShardSource, order: StreamOrder, arithmetic: BatchArithmetic, dist_env: DistEnv, num_workers: int, input_shape: tuple[int, ...], skip_bad: bool, scratch: Path, job_token: str, control_group: Optional[object] = None) -> None:
        plan = GlobalBatchPlan(source.num_samples, arithmetic.global_batch_size, order.seed, order.shuffle)
        super().__init__(source, plan, arithmetic, dist_env, num_workers)  # type: ignore[arg-type]
        self.source, self.order, self.input_shape, self.skip_bad = source, order, input_shape, skip_bad
        self.scratch, self.job_token = scratch, job_token
        self.skipped_samples = 0
        self.decoded_records = 0
        self.bytes_read = 0
        self.passes = 0
        self.agreement = StepAgreement(control_group)  # None: a single process (or ranks without groups), local verdicts

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        for step in self.iter_steps(with_keys=False):
            yield [(inputs, targets) for inputs, targets, _ in step]

    def node_ranks(self) -> tuple[int, ...]:
        return node_ranks(self.dist_env)

    def micro_batches_per_bundle(self) -> int:
        """Up to BUNDLE_BYTES of model inputs, at most MAX_BUNDLE micro-batches."""
        micro_batch_bytes = 4 * self.arithmetic.micro_batch_size * int(np.prod(self.input_shape))
        return max(1, min(MAX_BUNDLE, BUNDLE_BYTES // micro_batch_bytes))

    def bundle_size(self) -> int:
        """Micro-batches per worker item (without workers nothing crosses a pipe: one at a time)."""
        return self.micro_batches_per_bundle() if self.num_workers else 1

    def pass_plan(self, start_step: int) -> PassPlan:
        self.passes += 1
        node_ranks = self.node_ranks()
        name = f"{PASS_PREFIX}{self.job_token}-node{node_ranks[0]}-e{self.epoch}-s{start_step}-p{self.passes}"
        return PassPlan(
            self.source.manifest, self.source.urls, self.source.cache, tuple(int(i) for i in self.order.shard_order(self.epoch)),
            self.order.window, start_step, self.steps_per_epoch,
            self.arithmetic, node_ranks, max(self.num_workers, 1), self.scratch / name, self.bundle_size(),
        )

    def iter_steps(self, with_keys: bool = True) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, Optional[list[str]]]]]:
        """Per optimizer step, this rank's micro-batches with their sample keys (None unless `with_keys`)."""
        import webdataset.gopen  # noqa: F401, PLC0415 - imported once here, inherited by forked workers (~70 ms each otherwise)
        import webdataset.tariterators  # noqa: F401, PLC0415

        start_step = self.samples_consumed // self.plan.global_batch_size
        plan = self.pass_plan(start_step)
        enter_pass(plan.directory)
        dataset = RankEpochStream(plan, plan.consumers_per_shard(), self.order, self.epoch, self.dist_env.global_rank, self.input_shape, self.skip_bad, with_keys)
        # batch_size=None: the dataset yields whole micro-batches, so nothing re-batches (or re-splits) them;
        # no collate either: default_convert would walk every sample key. Pinned pages only on CUDA, where
        # the trainer's non_blocking copies can then overlap with compute.
        loader = DataLoader(
            dataset, batch_size=None, collate_fn=_identity, num_workers=self.num_workers, persistent_workers=False,
            pin_memory=self.dist_env.device.startswith("cuda"),
            generator=worker_seed_generator(self.order.seed, self.epoch, self.dist_env.global_rank),  # not the global RNG: see loader.py
        )
        items = iter(loader)
        try:
            yield from self._agreed_steps(self._unbundled(items), start_step, max(1, self.micro_batches_per_bundle() // self.arithmetic.grad_accum_steps))
        finally:
            # Workers stop before the pass folder may go. An error in flight still references the iterator,
            # so dropping our name for it would not be enough.
            shutdown = getattr(items, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del items
            leave_pass(plan.directory, len(plan.node_ranks))
            self.agreement.settle()

    def _agreed_steps(self, items: Iterator, start_step: int, group_steps: int) -> Iterator[list]:
        """Steps go out in groups of `group_steps` (the same on every rank), a group once every rank's verdict on
        it is in, which is after the next group was assembled: one small all-reduce per group, long finished
        when it is waited for."""
        if not self.agreement.collective:
            group_steps = 1  # a local verdict: nothing to wait for, nothing to group
        pending: Optional[tuple] = None
        group: list[tuple[list, int]] = []
        expected, problem = 0, None
        for k in range(start_step, self.steps_per_epoch):
            step: list = []
            skipped = 0
            while problem is None and len(step) < self.arithmetic.grad_accum_steps:
                item = next(items)
                if item[0] == "error":
                    problem = item[1]
                    break
                index, inputs, targets, keys, reports = item
                if index != expected:
                    raise RuntimeError(f"micro-batch {index} arrived where {expected} was due: DataLoader workers out of order")
                expected += 1
                for key, why in reports:
                    log.warning("rank %d skipped bad sample %s", self.dist_env.global_rank, f"{key} ({why})")
                skipped += len(reports)
                step.append((inputs, targets, keys))
            group.append((step, skipped))
            if len(group) < group_steps and k + 1 < self.steps_per_epoch:
                continue
            started = (group, self.agreement.start(problem, [n for _, n in group]))
            group = []
            if pending is not None:
                yield from self._hand_out(*pending)
            pending = started
            if not self.agreement.collective:
                yield from self._hand_out(*pending)
                pending = None
        if pending is not None:
            yield from self._hand_out(*pending)

    def _unbundled(self, items: Iterator[tuple]) -> Iterator[tuple]:
        """Bundles -> (index, inputs, targets, keys, reports) per micro-batch (views of the bundle's tensors), or an error."""
        for item in items:
            if item[0] == "error":
                self._count(item[2])
                if item[3] is not None:
                    yield from self._split(item[3])
                yield item
                return
            yield from self._split(item)

    def _split(self, bundle: tuple) -> Iterator[tuple]:
        first, inputs, targets, sizes, keys, reports, counters = bundle
        self._count(counters)
        for i, (x, y) in enumerate(zip(inputs.split(sizes), targets.split(sizes))):
            yield first + i, x, y, keys[i] if keys is not None else None, reports[i]

    def _hand_out(self, group: list[tuple[list, int]], started: tuple) -> Iterator[list]:
        for (step, _), skipped in zip(group, self.agreement.finish(started)):
            self.skipped_samples += skipped
            self.step_samples_kept = self.plan.global_batch_size - skipped
            # Count the step before handing it out: a checkpoint taken after this step resumes after it.
            self.samples_consumed += self.plan.global_batch_size
            yield step

    def _count(self, counters: tuple[int, int]) -> None:
        self.decoded_records += counters[0]
        self.bytes_read += counters[1]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "shuffle_window": self.order.window, "skipped_samples": self.skipped_samples}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("shuffle_window", state.get("shuffle_buffer", self.order.window))
        if saved != self.order.window:
            raise ConfigError(
                f"the checkpoint was written with data.shuffle_window={saved}, which defines the sample "
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


def job_token_and_scratch(dist_env: DistEnv, own_scratch: Path) -> tuple[str, Path]:
    """A name every rank of this job agrees on (and no other job uses) for the node's shared pass folders, and
    the node's scratch folder: the choice of the node's first rank, whatever this rank would choose.

    Ranks that choose by themselves (free room in /dev/shm, their TMPDIR) can split one node's store in two:
    each half reads and decodes every record, and neither is ever deleted, since each waits for consumers
    that use the other."""
    if dist_env.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        views: list = [None] * dist_env.world_size
        torch.distributed.all_gather_object(views, (uuid.uuid4().hex[:16], str(own_scratch)))
        return views[0][0], Path(views[node_ranks(dist_env)[0]][1])
    if dist_env.world_size > 1:
        # Ranks without a process group (tests of the loader alone): the rendezvous names the job, and the
        # loaders are told apart by the order the ranks build them in (each rank runs the same program).
        return f"{dist_env.master_addr}-{dist_env.master_port}-{next(_LOADERS_BUILT)}".replace("/", "_"), own_scratch
    return uuid.uuid4().hex[:16], own_scratch


_LOADERS_BUILT = itertools.count()


def build_streaming(cfg: Config, spec: ModelSpec, arithmetic: BatchArithmetic, dist_env: DistEnv, control_group: Optional[object] = None) -> DataBundle:
    if cfg.data.shuffle_window < 1:
        raise ConfigError(f"data.shuffle_window must be at least 1, got {cfg.data.shuffle_window}")
    if cfg.data.cache_max_bytes < 1:
        raise ConfigError(f"data.cache_max_bytes must be positive, got {cfg.data.cache_max_bytes}")
    cache = ShardCache(Path(cfg.data.cache_dir), cfg.data.cache_max_bytes) if cfg.data.cache_dir else None
    foreign = open_foreign(cfg.data, spec)  # None: dist_train's own shards
    train, test = (replace(open_split(cfg.data, split, foreign[split] if foreign else None), cache=cache) for split in ("train", "test"))
    for source in (train, test):
        check_fits(source, spec)
    order = StreamOrder(tuple(s.count for s in train.manifest.shards), cfg.train.seed, cfg.data.shuffle, cfg.data.shuffle_window)
    # Room for a few decoded shards: the store holds those between the node's slowest and fastest consumer.
    token, scratch = job_token_and_scratch(dist_env, node_scratch(cfg.data.cache_dir, 4 * decoded_shard_bytes(train.manifest)))
    train_loader = StreamingTrainLoader(
        train, order, arithmetic, dist_env, cfg.data.num_workers, spec.input_shape, cfg.data.skip_bad_samples, scratch, token, control_group,
    )
    eval_loader = StreamingEvalLoader(test, max(arithmetic.micro_batch_size, 256), dist_env, spec.input_shape, cfg.data.skip_bad_samples)
    notes = (describe_plan(foreign, spec),) if foreign else ()
    return DataBundle(train_loader, eval_loader, train.num_samples, test.num_samples, notes)
