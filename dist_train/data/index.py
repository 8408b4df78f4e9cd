"""An index of webdataset shards that dist_train did not write: `dist-train data index`, and on first use.

Layout of one split of an index (INDEX/train, INDEX/test)::

    members-<token>/000000.npz ...   per shard, in stream order: each sample's key, where its input member's
                                     bytes lie in the (uncompressed) tar stream, and its label
    manifest.json                    written last: shards (url, samples, bytes, sha256), fields seen, the input
                                     and target fields with what they hold, the classes

The tars themselves are never written, moved or renamed: the index lives where `--out` says (or, built
on first use, in `data.cache_dir/index/`), so a read-only or remote shard set is indexed the same way.

Samples are found exactly as webdataset finds them: the tar members that `tariterators.tar_file_iterator`
keeps (regular files, not `__meta__` files), grouped by webdataset's own `tariterators.group_by_keys`
(consecutive members sharing the name before the first dot of their basename; the rest, lower-cased,
is the field). The index records where each input member's data starts, because Python's tar reader
spends ~115 us per member on the 2-core CI machine (ShardWriter gives every member a PAX header: two
headers each), more than decoding a small PNG: training then reads each shard's bytes in one pass and
slices the members out (foreign.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import tarfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..config import ConfigError
from ..files import atomic_write
from .remote import CountingReader, _open_url, file_lock, is_remote
from .shards import DataError, ShardEntry, conclude_checks, report_checks

FORMAT = "dist_train.index/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
SAMPLES_PER_RECORD = 256  # samples decoded together (one node-store record): amortises per-record work
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")

# webdataset's conventions (autodecode.py): the extensions its image handler decodes, first the ones named
# in its docs; npy arrays; integer or class-name labels; a json member holding the label.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")
INPUT_FIELDS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "npy")
TARGET_FIELDS = ("cls", "label", "target", "class", "json")
JSON_LABEL_KEYS = ("label", "cls", "class", "target")
INT_ONLY_FIELDS = ("cls", "cls2")  # webdataset decodes these with int(data)

# tariterators.tar_file_iterator's default `skip_meta` (tests/test_foreign.py checks they agree)
SKIP_META = r"__[^/]*__($|/)"

# per-sample label status in a members table
LABEL_OK, LABEL_MISSING, LABEL_UNREADABLE = 0, 1, 2


# ---------------------------------------------------------------- which fields


@dataclass(frozen=True)
class Fields:
    """The member that is a sample's input and the one holding its label (`json:key` names a json key)."""

    input: str
    target: str

    @property
    def target_member(self) -> str:
        return self.target.split(":", 1)[0]

    @property
    def target_key(self) -> Optional[str]:
        return self.target.split(":", 1)[1] if ":" in self.target else None

    @property
    def input_decoder(self) -> str:
        ext = self.input.rsplit(".", 1)[-1]
        return "npy" if ext == "npy" else "image"

    def as_dict(self) -> dict:
        return {"input": self.input, "target": self.target}


CONFIG_NAMES = {"input": "data.fields.input", "target": "data.fields.target"}
FLAG_NAMES = {"input": "--input", "target": "--target"}


def requested_fields(fields: dict, names: dict = CONFIG_NAMES) -> dict:
    """`data.fields` (or `data index --input/--target`, `names` FLAG_NAMES) checked and normalised: only
    `input` and `target`, an input dist_train can decode."""
    unknown = sorted(set(fields) - {"input", "target"})
    if unknown:
        raise ConfigError(f"data.fields.{unknown[0]} is not a field dist_train maps; data.fields takes input (e.g. png, seg.png, npy) and target (e.g. cls, 'json:category')")
    for name, value in fields.items():
        if not isinstance(value, str) or not value.strip(". :"):
            raise ConfigError(f"{names[name]} must be a member's extension such as png or json:label, got {value!r}")
    if "input" in fields:
        ext = fields["input"].lower().rsplit(".", 1)[-1]
        if ext != "npy" and ext not in IMAGE_EXTENSIONS:
            raise ConfigError(f"{names['input']}={fields['input']}: dist_train decodes images ({', '.join(IMAGE_EXTENSIONS)}) and npy arrays; name such a member")
    normal = {}
    for name, value in fields.items():  # field names are lower-cased as group_by_keys does; a json key keeps its case
        member, colon, key = value.partition(":")
        normal[name] = member.lower() + colon + key
    return normal


