"""Read a W&B offline run (`wandb/offline-run-<date>-<id>/run-<id>.wandb`) back: history, summary, config.

wandb 0.31 has no public reader for these files (`DataStore` is gone, `wandb sync` has no view option),
and offline runs write neither `wandb-summary.json` nor `config.yaml`. The file is a 7-byte header
(b":W&B", magic 0xBEE1 little-endian, version 0) followed by LevelDB-log framing: 32 KiB blocks counted
from the start of the file; each chunk has a 7-byte header (CRC-32 as zlib computes it over the type byte
and the data, uint16 length, uint8 type FULL/FIRST/MIDDLE/LAST), and a block's last < 7 bytes are zero
padding. The reassembled chunks are serialized `wandb.proto.wandb_internal_pb2.Record` messages, which
W&B's own protobuf classes decode.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

FILE_HEADER = struct.Struct("<4sHB")
FILE_IDENT, FILE_MAGIC = b":W&B", 0xBEE1
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """A .wandb file that is not a W&B run file or is corrupt; the message names the file and offset."""


def iter_records(path: str | Path, allow_truncated_tail: bool = True) -> Iterator[Any]:
    """Yield the `Record` messages of one .wandb file in write order.

    A run killed mid-write leaves a cut-off last record; `allow_truncated_tail` ends quietly there.
    """
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    data = path.read_bytes()
    if len(data) < FILE_HEADER.size:
        raise WandbFileError(f"{path}: {len(data)} bytes, too short for a W&B run file")
    ident, magic, _version = FILE_HEADER.unpack_from(data, 0)
    if ident != FILE_IDENT or magic != FILE_MAGIC:
        raise WandbFileError(f"{path}: not a W&B run file (header {data[:FILE_HEADER.size]!r})")

    offset, pending = FILE_HEADER.size, bytearray()
    while offset < len(data):
        block_left = BLOCK_SIZE - offset % BLOCK_SIZE
        if block_left < CHUNK_HEADER.size:  # the block's zero trailer
            offset += block_left
            continue
        if offset + CHUNK_HEADER.size > len(data):
            if allow_truncated_tail:
                return
            raise WandbFileError(f"{path}: truncated chunk header at byte {offset}")
        checksum, length, kind = CHUNK_HEADER.unpack_from(data, offset)
        if kind == 0 and length == 0:  # zero padding up to the block end
            offset += block_left
            continue
        start = offset + CHUNK_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) < length:
            if allow_truncated_tail:
                return
            raise WandbFileError(f"{path}: chunk at byte {offset} needs {length} bytes, file ends first")
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            raise WandbFileError(f"{path}: checksum mismatch in the chunk at byte {offset}")
        offset = start + length
        if kind in (FULL, FIRST):
            pending = bytearray(chunk)
        elif kind in (MIDDLE, LAST):
            pending += chunk
        else:
            raise WandbFileError(f"{path}: unknown chunk type {kind} at byte {offset}")
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(bytes(pending))
            yield record


def _item_key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


@dataclass
class OfflineRun:
    """What one offline run file holds; `config` omits W&B's own `_wandb` entry."""

    path: Path
    run_id: str = ""
    project: str = ""
    entity: str = ""
    display_name: str = ""
    tags: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # one dict per committed step, with "_step"
    summary: dict = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return [row["_step"] for row in self.history]

    def series(self, key: str) -> dict[int, Any]:
        """step -> value of one metric, for the steps that logged it."""
        return {row["_step"]: row[key] for row in self.history if key in row}


def read_run(path: str | Path) -> OfflineRun:
    """Decode a run directory (offline-run-...) or its run-<id>.wandb file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb"))
        if len(files) != 1:
            raise WandbFileError(f"{path}: expected one run-*.wandb file, found {len(files)}")
        path = files[0]
    run = OfflineRun(path=path)
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.entity, run.display_name = r.run_id, r.project, r.entity, r.display_name
            run.tags = list(r.tags)
            _apply(run.config, r.config.update, ())
        elif kind == "config":
            _apply(run.config, record.config.update, record.config.remove)
        elif kind == "history":
            row = {_item_key(item): json.loads(item.value_json) for item in record.history.item}
            if record.history.HasField("step"):
                row["_step"] = record.history.step.num
            run.history.append(row)
        elif kind == "summary":
            _apply(run.summary, record.summary.update, record.summary.remove)
    run.config.pop("_wandb", None)
    return run


def _apply(target: dict, updates: Any, removals: Any) -> None:
    for item in updates:
        target[_item_key(item)] = json.loads(item.value_json)
    for item in removals:
        target.pop(_item_key(item), None)


def find_runs(wandb_dir: str | Path, run_id: Optional[str] = None) -> list[Path]:
    """Offline run directories under a `wandb/` folder (oldest first), optionally of one run id.

    A resumed offline run gets a new directory with the same id each time it starts.
    """
    pattern = f"offline-run-*-{run_id}" if run_id else "offline-run-*"
    return sorted(p for p in Path(wandb_dir).glob(pattern) if p.is_dir())


def last_logged_step(wandb_dir: str | Path, run_id: str) -> Optional[int]:
    """The highest history step any earlier offline attempt of this run wrote, or None."""
    steps = [step for run_dir in find_runs(wandb_dir, run_id) for step in read_run(run_dir).steps]
    return max(steps, default=None)
