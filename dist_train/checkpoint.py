"""Checkpoints: step-N directories, written under a temporary name and renamed when complete.

Layout of OUTPUT_DIR/checkpoints/step-00000042/:
  meta.json          step, epoch, world size, strategy, versions, resolved config (human-readable)
  <backend files>    DCP shards (DDP) or DeepSpeed's own layout (ZeRO)
  rank-K.state.pt    per-rank state the backend does not shard (RNG), tensors and plain types only
  trainer.json       trainer progress, data position, tracker run id (identical on every rank)
  COMPLETE           written last; a directory without it is never loaded

Every rank calls save and load; the strategy decides who writes what. A crash mid-save leaves only a
`.tmp-step-N` directory, which resume ignores and the next save removes. The main process writes
meta.json + COMPLETE and renames only once every rank's files are on disk: after a barrier for a
synchronous save; for `checkpoint.async_save` once DCP's own finish step (which gathers every rank's
write results) has returned on the main process.

Loading never unpickles arbitrary objects: per-rank files load with `weights_only=True`, DCP's pickled
`.metadata` goes through an allow-list unpickler, and DCP's non-tensor items load with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import io
import json
import os
import pickle
import platform
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from .config import Config, ConfigError
from .env import DistEnv

if TYPE_CHECKING:
    from .strategies.base import Strategy

COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.json"
TRAINER_FILE = "trainer.json"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and what differs."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / META_FILE).is_file()


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete step directories, oldest first, ordered by the step recorded inside (not the folder name)."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if path.name.startswith(STEP_PREFIX) and path.is_dir() and is_complete(path):
            found.append((read_meta(path)["step"], path))
    return [p for _, p in sorted(found)]


def read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/{META_FILE} is missing or unreadable ({e}); not a complete dist_train checkpoint") from None


def find_checkpoint(spec: str, output_dir: Path, key: str = "train.resume") -> Optional[Path]:
    """'auto' -> newest complete checkpoint under output_dir (None if there is none); else the given path
    (a step-N directory, or an output directory: its newest). `key` names the setting in error messages."""
    if spec == "auto":
        found = complete_checkpoints(output_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(spec)
    if (path / "checkpoints").is_dir():  # an output directory was given
        found = complete_checkpoints(path / "checkpoints")
        if not found:
            raise CheckpointError(f"{key}={spec}: no complete checkpoint under {path / 'checkpoints'}")
        return found[-1]
    if not path.is_dir():
        raise CheckpointError(f"{key}={spec}: no such checkpoint directory")
    if not path.name.startswith((STEP_PREFIX, TMP_PREFIX)) and not (path / META_FILE).exists():
        raise CheckpointError(f"{key}={spec} is neither a step-N checkpoint directory nor an output_dir with checkpoints/ in it")
    if not is_complete(path):
        raise CheckpointError(f"{key}={spec}: the checkpoint is incomplete (no {COMPLETE_MARKER} marker); pick an older step-N directory")
    return path


# Config keys that decide which tensors a checkpoint holds; a mismatch cannot load, so refuse it up front.
COMPATIBILITY_KEYS = ("model.name", "model.num_classes", "model.kwargs", "model.freeze_backbone", "optim.name", "strategy.name")


def check_compatible(meta: dict, cfg: Config, path: Path) -> None:
    """Refuse a checkpoint of another model or of a config the state cannot be loaded into."""
    saved, now = meta.get("config", {}), cfg.to_dict()
    for key in COMPATIBILITY_KEYS:
        section, name = key.split(".")
        then = saved.get(section, {}).get(name)
        current = now[section][name]
        if then is not None and then != current:
            raise CheckpointError(
                f"checkpoint {path} was written with {key}={then}, this run has {key}={current}; "
                f"set {key}={then} or start a fresh output_dir"
            )


# ---------------------------------------------------------------- per-rank and trainer state


def _rng_to_saveable(state: dict) -> dict:
    """RNG states as tensors and plain types, so loading needs no unpickling of arbitrary objects."""
    version, internal, gauss = state["python"]
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    out = {
        "python_version": version,
        "python_state": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_name": np_name,
        "numpy_keys": torch.from_numpy(np_keys.astype("int64")),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_cached": float(np_cached),
        "torch": state["torch"],
    }
    if "cuda" in state:
        out["cuda"] = list(state["cuda"])
    return out


def _rng_from_saved(saved: dict) -> dict:
    import numpy as np

    state = {
        "python": (saved["python_version"], tuple(saved["python_state"].tolist()), saved["python_gauss"]),
        "numpy": (saved["numpy_name"], saved["numpy_keys"].numpy().astype(np.uint32), saved["numpy_pos"], saved["numpy_has_gauss"], saved["numpy_cached"]),
        "torch": saved["torch"],
    }
    if "cuda" in saved:
        state["cuda"] = saved["cuda"]
    return state


def save_side_state(directory: Path, extra_state: dict, dist_env: DistEnv) -> None:
    """Trainer progress / data position / tracker (same on every rank: main writes) and per-rank RNG."""
    # fsynced like DCP's shards, so a COMPLETE marker that survives a power loss never points at lost files.
    if "rng" in extra_state:
        with open(directory / f"rank-{dist_env.global_rank}.state.pt", "wb") as f:
            torch.save({"rng": _rng_to_saveable(extra_state["rng"].state_dict())}, f)
            f.flush()
            os.fsync(f.fileno())
    if dist_env.is_main:
        shared = {k: v.state_dict() for k, v in extra_state.items() if k != "rng"}
        _write_synced(directory / TRAINER_FILE, json.dumps(shared, indent=2))


def load_side_state(directory: Path, extra_state: dict, dist_env: DistEnv) -> None:
    shared = json.loads((directory / TRAINER_FILE).read_text())
    for key, obj in extra_state.items():
        if key != "rng" and key in shared:
            obj.load_state_dict(shared[key])
    rank_file = directory / f"rank-{dist_env.global_rank}.state.pt"
    if "rng" in extra_state and rank_file.is_file():
        saved = torch.load(rank_file, map_location="cpu", weights_only=True)
        extra_state["rng"].load_state_dict(_rng_from_saved(saved["rng"]))
    # A rank that did not exist when the checkpoint was written keeps its fresh seed (seed + rank).


# ---------------------------------------------------------------- DCP (the DDP strategy's format)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its `.metadata`; allow only DCP's metadata dataclasses/enums and the few torch values they hold."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module.startswith("torch.distributed.checkpoint."):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which a DCP .metadata file never holds; refusing to load it")


_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


def _safe_reader(directory: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            with self.fs.create_stream(self._get_metadata_path(rank), "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(directory))


def _safe_load_bytes(planner: Any, read_item: Any, value: io.BytesIO) -> None:
    """DefaultLoadPlanner.load_bytes with weights_only=True (torch's own uses weights_only=False)."""
    from torch.distributed.checkpoint._traverse import set_element

    loaded = torch.load(value, weights_only=True)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], loaded)
    else:
        planner.state_dict[read_item.dest_index.fqn] = loaded