def choose_fields(sample: dict, requested: dict, where: str) -> Fields:
    """The fields, from `requested` or by webdataset's conventions in the first sample that has an input."""
    input_field = requested.get("input") or next((f for f in INPUT_FIELDS if f in sample), None)
    if input_field is None or input_field not in sample:
        raise DataError(
            f"{where}: sample {sample['__key__']} has no {input_field or 'image or npy'} member (it has {_field_list(sample)}); "
            "name the input member with --input EXT (data.fields.input=EXT)"
        )
    target = requested.get("target")
    if target is None:
        target = next((f for f in TARGET_FIELDS if f in sample and f != "json"), None)
        if target is None and "json" in sample and _json_label(sample["json"].data, None) is not None:
            target = "json"
    if target is None or target.split(":", 1)[0] not in sample:
        raise DataError(
            f"{where}: sample {sample['__key__']} has no {target or 'cls, label, target or json label'} member (it has {_field_list(sample)}); "
            "name the label member with --target EXT, or EXT:KEY for a key of a json member (data.fields.target=...)"
        )
    return Fields(input_field, target)


def _field_list(sample: dict) -> str:
    return ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "no members"


# ---------------------------------------------------------------- reading a shard as webdataset does


@dataclass
class Member:
    """A tar member's data and where it lies in the uncompressed tar stream."""

    offset: int
    size: int
    data: bytes


def tar_members(stream, url: str) -> Iterator[dict]:
    """The members `webdataset.tariterators.tar_file_iterator` yields, as {fname, data: Member}, in order."""
    from webdataset.tariterators import meta_prefix, meta_suffix

    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        name = info.name
        if not info.isreg() or name is None:
            continue
        if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
            continue
        if re.match(SKIP_META, name):
            continue
        if info.issparse():
            raise DataError(f"shard {url}: member {name} is a sparse file; dist_train reads members by offset, write the shard without sparse files")
        yield {"fname": name, "data": Member(info.offset_data, info.size, tar.extractfile(info).read()), "__url__": url}
        tar.members = []  # as webdataset does: a streamed tar must not keep every TarInfo


def samples_of(stream, url: str) -> Iterator[dict]:
    """webdataset's samples of one shard ({__key__, field: Member}), grouped by its own group_by_keys."""
    from webdataset.tariterators import group_by_keys

    yield from group_by_keys(tar_members(stream, url))


# ---------------------------------------------------------------- what a member holds


def _json_label(data: bytes, key: Optional[str]):
    """The label a json member holds (a number or name, or the value of a label key), None if it holds none."""
    value = json.loads(data)
    if key is not None:
        for part in key.split("."):
            value = value[part]
        return value
    if isinstance(value, dict):
        found = next((k for k in JSON_LABEL_KEYS if k in value), None)
        return value[found] if found is not None else None
    return value


def parse_label(fields: Fields, data: bytes):
    """An int class or a class name, decoded as webdataset does (cls: int(data); json: json.loads)."""
    member = fields.target_member
    ext = member.rsplit(".", 1)[-1]
    if ext in ("json", "jsn"):
        value = _json_label(data, fields.target_key)
    elif ext in INT_ONLY_FIELDS:
        value = int(data)
    else:
        text = data.decode("utf-8").strip()
        value = int(text) if re.fullmatch(r"[+-]?\d+", text) else text
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise ValueError(f"{member} holds {value!r}, not an integer class or a class name")
    return value


