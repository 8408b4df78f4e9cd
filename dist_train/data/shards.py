"""Webdataset shards: the writer behind `dist-train data prepare`, the manifest, and record decoding.

Layout of one split (DIR/train, DIR/test)::

    train-000000.tar ... train-000005.tar   plain tar files, readable by `tar` and by `webdataset`
    manifest.json                           written last: its presence means the split is complete

Each tar member group (one webdataset "sample") is a *record* of up to `samples_per_record` samples:
`KEY.inputs.npy` (uint8 images [n, C, H, W] or float32 vectors [n, ...]), `KEY.targets.npy` (int64 labels
or float32 regression targets) and `KEY.keys.json` (the n stable sample keys). Per-member tar parsing
costs far more than decoding a 28x28 image (benchmarks/bench_loader.py measures it), so many samples per
member is what makes streaming as fast as memory. Plain webdataset reads a record as
`{"inputs.npy": array, "targets.npy": array, "keys.json": [...]}` after `.decode()`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..config import ConfigError, DataConfig
from .sources import SOURCES, SourceData, Split, read_image_folder

FORMAT = "dist_train.shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
RECORD_MEMBERS = ("inputs.npy", "targets.npy", "keys.json")


class DataError(RuntimeError):
    """Shards that cannot be read as promised: missing, truncated, corrupt, or not matching the model."""


# ---------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ShardEntry:
    name: str
    count: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    path: Path  # the manifest file itself; shards lie beside it
    split: str
    kind: str  # "image" | "vector"
    shape: tuple[int, ...]
    num_classes: int
    samples_per_record: int
    shards: tuple[ShardEntry, ...]
    options: dict

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def records_in(self, shard: ShardEntry) -> list[int]:
        """Sample count of each record of a shard (all full but the last)."""
        full, rest = divmod(shard.count, self.samples_per_record)
        return [self.samples_per_record] * full + ([rest] if rest else [])

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "split": self.split,
            "kind": self.kind,
            "shape": list(self.shape),
            "num_classes": self.num_classes,
            "num_samples": self.num_samples,
            "samples_per_record": self.samples_per_record,
            "options": self.options,
            "shards": [vars(s) for s in self.shards],
        }

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        if not path.is_file():
            raise DataError(
                f"{path} does not exist: not a prepared shard directory, or an interrupted prepare; "
                "run `dist-train data prepare --source NAME --out DIR` and set data.path=DIR"
            )
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
            shards = tuple(ShardEntry(str(s["name"]), int(s["count"]), int(s["bytes"]), str(s["sha256"])) for s in raw["shards"])
            return cls(
                path, str(raw["split"]), str(raw["kind"]), tuple(int(d) for d in raw["shape"]), int(raw["num_classes"]),
                int(raw["samples_per_record"]), shards, dict(raw.get("options", {})),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"manifest {path} is not a dist_train shard manifest: {e}") from None

    def shard_urls(self) -> tuple[str, ...]:
        """Where each shard is read from unless data.shard_urls says otherwise: beside the manifest."""
        return tuple(str(self.directory / s.name) for s in self.shards)

    def read_records(self, url: str, entry: ShardEntry, first_record: int, stream) -> Iterator[tuple[int, dict]]:
        """(record index, raw record) of one shard from `first_record` on (foreign.py reads indexed webdataset shards)."""
        return checked_records(url, entry, self.records_in(entry), first_record, stream)

    def decode(self, raw: dict, count: int) -> "Record":
        return decode_record(raw, self, count)

    def describe(self) -> str:
        size = sum(s.bytes for s in self.shards)
        classes = f"{self.num_classes} classes" if self.num_classes else "regression targets"
        return (
            f"{self.directory}: split={self.split} {self.num_samples} samples in {len(self.shards)} shards "
            f"({size / 2**20:.2f} MiB, {self.samples_per_record} samples/record), {self.kind} shape {list(self.shape)}, {classes}"
        )


# ---------------------------------------------------------------- writing


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    # Fixed metadata (mtime 0, no owner) keeps shards byte-identical across prepares: same data, same sha256.
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


class _HashingWriter(io.RawIOBase):
    def __init__(self, file) -> None:
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)


def record_key(split: str, shard_index: int, record_index: int) -> str:
    return f"{split}-{shard_index:06d}-{record_index:05d}"


def record_index(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def write_shard(path: Path, split: Split, start: int, stop: int, shard_index: int, split_name: str, samples_per_record: int) -> ShardEntry:
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        with tarfile.open(fileobj=writer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for r, lo in enumerate(range(start, stop, samples_per_record)):
                hi = min(lo + samples_per_record, stop)
                key = record_key(split_name, shard_index, r)
                _add_member(tar, f"{key}.inputs.npy", _npy_bytes(split.inputs[lo:hi].numpy()))
                _add_member(tar, f"{key}.targets.npy", _npy_bytes(split.targets[lo:hi].numpy()))
                _add_member(tar, f"{key}.keys.json", json.dumps(split.keys[lo:hi]).encode())
        f.flush()
        os.fsync(f.fileno())
    return ShardEntry(path.name, stop - start, writer.size, writer.sha256.hexdigest())


def write_split(split: Split, out: Path, split_name: str, kind: str, num_classes: int, samples_per_shard: int, samples_per_record: int, options: dict) -> Manifest:
    """Write one split into `out`, atomically: everything goes to a hidden sibling folder, renamed into place."""
    _remove_abandoned(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    entries = []
    for i, start in enumerate(range(0, len(split), samples_per_shard)):
        stop = min(start + samples_per_shard, len(split))
        entries.append(write_shard(tmp / f"{split_name}-{i:06d}.tar", split, start, stop, i, split_name, samples_per_record))
    manifest = Manifest(out / MANIFEST, split_name, kind, tuple(split.inputs.shape[1:]), num_classes, samples_per_record, tuple(entries), options)
    (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1))
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return manifest


def _remove_abandoned(out: Path) -> None:
    """Hidden folders left by a prepare that was killed (its process is gone)."""
    for folder in out.parent.glob(f".{out.name}.*-*"):
        try:
            os.kill(int(folder.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


# ---------------------------------------------------------------- reading


@dataclass
class Record:
    inputs: np.ndarray
    targets: np.ndarray
    keys: list[str]
    failures: dict[int, str] = field(default_factory=dict)  # row -> why that sample failed to decode (its inputs are zeros)


def decode_record(raw: dict, manifest: Manifest, expected_count: int) -> Record:
    """A tar member group -> arrays; any inconsistency is an error (caller names the shard and key)."""
    inputs = np.load(io.BytesIO(raw["inputs.npy"]), allow_pickle=False)
    targets = np.load(io.BytesIO(raw["targets.npy"]), allow_pickle=False)
    keys = json.loads(raw["keys.json"])
    if inputs.shape != (expected_count, *manifest.shape) or targets.shape[:1] != (expected_count,) or len(keys) != expected_count:
        raise ValueError(f"holds inputs {list(inputs.shape)}, {len(targets)} targets, {len(keys)} keys; the manifest promises {expected_count} samples of shape {list(manifest.shape)}")
    wanted = np.dtype(np.uint8) if manifest.kind == "image" else np.dtype(np.float32)
    if inputs.dtype != wanted:
        raise ValueError(f"holds {inputs.dtype} inputs; {manifest.kind} shards hold {wanted}")
    if manifest.num_classes and not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"holds {targets.dtype} targets; a {manifest.num_classes}-class split holds integer labels")
    return Record(inputs, targets, keys)


IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: such a label is dropped by the loss, not an error


def bad_sample_reasons(record: Record, manifest: Manifest) -> dict[int, str]:
    """Samples of a decoded record that must not reach the model: row -> why (labels out of range, non-finite inputs)."""
    reasons: dict[int, str] = dict(record.failures)
    if manifest.num_classes:
        labels = record.targets.reshape(len(record.keys), -1)
        out = ((labels < 0) | (labels >= manifest.num_classes)) & (labels != IGNORE_INDEX)
        for row in np.flatnonzero(out.any(1)).tolist():
            reasons[row] = f"label {labels[row][out[row]][0]} is outside [0, {manifest.num_classes})"
    if record.inputs.dtype.kind == "f":
        finite = np.isfinite(record.inputs.reshape(len(record.keys), -1)).all(1)
        for row in np.flatnonzero(~finite).tolist():
            reasons.setdefault(row, "inputs hold NaN or infinity")
    if record.targets.dtype.kind == "f":
        finite = np.isfinite(record.targets.reshape(len(record.keys), -1)).all(1)
        for row in np.flatnonzero(~finite).tolist():
            reasons.setdefault(row, "target is NaN or infinity")
    return reasons


def iter_shard(url: str, shard_name: str, first_record: int = 0, stream=None) -> Iterator[dict]:
    """Raw records of one shard through webdataset's own stages (gopen: local paths and pipe: URLs).

    Records before `first_record` are skipped by name: their bytes are passed over by tarfile, never decoded.
    A `stream` passed in (an open shard) stays open: its owner closes it.
    """
    from webdataset import tariterators
    from webdataset.gopen import gopen

    def select(fname: str) -> bool:
        try:
            return record_index(fname.split(".", 1)[0]) >= first_record
        except (ValueError, IndexError):
            return True  # not ours; group_by_keys keeps it and the reader names it

    owned = stream is None
    if owned:
        try:
            stream = gopen(url, "rb")
        except Exception as e:  # noqa: BLE001 - a missing file, a bad scheme: one error naming the shard
            raise open_failure(shard_name, url, e) from None
    finished = False
    try:
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}], select_files=select, eof_value=None)
        yield from tariterators.group_by_keys(files)
        finished = True
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure of the tar stream becomes one error naming the shard
        if isinstance(e, tarfile.TarError):  # a damaged header: tarfile says "bad checksum" or "truncated"
            raise DataError(
                f"shard {shard_name} is damaged ({url}): its tar structure cannot be read ({_first_arg(e)}); "
                "`dist-train data inspect` verifies every shard's checksum; prepare the data again or restore the file"
            ) from None
        raise DataError(f"shard {shard_name} cannot be read ({url}): {type(e).__name__}: {_first_arg(e)}") from None
    finally:
        if owned:
            close_shard_stream(stream, shard_name, url, finished)


def checked_records(url: str, entry: ShardEntry, counts: list[int], first_record: int, stream=None) -> Iterator[tuple[int, dict]]:
    """(record index, raw record) from `first_record` on, checking that the records come complete and in sequence."""
    expected = first_record
    for raw in iter_shard(url, entry.name, first_record, stream):
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


def close_shard_stream(stream, shard_name: str, url: str, finished: bool) -> None:
    try:
        stream.close()  # a pipe: URL reports its command's exit status here
    except Exception as e:  # noqa: BLE001
        # Stopping early (a resume, the end of a rank's range) makes the pipe's writer die of SIGPIPE: not an error.
        if finished:
            raise DataError(f"shard {shard_name} ({url}): {_first_arg(e)}") from None


def open_failure(shard_name: str, url: str, error: BaseException) -> DataError:
    """The one line for a shard that cannot be opened; a missing file says what to do about it."""
    if isinstance(error, FileNotFoundError):
        return DataError(
            f"shard {shard_name} does not exist ({url}): its manifest lists it; prepare the data again "
            "(dist-train data prepare ... --overwrite) or point data.path / data.shard_urls at a complete copy"
        )
    return DataError(f"shard {shard_name} cannot be opened ({url}): {type(error).__name__}: {_first_arg(error)}")


def _first_arg(error: BaseException) -> str:
    return str(error.args[0]) if error.args else str(error)


def verify_shard(directory: Path, entry: ShardEntry) -> Optional[str]:
    """None if the file matches its manifest entry, else what is wrong."""
    path = directory / entry.name
    if not path.is_file():
        return f"shard {path} is missing"
    size = path.stat().st_size
    if size != entry.bytes:
        return f"shard {path} has {size} bytes, the manifest says {entry.bytes} (truncated or rewritten)"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != entry.sha256:
        return f"shard {path}: sha256 {digest.hexdigest()[:12]}... does not match the manifest's {entry.sha256[:12]}... (corrupt)"
    return None


def find_manifests(path: Path) -> list[Path]:
    if (path / MANIFEST).is_file():
        return [path / MANIFEST]
    found = [path / split / MANIFEST for split in SPLITS if (path / split / MANIFEST).is_file()]
    if not found:
        raise DataError(f"{path} holds no {MANIFEST} (nor {path}/train/{MANIFEST}); prepare shards with `dist-train data prepare`")
    return found


# ---------------------------------------------------------------- the CLI commands


def _load_for_prepare(args: argparse.Namespace) -> SourceData:
    from ..models import ModelConfig, ModelSpec, model_spec

    if args.source not in SOURCES:
        raise DataError(f"--source {args.source} is unknown; use one of {', '.join(SOURCES)}")
    cfg = DataConfig(source=args.source, path=args.root, download=args.download)
    if args.source == "random":
        spec = model_spec(ModelConfig(name="two_layer_net"))
    else:  # only image_folder looks at the shape: it resizes every file to it
        size = args.image_size or 32
        spec = ModelSpec("shards", (3, size, size), "classification", 10)
    try:
        if args.source == "image_folder" and args.root:  # no model yet: the files' own channels
            data = read_image_folder(Path(args.root), cfg.test_fraction, (size, size))
            print(_image_folder_note(data, size), flush=True)
        else:
            data = SOURCES[args.source](cfg, spec)
    except ConfigError as e:  # the sources speak of config keys; here the user gave command-line flags
        flags = re.sub(r"data\.source=\S+", f"--source {args.source}", str(e))
        flags = flags.replace("set data.path to the dataset root", "pass --root DIR, the dataset root").replace("data.path=", "--root ")
        raise ConfigError(flags.replace("set data.download=true", "pass --download").replace("data.download=true", "--download")) from None
    if args.image_size and data.kind == "image":
        data.train, data.test = (_resized(s, args.image_size) for s in (data.train, data.test))
    elif args.image_size:
        raise DataError(f"--image-size applies to image sources; {args.source} holds vectors")
    return data


def _image_folder_note(data: SourceData, size: int) -> str:
    channels = data.train.inputs.shape[1]
    kept = "all grayscale: kept as 1 channel" if channels == 1 else "in colour (or some are): written as 3 channels (RGB)"
    return (
        f"image_folder: {len(data.train) + len(data.test)} images, {kept}, resized to {size}x{size} (--image-size); "
        f"a model taking {3 if channels == 1 else 1} channel(s) gets them {'repeated' if channels == 1 else 'averaged'} when it trains"
    )


def _resized(split: Split, size: int) -> Split:
    from .transforms import adapt_images

    channels = split.inputs.shape[1]
    images = [adapt_images(split.inputs[i : i + 1024], (channels, size, size)).mul_(255).round_().to(torch.uint8) for i in range(0, len(split), 1024)]
    return Split(torch.cat(images), split.targets, split.keys)


def _prepared(out: Path, options: dict) -> bool:
    """True when both splits are complete shard folders written with the same options (prepare is idempotent)."""
    for split in SPLITS:
        try:
            manifest = Manifest.load(out / split / MANIFEST)
        except DataError:
            return False
        if manifest.options != options:
            return False
        if any(not (manifest.directory / s.name).is_file() or (manifest.directory / s.name).stat().st_size != s.bytes for s in manifest.shards):
            return False
    return True


def prepare_command(args: argparse.Namespace) -> int:
    for flag, value in (("--samples-per-shard", args.samples_per_shard), ("--samples-per-record", args.samples_per_record)):
        if value <= 0:
            raise DataError(f"{flag} must be positive, got {value}")
    samples_per_record = min(args.samples_per_record, args.samples_per_shard)
    out = Path(args.out)
    options = {
        "source": args.source,
        "root": str(Path(args.root).resolve()) if args.root else None,
        "samples_per_shard": args.samples_per_shard,
        "samples_per_record": samples_per_record,
        "image_size": args.image_size,
        "shuffle_seed": None if args.no_shuffle else args.shuffle_seed,
    }
    if not args.overwrite and _prepared(out, options):
        print(f"{out}: already prepared with these options (pass --overwrite to write again)")
        return 0
    data = _load_for_prepare(args)
    write_prepared(data, out, args.samples_per_shard, samples_per_record, options)
    return 0


def write_prepared(data: SourceData, out: Path, samples_per_shard: int, samples_per_record: int, options: dict) -> None:
    """Both splits, each shuffled with options["shuffle_seed"] (None: the source's order) before it is cut into shards."""
    for split_name, split in (("train", data.train), ("test", data.test)):
        if options.get("shuffle_seed") is not None:
            split = shuffled(split, options["shuffle_seed"])
        manifest = write_split(split, out / split_name, split_name, data.kind, data.num_classes, samples_per_shard, samples_per_record, options)
        print(manifest.describe())


def shuffled(split: Split, seed: int) -> Split:
    """Sources such as image folders come sorted by class; a stream window over sorted shards would see few classes."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return Split(split.inputs[order], split.targets[order], [split.keys[i] for i in order.tolist()])


def inspect_command(args: argparse.Namespace) -> int:
    problems = []
    for path in find_manifests(Path(args.path)):
        manifest = Manifest.load(path)
        problems += report_checks(manifest.describe(), ((entry, verify_shard(manifest.directory, entry)) for entry in manifest.shards))
    return conclude_checks(problems)


def report_checks(summary: str, checks: Iterator[tuple[ShardEntry, Optional[str]]]) -> list[str]:
    """`data inspect`'s lines for one split (its own shards, or an index's: index.py): the problems found."""
    print(summary)
    problems = []
    for entry, problem in checks:
        print(f"  {entry.name}: {entry.count} samples, {entry.bytes} bytes, " + (problem or "sha256 ok"))
        if problem:
            problems.append(problem)
    return problems


def conclude_checks(problems: list[str]) -> int:
    if problems:
        raise DataError(f"{len(problems)} bad shard(s): " + "; ".join(problems))
    print("all checksums verified")
    return 0

