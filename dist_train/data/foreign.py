"""Webdataset shards that dist_train did not write, streamed as they are through the same loader.

An index (index.py) says, per shard, each sample's key, where its input member lies and its label. Here
that index becomes a `Manifest` whose records are runs of `samples_per_record` consecutive samples of a
shard: the node store (node_store.py) and the eval reader (streaming.py) ask the manifest to read and
decode its records, so the global order, the per-node decoded store, exact resume, remote shards with
the verified cache and bad-sample handling are the ones dist_train's own shards get.

Reading a shard is one pass over its bytes (decompressed when it is a .tar.gz/.bz2/.xz), slicing each
input member out where the index says it is, after checking that the tar header in front of it is intact
and gives the same size (a shard rewritten since it was indexed fails, naming it). Inputs are decoded
with PIL (images: the format its extension names first, then whatever PIL recognises, as webdataset's
image handler does) or webdataset's npy decoder, and fitted to the model by one rule, printed at start.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..config import ConfigError, DataConfig
from ..models import ModelSpec
from .index import (
    LABEL_MISSING, LABEL_OK, MANIFEST, SPLITS, SplitIndex, describe_index, expand_sources, index_on_first_use,
    is_index, load_index, requested_fields,
)  # fmt: skip
from .shards import DataError, Manifest, Record, ShardEntry

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}  # decoded as one channel ("L"); the rest as RGB
PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "ppm": "PPM", "pgm": "PPM", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF", "gif": "GIF"}
HEADER = 512  # a tar header block


# ---------------------------------------------------------------- the input rule


@dataclass(frozen=True)
class InputRule:
    """How an input member becomes the stored array: decoded, converted to `mode`, resized to `resize_to`."""

    field: str
    decoder: str  # "image" | "npy"
    kind: str  # "image" (uint8 CHW) | "vector" (float32)
    shape: tuple[int, ...]  # as stored in the node store
    mode: Optional[str] = None  # PIL mode images are converted to (L, RGB)
    resize_to: Optional[tuple[int, int]] = None  # (height, width): images of varying size, resized when decoded
    channels_last: bool = False  # npy arrays stored HWC

    def decode(self, payload: bytes) -> np.ndarray:
        array = self._image(payload) if self.decoder == "image" else self._array(payload)
        if array.shape != self.shape:
            raise ValueError(f"holds {_shape_text(array.shape)}, the index promises {_shape_text(self.shape)} (the shard changed since it was indexed?)")
        return array

    def _image(self, payload: bytes) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        hint = PIL_FORMATS.get(self.field.rsplit(".", 1)[-1])
        try:  # naming the format skips PIL's probing of every plugin: ~25% of a small PNG's decode
            image = Image.open(io.BytesIO(payload), formats=(hint,) if hint else None)
        except UnidentifiedImageError:
            image = Image.open(io.BytesIO(payload))  # a .jpg that is a PNG: webdataset's decoder reads it too
        with image:
            if image.mode != self.mode:  # convert() copies even when the mode is already right
                image = image.convert(self.mode)
            if self.resize_to is not None:
                image = image.resize((self.resize_to[1], self.resize_to[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def _array(self, payload: bytes) -> np.ndarray:
        array = _npy_loads(payload)
        if self.kind == "vector":
            return array.astype(np.float32, copy=False)
        if array.dtype != np.uint8:
            raise ValueError(f"holds a {array.dtype} array, the index promises uint8")
        if array.ndim == 2:
            return array[None]
        return array.transpose(2, 0, 1) if self.channels_last else array

    def describe(self, holds: dict, model_shape: tuple[int, ...]) -> str:
        seen = _holds_summary(holds)
        target = _shape_text(model_shape)
        if self.kind == "vector":
            return f"{self.field} {seen} -> {target}: as float32"
        if self.resize_to is not None:
            return f"{self.field} {seen} -> {target}: converted to {self.mode} and resized (PIL bilinear) as decoded, scaled to [0,1]"
        steps = []
        stored, wanted = self.shape[0], model_shape[0] if len(model_shape) == 3 else self.shape[0]
        if stored != wanted:
            steps.append("the gray channel repeated" if stored == 1 else "channels averaged")
        if len(model_shape) == 3 and self.shape[1:] != model_shape[1:]:
            steps.append("bilinear resize per batch")
        if len(model_shape) != 3:
            steps.append("flattened")
        return f"{self.field} {seen} -> {target}: " + ", ".join([*steps, "scaled to [0,1]"])


_NPY_HEADERS: dict[bytes, tuple[int, np.dtype, tuple[int, ...], int]] = {}  # header bytes -> (data offset, dtype, shape, size)


def _npy_loads(payload: bytes) -> np.ndarray:
    """webdataset's npy decoder (numpy's read_array, allow_pickle stays False), with the parse of a header
    seen before reused: the arrays of one set share their header, and parsing it is most of a small array's
    decode (10 instead of 156 us for a 28x28 uint8 array, measured on the loaded 2-core CI machine)."""
    if payload[:6] == b"\x93NUMPY" and payload[6:7] == b"\x01":
        end = 10 + int.from_bytes(payload[8:10], "little")
        known = _NPY_HEADERS.get(payload[:end])
        if known is not None:
            offset, dtype, shape, count = known
            return np.frombuffer(payload, dtype, count=count, offset=offset).reshape(shape)
    from webdataset.autodecode import npy_loads

    array = npy_loads(payload)
    if payload[6:7] == b"\x01" and not array.dtype.hasobject and array.flags.c_contiguous and len(_NPY_HEADERS) < 64:
        end = 10 + int.from_bytes(payload[8:10], "little")
        _NPY_HEADERS[payload[:end]] = (end, array.dtype, array.shape, array.size)
    return array


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _holds_summary(holds: dict) -> str:
    if len(holds) == 1:
        return next(iter(holds))
    return f"({len(holds)} kinds, e.g. {', '.join(list(holds)[:3])})"


def input_rule(indexes: dict[str, SplitIndex], spec: ModelSpec) -> InputRule:
    """The one rule for both splits, from what their input members hold (their headers, read by the index)."""
    field, decoder = indexes["train"].fields.input, indexes["train"].raw["input"]["decoder"]
    holds: dict[str, int] = {}
    for index in indexes.values():
        for kind, n in index.raw["input"]["holds"].items():
            holds[kind] = holds.get(kind, 0) + n
    if not holds:
        raise DataError(f"index {indexes['train'].path}: no sample has a readable {field} member")
    if decoder == "npy":
        return _npy_rule(field, holds, spec, indexes["train"].path)
    modes = {h.split()[0] for h in holds}
    sizes = {tuple(int(d) for d in h.split()[1].split("x")) for h in holds}
    mode = "L" if modes <= GRAY_MODES else "RGB"
    if len(sizes) == 1:
        width, height = next(iter(sizes))
        return InputRule(field, "image", "image", (1 if mode == "L" else 3, height, width), mode)
    if len(spec.input_shape) != 3 or spec.input_shape[0] not in (1, 3):
        raise ConfigError(f"{field} images of {len(sizes)} sizes need a model taking [1 or 3, H, W] images to be resized to; model.name={spec.name} takes {list(spec.input_shape)}")
    channels, height, width = spec.input_shape
    return InputRule(field, "image", "image", spec.input_shape, "L" if channels == 1 else "RGB", (height, width))


def _npy_rule(field: str, holds: dict, spec: ModelSpec, where: Path) -> InputRule:
    if len(holds) != 1:
        raise DataError(f"index {where}: the {field} arrays are of {len(holds)} kinds ({', '.join(list(holds)[:3])}); dist_train needs one dtype and shape")
    dtype_text, shape_text = next(iter(holds)).split(" ", 1)
    shape = tuple(int(d) for d in shape_text.strip("[]").split(",") if d.strip())
    if dtype_text == "uint8" and len(shape) == 2:
        return InputRule(field, "npy", "image", (1, *shape))
    if dtype_text == "uint8" and len(shape) == 3 and (shape[0] in (1, 3) or shape[-1] in (1, 3)):
        channels_last = shape[0] not in (1, 3)
        return InputRule(field, "npy", "image", (shape[2], shape[0], shape[1]) if channels_last else shape, channels_last=channels_last)
    if shape != tuple(spec.input_shape):
        raise ConfigError(f"{field} holds {dtype_text} arrays of shape {list(shape)}; model.name={spec.name} takes {list(spec.input_shape)} (uint8 [H, W] or [C, H, W] arrays are read as images)")
    return InputRule(field, "npy", "vector", shape)


# ---------------------------------------------------------------- the manifest of an indexed split


@dataclass(frozen=True)
class ForeignManifest(Manifest):
    """A split of an index, bound to a model's input (picklable: DataLoader workers get it in their plan)."""

    urls: tuple[str, ...]
    members: Path  # the index's per-shard members tables
    rule: InputRule
    target_field: str
    class_numbers: Optional[tuple[int, ...]]  # this split's class-name numbers -> the run's (both splits' names)

    def shard_urls(self) -> tuple[str, ...]:
        return self.urls

    def read_records(self, url: str, entry: ShardEntry, first_record: int, stream) -> Iterator[tuple[int, dict]]:
        """(record index, the record's input payloads, keys and labels) from `first_record` on."""
        table = np.load(self.members / f"{self.shards.index(entry):06d}.npz", allow_pickle=False)
        keys, where, labels, status = table["keys"].tolist(), table["input"], table["label"], table["status"]
        counts = self.records_in(entry)
        reader = MemberReader(stream, url, entry)
        try:
            for r in range(first_record, len(counts)):
                lo, hi = r * self.samples_per_record, r * self.samples_per_record + counts[r]
                payloads = [reader.member(int(offset), int(size)) if size >= 0 else None for offset, size in where[lo:hi]]
                name = keys[lo] if hi - lo == 1 else f"{keys[lo]}..{keys[hi - 1]}"
                yield r, {"__key__": name, "keys": keys[lo:hi], "payloads": payloads, "label": labels[lo:hi], "status": status[lo:hi]}
            reader.finish()
        finally:
            reader.detach()

    def decode(self, raw: dict, count: int) -> Record:
        """Decoded inputs and labels; a sample that fails is returned in `failures` (data.skip_bad_samples decides)."""
        inputs = np.zeros((count, *self.shape), np.uint8 if self.kind == "image" else np.float32)
        failures: dict[int, str] = {}
        for row, (key, payload) in enumerate(zip(raw["keys"], raw["payloads"])):
            if payload is None:
                failures[row] = f"sample {key} has no {self.rule.field} member"
                continue
            try:
                inputs[row] = self.rule.decode(payload)
            except Exception as e:  # noqa: BLE001 - PIL and numpy raise many kinds; the sample is bad, named
                failures[row] = f"sample {key}: its {self.rule.field} member fails to decode ({type(e).__name__}: {e})"
        for row in np.flatnonzero(raw["status"] != LABEL_OK).tolist():
            missing = raw["status"][row] == LABEL_MISSING
            failures.setdefault(row, f"sample {raw['keys'][row]} " + (f"has no {self.target_field} member" if missing else f"has an unreadable label in {self.target_field}"))
        labels = raw["label"].astype(np.int64)
        if self.class_numbers is not None:
            labels = np.asarray(self.class_numbers, np.int64)[labels]
        return Record(inputs, labels, list(raw["keys"]), failures)

    def describe(self) -> str:
        return describe_index(load_index(self.path))