def input_header(decoder: str, data: bytes) -> str:
    """What an input member holds, from its header only: "L 8x8" for an image, "uint8 [8, 8]" for an array."""
    if decoder == "npy":
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)  # the header alone, no data
        return f"{dtype} {list(shape)}"
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header, decodes no pixels
        return f"{image.mode} {image.size[0]}x{image.size[1]}"


# ---------------------------------------------------------------- indexing a shard set


@dataclass
class SplitScan:
    """One split being indexed: its shards' entries and members tables, and what its samples hold."""

    split: str
    fields: Optional[Fields] = None
    entries: list[ShardEntry] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    seen: Counter = field(default_factory=Counter)  # field -> samples holding it
    inputs: Counter = field(default_factory=Counter)  # input header -> samples
    input_missing: int = 0
    input_unreadable: int = 0
    labels: Counter = field(default_factory=Counter)  # label value -> samples
    label_missing: int = 0
    label_unreadable: int = 0


def shard_name(url: str) -> str:
    """The file name a URL ends in (a pipe: command's last word): how data.shard_urls and messages name a shard."""
    last = url.split()[-1] if url.startswith("pipe:") else url
    return last.rstrip("'\"").rsplit("/", 1)[-1].split("?", 1)[0]


def scan_shard(url: str, scan: SplitScan, requested: dict) -> None:
    name = shard_name(url)
    reader = CountingReader(_open_url(url, name), hashing=True)
    buffered = io.BufferedReader(reader, 1 << 20)  # tarfile reads 512-byte blocks: one call down per block otherwise
    keys, offsets, sizes, labels, status = [], [], [], [], []
    try:
        for sample in samples_of(buffered, url):
            if scan.fields is None:
                scan.fields = choose_fields(sample, requested, f"shard {url}")
            _scan_sample(sample, scan, keys, offsets, sizes, labels, status)
        while buffered.read(1 << 20):  # the padding after the end-of-archive blocks is part of the checksum
            pass
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged tar, a refused download: one line naming the shard
        raise DataError(f"shard {url} cannot be indexed: {type(e).__name__}: {e.args[0] if e.args else e}") from None
    finally:
        buffered.close()  # and the stream under it (a pipe: command reports its exit status here)
    assert reader.sha256 is not None
    scan.entries.append(ShardEntry(name, len(keys), reader.bytes_read, reader.sha256.hexdigest()))
    scan.urls.append(url)
    scan.tables.append({
        "keys": np.array(keys, dtype=str), "input": np.array([offsets, sizes], np.int64).T.reshape(-1, 2),
        "label": np.array(labels, np.int64) if all(isinstance(v, int) for v in labels) else np.array(labels, object),
        "status": np.array(status, np.int8),
    })


def _scan_sample(sample: dict, scan: SplitScan, keys, offsets, sizes, labels, status) -> None:
    fields = scan.fields
    assert fields is not None
    scan.seen.update(k for k in sample if not k.startswith("__"))
    keys.append(sample["__key__"])
    member = sample.get(fields.input)
    if member is None:
        scan.input_missing += 1
        offsets.append(-1)
        sizes.append(-1)
    else:
        offsets.append(member.offset)
        sizes.append(member.size)
        try:
            scan.inputs[input_header(fields.input_decoder, member.data)] += 1
        except Exception:  # noqa: BLE001 - training marks it bad (data.skip_bad_samples) with the decoder's own error
            scan.input_unreadable += 1
    target = sample.get(fields.target_member)
    value, state = 0, LABEL_OK
    if target is None:
        state = LABEL_MISSING
        scan.label_missing += 1
    else:
        try:
            value = parse_label(fields, target.data)
            scan.labels[value] += 1
        except Exception:  # noqa: BLE001 - as above: a bad sample at training, counted here
            value, state = 0, LABEL_UNREADABLE
            scan.label_unreadable += 1
    labels.append(value)
    status.append(state)