def _safe_planner(empty: bool = False) -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    base = _EmptyStateDictLoadPlanner if empty else DefaultLoadPlanner

    class SafeLoadPlanner(base):  # type: ignore[misc, valid-type]
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            _safe_load_bytes(self, read_item, value)

    return SafeLoadPlanner()


def read_dcp_metadata(directory: Path) -> Any:
    try:
        return _safe_reader(directory).read_metadata()
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"{directory}/.metadata is missing or unreadable ({e}); the checkpoint is damaged") from None


def check_model_fits(directory: Path, model_state: dict, model_name: str) -> None:
    """Name the parameter that differs (missing, unexpected or another shape) before DCP fails opaquely."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {
        fqn[len("model.") :]: list(md.size)
        for fqn, md in read_dcp_metadata(directory).state_dict_metadata.items()
        if fqn.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    current = {k: list(v.shape) for k, v in model_state.items() if isinstance(v, torch.Tensor)}
    where = f"checkpoint {directory} does not fit this model (model.name={model_name})"
    for key, shape in current.items():
        if key not in saved:
            raise CheckpointError(f"{where}: '{key}' is in this model but not in the checkpoint")
        if saved[key] != shape:
            raise CheckpointError(f"{where}: '{key}' has shape {saved[key]} in the checkpoint and {shape} in this model")
    unexpected = sorted(set(saved) - set(current))
    if unexpected:
        raise CheckpointError(f"{where}: '{unexpected[0]}' is in the checkpoint but not in this model ({len(unexpected)} such keys)")


def _dcp_state(strategy: "Strategy") -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(strategy.unwrapped_model, strategy.optimizer)
    return {
        "model": model_state,
        "optimizer": optim_state,
        "scheduler": strategy.scheduler.state_dict(),
        "scaler": strategy.scaler.state_dict(),
    }


def _async_process_group(strategy: "Strategy") -> Any:
    """A gloo group of the checkpoint's own: on the default group the save thread's collectives interleave
    with DDP's all-reduces and both sides wait forever (measured: the save thread sits in a broadcast
    while DDP sits in its all-reduce)."""
    import torch.distributed as dist

    if not strategy.dist_env.distributed:
        return None
    group = getattr(strategy, "_checkpoint_process_group", None)
    if group is None:
        timeout = datetime.timedelta(seconds=strategy.cfg.strategy.timeout_seconds)
        group = dist.new_group(backend="gloo", timeout=timeout)  # collective: every rank saves at the same step
        strategy._checkpoint_process_group = group  # type: ignore[attr-defined]
    return group


def dcp_save(strategy: "Strategy", directory: Path, extra_state: dict) -> Optional[Any]:
    """Writes model/optimizer/scheduler/scaler with DCP plus the side state. With checkpoint.async_save the
    state is copied to CPU here and written by a background thread: returns its Future (else None)."""
    import torch.distributed.checkpoint as dcp

    state = _dcp_state(strategy)
    save_side_state(directory, extra_state, strategy.dist_env)
    if strategy.cfg.checkpoint.async_save:
        return dcp.async_save(state, checkpoint_id=str(directory), process_group=_async_process_group(strategy))
    dcp.save(state, checkpoint_id=str(directory))
    return None


def dcp_load(strategy: "Strategy", directory: Path, extra_state: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(strategy)
    check_model_fits(directory, state["model"], strategy.cfg.model.name)
    try:
        dcp.load(state, storage_reader=_safe_reader(directory), planner=_safe_planner())
    except CheckpointError:
        raise
    except Exception as e:  # DCP raises a CheckpointException wrapping per-rank tracebacks
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {directory} does not fit this model/optimizer: {first}") from None
    set_state_dict(strategy.unwrapped_model, strategy.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    strategy.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        strategy.scaler.load_state_dict(state["scaler"])
    load_side_state(directory, extra_state, strategy.dist_env)


def load_dcp_full(directory: Path) -> dict:
    """The whole DCP checkpoint in this process, without a process group: {model, optimizer, scheduler, scaler}."""
    # The private loader, as torch's own dcp_to_torch_save uses: the public `dcp.load` only fills keys the
    # caller already has, and the empty-state planner is how DCP rebuilds a state dict from the metadata.
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    read_dcp_metadata(directory)  # refuses unsafe metadata with its own message (DCP would wrap the error)
    state: dict = {}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            _load_state_dict(state, storage_reader=_safe_reader(directory), planner=_safe_planner(empty=True), no_dist=True)
    except Exception as e:  # DCP wraps per-rank failures (a missing shard file, a refused pickle) in one exception
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {directory} cannot be read: {first}") from None
    return state


# ---------------------------------------------------------------- the manager


@dataclasses.dataclass
class _PendingSave:
    """An asynchronous save in flight: finalized (meta, COMPLETE, rename, purge) once its writes are done."""

    future: Any
    step: int
    tmp: Path
    final: Path
    meta: dict


class Checkpointer:
    """Decides when to save, writes step-N directories atomically, keeps the latest K, finds the resume point.

    Backend-agnostic: the strategy writes its files into the temporary directory (`save_checkpoint` may
    return a Future when it writes in the background); this class owns naming, completeness and retention.
    """

    def __init__(self, cfg: Config, dist_env: DistEnv, strategy: "Strategy") -> None:
        self.cfg = cfg
        self.dist_env = dist_env
        self.strategy = strategy
        self.directory = Path(cfg.output_dir) / "checkpoints"
        self.last_saved_step: Optional[int] = None
        self.last_save_time = time.monotonic()
        self._pending: Optional[_PendingSave] = None

    def _due(self, step: int, force: bool) -> bool:
        ccfg = self.cfg.checkpoint
        if step == self.last_saved_step:
            return False
        if force or (ccfg.interval_steps and step % ccfg.interval_steps == 0):
            return True
        if ccfg.interval_seconds:
            # Clocks differ per rank: every rank must reach the same decision, so max-reduce it.
            elapsed = time.monotonic() - self.last_save_time >= ccfg.interval_seconds
            flag = torch.tensor([1.0 if elapsed else 0.0], device=self.strategy.device)
            return bool(self.strategy.all_reduce_max(flag).item())
        return False

    def maybe_save(self, step: int, extra_state: dict, force: bool = False) -> Optional[Path]:
        """Called by every rank after every optimizer step; saves when an interval is due (or `force`)."""
        self._poll()
        if not self._due(step, force):
            return None
        return self.save(step, extra_state)

    def save(self, step: int, extra_state: dict) -> Path:
        """Collective. Returns the final step-N path (complete on return unless the save is asynchronous)."""
        self._finish_pending()  # one save in flight at a time; also keeps its .tmp dir safe from the cleanup below
        final = self.directory / step_dir_name(step)
        tmp = self.directory / f"{TMP_PREFIX}{step:08d}"
        if self.dist_env.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.strategy.barrier()
        meta = self._meta(step, extra_state)  # progress as of this step, before training moves on
        future = self.strategy.save_checkpoint(tmp, extra_state)
        self.last_saved_step = step
        self.last_save_time = time.monotonic()
        if future is not None:
            self._pending = _PendingSave(future, step, tmp, final, meta)
            return final
        # Every rank's files are written once all ranks pass this barrier; only then may the marker appear.
        self.strategy.barrier()
        if self.dist_env.is_main:
            self._finalize(tmp, final, meta)
        self.strategy.barrier()
        return final

    def _meta(self, step: int, extra_state: dict) -> dict:
        progress = extra_state["progress"].state_dict() if "progress" in extra_state else {}
        return {
            "step": step,
            "epoch": progress.get("epoch"),
            "samples_seen": progress.get("samples_seen"),
            "world_size": self.dist_env.world_size,
            "strategy": self.strategy.name,
            "async_save": self.cfg.checkpoint.async_save,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "config": self.cfg.to_dict(),
        }

    def _finalize(self, tmp: Path, final: Path, meta: dict) -> None:
        """Main process only, after every rank's files are on disk: metadata, marker, rename, retention."""
        _write_synced(tmp / META_FILE, json.dumps(meta, indent=2))
        _write_synced(tmp / COMPLETE_MARKER, f"step {meta['step']}\n")
        _fsync_dir(tmp)
        replaced = None
        if final.exists():  # the same step saved again (e.g. a rerun): move the old one aside, never lose both
            replaced = self.directory / f"{TMP_PREFIX}replaced-{final.name}"
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        self._purge()

    def _poll(self) -> None:
        """Finalize an asynchronous save as soon as its writes are done, without blocking or a collective."""
        if self._pending is not None and self._pending.future.done():
            self._finish_pending()

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.future.result()
        except Exception as e:
            raise CheckpointError(f"asynchronous save of step {pending.step} into {pending.tmp} failed: {e}") from e
        # On the main process the result arrives only after DCP's finish step, which gathers every rank's
        # write results: all shards and side files are on disk, so marking complete is safe without a barrier.
        if self.dist_env.is_main:
            self._finalize(pending.tmp, pending.final, pending.meta)

    def wait(self) -> None:
        """Collective. Block until an asynchronous save (if any) is complete on disk; a no-op otherwise."""
        had_pending = self._pending is not None
        self._finish_pending()
        if had_pending:
            self.strategy.barrier()

    def _purge(self) -> None:
        complete = complete_checkpoints(self.directory)
        for old in complete[: -self.cfg.checkpoint.keep_latest]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, spec: str, extra_state: dict) -> Optional[Path]:
        """Collective. Loads the checkpoint `spec` names ('auto' or a path); None when 'auto' finds none."""
        # The main process decides, so every rank loads the same step even if the directory is changing.
        decision: Any = None  # None (fresh start), a path, or ("error", message) so every rank raises alike
        if self.dist_env.is_main:
            try:
                path = find_checkpoint(spec, Path(self.cfg.output_dir))
                decision = None if path is None else str(path)
            except CheckpointError as e:
                decision = ("error", str(e))
        decision = self.strategy.broadcast_object(decision)
        if isinstance(decision, tuple):
            raise ConfigError(decision[1])
        if decision is None:
            return None
        path = Path(decision)
        meta = read_meta(path)
        check_compatible(meta, self.cfg, path)
        self.strategy.load_checkpoint(path, extra_state)
        self.last_saved_step = meta["step"]
        return path


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