class MemberReader:
    """A shard's byte stream read once, front to back, handing out members at the offsets the index gives."""

    def __init__(self, stream, url: str, entry: ShardEntry) -> None:
        self.url, self.entry = url, entry
        self.buffered = io.BufferedReader(stream, 1 << 20)  # detached at the end: the caller owns `stream`
        try:
            self.tar = _decompressed(self.buffered)
        except BaseException:
            self.buffered.detach()  # a collected BufferedReader would close the caller's stream
            raise
        self.position = 0  # in the (uncompressed) tar stream

    def member(self, offset: int, size: int) -> bytes:
        if offset < self.position + HEADER:
            raise DataError(f"shard {self.entry.name} ({self.url}): the index lists members out of order; write the index again (`dist-train data index`)")
        self._skip(offset - HEADER - self.position)
        block = self._read(HEADER + size)
        if not _header_says(block[:HEADER], size):
            raise DataError(
                f"shard {self.entry.name} ({self.url}) changed since it was indexed: no tar header of a {size}-byte member "
                f"at byte {offset - HEADER}; index it again (`dist-train data index`, or clear data.cache_dir/index)"
            )
        return block[HEADER:]

    def finish(self) -> None:
        """Read to the end: a shard shorter or longer than the index says has changed."""
        while self.buffered.read(1 << 20):
            pass
        read = getattr(self.buffered.raw, "bytes_read", None)
        if read is not None and read != self.entry.bytes:
            raise DataError(f"shard {self.entry.name} ({self.url}) has {read} bytes, the index says {self.entry.bytes}: it changed since it was indexed; index it again")

    def detach(self) -> None:
        if self.tar is not self.buffered:
            self.tar.close()  # a decompressor given a file object leaves that object open
        try:
            self.buffered.detach()
        except ValueError:
            pass  # already closed by the owner

    def _skip(self, count: int) -> None:
        while count > 0:
            count -= len(self._read(min(count, 1 << 20)))

    def _read(self, count: int) -> bytes:
        data = self.tar.read(count)
        self.position += len(data)
        if len(data) < count:
            raise DataError(f"shard {self.entry.name} ({self.url}) is truncated: it ends at byte {self.position} of its tar stream; restore it or index it again")
        return data