def class_summary(labels: Counter, where: str) -> dict:
    """Integer labels: classes 0..max; class names: sorted, numbered in that order."""
    names = sorted(v for v in labels if isinstance(v, str))
    numbers = sorted(v for v in labels if isinstance(v, int))
    if names and numbers:
        raise DataError(f"{where}: labels are both integers and class names (e.g. {numbers[0]} and {names[0]!r}); use one kind")
    if names:
        return {"names": names, "classes": len(names)}
    valid = [v for v in numbers if v >= 0]
    return {"names": None, "classes": (max(valid) + 1) if valid else 0, "min": numbers[0] if numbers else None, "max": numbers[-1] if numbers else None}


def write_split_index(scan: SplitScan, out: Path) -> Path:
    """members-<token>/ first, then manifest.json naming it (atomically); the previous members folder goes last."""
    assert scan.fields is not None
    out.mkdir(parents=True, exist_ok=True)
    classes = class_summary(scan.labels, f"split {scan.split}")
    folder = f"members-{uuid.uuid4().hex[:8]}"
    tmp = out / f".{folder}.tmp"
    tmp.mkdir()
    for i, table in enumerate(scan.tables):
        label = table["label"]
        if label.dtype == object:  # class names -> their numbers
            number = {name: n for n, name in enumerate(classes["names"] or [])}
            label = np.array([number.get(v, 0) if s == LABEL_OK else 0 for v, s in zip(label.tolist(), table["status"].tolist())], np.int64)
        np.savez(tmp / f"{i:06d}.npz", keys=table["keys"], input=table["input"], label=label, status=table["status"])
    tmp.rename(out / folder)
    old = _members_folder(out / MANIFEST)
    manifest = {
        "format": FORMAT,
        "split": scan.split,
        "num_samples": sum(e.count for e in scan.entries),
        "samples_per_record": SAMPLES_PER_RECORD,
        "members": folder,
        "fields_seen": dict(sorted(scan.seen.items())),
        "input": {"field": scan.fields.input, "decoder": scan.fields.input_decoder, "holds": dict(scan.inputs.most_common()),
                  "missing": scan.input_missing, "unreadable": scan.input_unreadable},
        "target": {"field": scan.fields.target, **classes, "missing": scan.label_missing, "unreadable": scan.label_unreadable},
        "shards": [{**vars(e), "url": url} for e, url in zip(scan.entries, scan.urls)],
    }
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1))
    os.chmod(out / MANIFEST, 0o644)  # readable like the members tables beside it (atomic_write's temporary file is 0600)
    if old and old != folder:
        shutil.rmtree(out / old, ignore_errors=True)
    return out / MANIFEST


def _members_folder(manifest: Path) -> Optional[str]:
    try:
        return str(json.loads(manifest.read_text()).get("members"))
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------- which shards, which split


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def split_of(url: str) -> Optional[str]:
    """train for names (or folders) starting with train; test for test, val, valid, validation, eval, dev."""
    last = url.split()[-1] if url.startswith("pipe:") else url
    parts = [p.lower() for p in last.rstrip("'\"").split("?", 1)[0].split("/")][::-1]
    for part in parts[:2]:
        if part.startswith("train"):
            return "train"
        if part.startswith(("test", "val", "eval", "dev")):
            return "test"
    return None


def expand_sources(sources: Sequence[str]) -> list[str]:
    """Directories (their tars, and those of their train/test/val sub-folders), tar paths, brace patterns and URLs."""
    from webdataset.shardlists import expand_urls

    urls: list[str] = []
    for source in sources:
        path = Path(source)
        if not is_remote(source) and path.is_dir():
            found = _tars_in(path)
            for sub in sorted(p for p in path.iterdir() if p.is_dir() and split_of(p.name + "/x")):
                found += _tars_in(sub)
            if not found:
                raise DataError(f"{path} holds no tar shards ({', '.join(TAR_SUFFIXES)} files, or train/ and test/ folders of them)")
            urls += found
            continue
        for url in expand_urls(source):
            if is_remote(url):
                urls.append(url)
            elif not Path(url).is_file():
                raise DataError(f"shard {url} does not exist")
            else:
                urls.append(str(Path(url).resolve()))
    return urls


def _tars_in(folder: Path) -> list[str]:
    return sorted(str(p.resolve()) for p in folder.iterdir() if p.is_file() and is_tar_name(p.name))


def assign_splits(urls: Sequence[str], split: str) -> dict[str, list[str]]:
    if split != "auto":
        return {split: list(urls)}
    by_split: dict[str, list[str]] = {}
    for url in urls:
        which = split_of(url)
        if which is None:
            raise DataError(
                f"shard {url}: its name tells no split (neither it nor its folder starts with train, test or val); "
                "index each split on its own with --split train / --split test"
            )
        by_split.setdefault(which, []).append(url)
    return by_split


def build_index(sources: Sequence[str], out: Path, split: str = "auto", fields: Optional[dict] = None, say=print) -> dict[str, Path]:
    """Index `sources` into OUT/<split>/; returns each split's manifest path. `fields`: checked by requested_fields."""
    urls = expand_sources(sources)
    if not urls:
        raise DataError(f"{' '.join(sources)} names no shards")
    by_split = assign_splits(urls, split)
    chosen: Optional[Fields] = None
    written = {}
    for name in SPLITS:
        if name not in by_split:
            continue
        scan = SplitScan(name, fields=chosen)
        for url in by_split[name]:
            scan_shard(url, scan, fields or {})
        if scan.fields is None:
            raise DataError(f"the {name} shards ({by_split[name][0]} ...) hold no samples")
        chosen = scan.fields  # the test split maps the same fields as the train split
        written[name] = write_split_index(scan, out / name)
        say(describe_index(load_index(written[name])))
    return written


# ---------------------------------------------------------------- reading an index


@dataclass(frozen=True)
class SplitIndex:
    path: Path
    raw: dict

    @property
    def split(self) -> str:
        return str(self.raw["split"])

    @property
    def fields(self) -> Fields:
        return Fields(str(self.raw["input"]["field"]), str(self.raw["target"]["field"]))

    @property
    def entries(self) -> tuple[ShardEntry, ...]:
        return tuple(ShardEntry(str(s["name"]), int(s["count"]), int(s["bytes"]), str(s["sha256"])) for s in self.raw["shards"])

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(str(s["url"]) for s in self.raw["shards"])

    @property
    def members(self) -> Path:
        return self.path.parent / str(self.raw["members"])

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.entries)


def is_index(manifest: Path) -> bool:
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_index(path: Path) -> SplitIndex:
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
        index = SplitIndex(path, raw)
        index.entries, index.fields, int(raw["samples_per_record"])  # noqa: B018 - every key a reader needs is there
        int(raw["target"]["classes"])
    except OSError as e:
        raise DataError(f"index {path} cannot be read: {e.strerror or e}; run `dist-train data index SHARDS --out DIR`") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a dist_train shard index: {e}; write it again with `dist-train data index`") from None
    if not index.members.is_dir():
        raise DataError(f"index {path}: its members folder {index.members} is missing; write the index again with `dist-train data index`")
    return index


def describe_index(index: SplitIndex) -> str:
    raw = index.raw
    size = sum(e.bytes for e in index.entries)
    target = raw["target"]
    classes = f"{target['classes']} classes" + (f" ({', '.join(target['names'][:5])}{', ...' if len(target['names']) > 5 else ''})" if target.get("names") else "")
    holds = ", ".join(f"{k} x{v}" for k, v in list(raw["input"]["holds"].items())[:4]) + (", ..." if len(raw["input"]["holds"]) > 4 else "")
    problems = [f"{raw[k][p]} {p} {k}" for k in ("input", "target") for p in ("missing", "unreadable") if raw[k][p]]
    return (
        f"{index.path.parent}: split={index.split} {index.num_samples} samples in {len(index.entries)} webdataset shards "
        f"({size / 2**20:.2f} MiB, indexed, not rewritten); fields {', '.join(f'{k} x{v}' for k, v in raw['fields_seen'].items())}; "
        f"input {raw['input']['field']} ({holds}), target {target['field']} ({classes})" + (f"; {', '.join(problems)}" if problems else "")
    )