def _decompressed(buffered: io.BufferedReader):
    """The tar stream of a shard: as it is, or through gzip/bz2/xz (what tarfile's "r|*" recognises by magic)."""
    magic = buffered.peek(6)[:6]
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=buffered, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(buffered, mode="rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(buffered, mode="rb")
    return buffered


def _header_says(header: bytes, size: int) -> bool:
    """A tar header block with a valid checksum whose size field is `size` (0 when a PAX record holds it)."""
    try:
        checksum = tarfile.nti(header[148:156])
        stored = tarfile.nti(header[124:136])
    except (tarfile.InvalidHeaderError, ValueError):
        return False
    if not (stored == size or (stored == 0 and size >= 8**11)):
        return False
    # The unsigned sum (the checksum field counted as spaces) is what writers use; tarfile also accepts the
    # signed one of old Sun tars. sum() over bytes first: a quarter of calc_chksums' cost per member.
    return checksum == sum(header) - sum(header[148:156]) + 256 or checksum in tarfile.calc_chksums(header)


# ---------------------------------------------------------------- opening an index for training


def index_root(cfg: DataConfig) -> Optional[Path]:
    """Where the run's index is: data.path itself when it holds an index; one built on first use in
    data.cache_dir for data.path holding webdataset tars without one, or data.shard_urls without data.path;
    None for dist_train's own shards."""
    fields = requested_fields(cfg.fields)
    if cfg.path:
        path = Path(cfg.path)
        if is_index(path / "train" / MANIFEST) or is_index(path / "test" / MANIFEST):
            return path
        if (path / "train" / MANIFEST).is_file() or not path.is_dir():
            return None
        try:
            expand_sources([str(path)])
        except DataError:
            return None  # neither shards of ours nor tars: the manifest reader says what is missing
        return index_on_first_use([str(path)], cfg.cache_dir, fields, f"data.path={path}")
    if cfg.shard_urls:
        sources = [cfg.shard_urls.replace("{split}", s) for s in SPLITS] if "{split}" in cfg.shard_urls else [cfg.shard_urls]
        return index_on_first_use(sources, cfg.cache_dir, fields, f"data.shard_urls={cfg.shard_urls} (no data.path)")
    return None


def open_foreign(cfg: DataConfig, spec: ModelSpec) -> Optional[dict[str, ForeignManifest]]:
    """Both splits of an index bound to the model; None when data.path holds dist_train's own shards."""
    root = index_root(cfg)
    if root is None:
        if cfg.fields and cfg.path:
            raise ConfigError(f"data.fields applies to webdataset shards dist_train did not write; data.path={cfg.path} holds shards of `dist-train data prepare` (drop data.fields)")
        return None
    indexes = {}
    for split in SPLITS:
        if not (root / split / MANIFEST).is_file():
            raise DataError(f"index {root} has no {split} split ({root / split / MANIFEST}); index its shards with `dist-train data index SHARDS --split {split} --out {root}`")
        indexes[split] = load_index(root / split / MANIFEST)
    _check_fields(indexes, requested_fields(cfg.fields), root)
    rule = input_rule(indexes, spec)
    names = sorted({n for index in indexes.values() for n in index.raw["target"].get("names") or []})
    num_classes = len(names) if names else max(int(index.raw["target"]["classes"]) for index in indexes.values())
    return {split: _bound(index, rule, names, num_classes) for split, index in indexes.items()}


def _check_fields(indexes: dict[str, SplitIndex], requested: dict, root: Path) -> None:
    train, test = indexes["train"].fields, indexes["test"].fields
    if train != test:
        raise DataError(f"index {root}: the train split maps {train.as_dict()}, the test split {test.as_dict()}; index both with the same --input/--target")
    named = {split: bool(index.raw["target"].get("names")) for split, index in indexes.items()}
    if named["train"] != named["test"]:
        raise DataError(f"index {root}: one split's labels are class names, the other's integers; both splits need the same kind of label")
    differing = {k: v for k, v in requested.items() if train.as_dict()[k] != v}
    if differing:
        key = next(iter(differing))
        raise ConfigError(
            f"data.fields.{key}={differing[key]}, but the index at {root} was built with {key}={train.as_dict()[key]}; "
            f"index the shards again with --{key} {differing[key]}, or drop data.fields.{key}"
        )


def _bound(index: SplitIndex, rule: InputRule, names: list[str], num_classes: int) -> ForeignManifest:
    own_names = index.raw["target"].get("names")
    numbers = tuple(names.index(n) for n in own_names) if own_names else None
    return ForeignManifest(
        index.path, index.split, rule.kind, rule.shape, num_classes, int(index.raw["samples_per_record"]), index.entries,
        {"index": str(index.path), **index.fields.as_dict()}, index.urls, index.members, rule, index.fields.target, numbers,
    )


def describe_plan(manifests: dict[str, ForeignManifest], spec: ModelSpec) -> str:
    """The line shown at start: where the index is, how inputs become the model's, what the classes are."""
    train = manifests["train"]
    holds: dict[str, int] = {}
    for m in manifests.values():
        for kind, n in load_index(m.path).raw["input"]["holds"].items():
            holds[kind] = holds.get(kind, 0) + n
    names = load_index(train.path).raw["target"].get("names")
    classes = f"{train.num_classes} classes ({', '.join(f'{n}={i}' for i, n in enumerate(names[:4]))}{', ...' if len(names) > 4 else ''})" if names else f"{train.num_classes} classes (0..{train.num_classes - 1})"
    return (
        f"webdataset shards read as they are (index {train.directory.parent}): input {train.rule.describe(holds, spec.input_shape)}; "
        f"target {train.target_field}: {classes}"
    )