# ---------------------------------------------------------------- built on first use


def index_on_first_use(sources: Sequence[str], cache_dir: Optional[str], fields: dict, what: str) -> Path:
    """The index of `sources` kept in data.cache_dir/index/<digest of the shard list>/, built by the first
    process of the node that needs it (under a lock; the others wait and read it)."""
    import hashlib

    if not cache_dir:
        raise ConfigError(
            f"{what} holds webdataset shards without an index: run `dist-train data index {' '.join(sources)} --out INDEX` "
            "and set data.path=INDEX, or set data.cache_dir to build the index there on first use"
        )
    urls = expand_sources(sources)
    stamp = [(u, *(_file_stamp(u) if not is_remote(u) else ())) for u in urls]
    digest = hashlib.sha256(json.dumps([FORMAT, stamp, sorted(fields.items())]).encode()).hexdigest()[:16]
    root = Path(cache_dir) / "index" / digest
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".lock"):
        if not all((root / s / MANIFEST).is_file() for s in SPLITS):
            build_index(urls, root, "auto", fields, say=lambda line: None)
    return root


def _file_stamp(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


# ---------------------------------------------------------------- the CLI command


def index_command(args: argparse.Namespace) -> int:
    fields = requested_fields({k: v for k, v in (("input", args.input), ("target", args.target)) if v}, FLAG_NAMES)
    written = build_index(args.shards, Path(args.out), args.split, fields)
    print(f"train with data.source=shards data.path={args.out}" + ("" if set(written) == set(SPLITS) else f" once {', '.join(sorted(set(SPLITS) - set(written)))} is indexed too (--split)"))
    return 0


def is_foreign(path: str) -> bool:
    """An index, or a folder of webdataset tars with no manifest of dist_train's: what `data inspect` reads here."""
    folder = Path(path)
    manifests = [folder / MANIFEST, *(folder / s / MANIFEST for s in SPLITS)]
    if any(is_index(m) for m in manifests):
        return True
    if any(m.is_file() for m in manifests) or not folder.is_dir():
        return False
    try:
        return bool(expand_sources([str(folder)]))
    except DataError:
        return False


def verify_indexed_shard(entry: ShardEntry, url: str) -> Optional[str]:
    """None if the shard's bytes are the ones indexed, else what differs (the shard is read in full)."""
    try:
        reader = CountingReader(_open_url(url, entry.name), hashing=True)
    except DataError as e:
        return str(e)
    try:
        reader.drain()
    finally:
        reader.close()
    assert reader.sha256 is not None
    if reader.bytes_read != entry.bytes or reader.sha256.hexdigest() != entry.sha256:
        return f"shard {url}: {reader.bytes_read} bytes with sha256 {reader.sha256.hexdigest()[:12]}..., the index says {entry.bytes} bytes, {entry.sha256[:12]}... (changed since it was indexed)"
    return None


def inspect_command(args: argparse.Namespace) -> int:
    """An index: its summary and every shard's checksum. A folder of tars without one: what its index would say."""
    import tempfile

    folder = Path(args.path)
    manifests = [m for m in (folder / MANIFEST, *(folder / s / MANIFEST for s in SPLITS)) if is_index(m)]
    if not manifests:
        with tempfile.TemporaryDirectory() as tmp:
            build_index([str(folder)], Path(tmp), "auto", {})
        print(f"{folder} is not indexed; `dist-train data index {folder} --out INDEX` writes this index (the tars are only read)")
        return 0
    problems = []
    for path in manifests:
        index = load_index(path)
        problems += report_checks(describe_index(index), ((entry, verify_indexed_shard(entry, url)) for entry, url in zip(index.entries, index.urls)))
    return conclude_checks(problems)
