"""Checkpoints: step-N directories, written under a temporary name and renamed when complete.

Layout of OUTPUT_DIR/checkpoints/step-00000042/:
  meta.json          step, epoch, world size, strategy, versions, resolved config (human-readable)
  <backend files>    DCP shards (DDP) or DeepSpeed's own layout (ZeRO)
  rank-K.state.pt    per-rank state the backend does not shard (RNG), tensors and plain types only
  trainer.json       trainer progress, data position, tracker run id (identical on every rank)
  COMPLETE           written last; a directory without it is never loaded

Every rank calls save and load; the strategy decides who writes what. A crash mid-save leaves only a
`.tmp-step-N` directory, which resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
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


def find_checkpoint(spec: str, output_dir: Path) -> Optional[Path]:
    """'auto' -> newest complete checkpoint under output_dir (None if there is none); else the given path."""
    if spec == "auto":
        found = complete_checkpoints(output_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(spec)
    if (path / "checkpoints").is_dir():  # an output directory was given
        found = complete_checkpoints(path / "checkpoints")
        if not found:
            raise CheckpointError(f"train.resume={spec}: no complete checkpoint under {path / 'checkpoints'}")
        return found[-1]
    if not path.is_dir():
        raise CheckpointError(f"train.resume={spec}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointError(f"train.resume={spec}: the checkpoint is incomplete (no {COMPLETE_MARKER} marker); pick an older step-N directory")
    return path


def check_compatible(meta: dict, cfg: Config, path: Path) -> None:
    """Refuse a checkpoint of another model or of a config the state cannot be loaded into."""
    saved = meta.get("config", {})
    checks = [
        ("model.name", saved.get("model", {}).get("name"), cfg.model.name),
        ("model.num_classes", saved.get("model", {}).get("num_classes"), cfg.model.num_classes),
        ("optim.name", saved.get("optim", {}).get("name"), cfg.optim.name),
        ("strategy.name", saved.get("strategy", {}).get("name"), cfg.strategy.name),
    ]
    for key, then, now in checks:
        if then is not None and then != now:
            raise CheckpointError(f"checkpoint {path} was written with {key}={then}, this run has {key}={now}; set {key}={then} or start a fresh output_dir")


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
    if "rng" in extra_state:
        torch.save({"rng": _rng_to_saveable(extra_state["rng"].state_dict())}, directory / f"rank-{dist_env.global_rank}.state.pt")
    if dist_env.is_main:
        shared = {k: v.state_dict() for k, v in extra_state.items() if k != "rng"}
        (directory / TRAINER_FILE).write_text(json.dumps(shared, indent=2))


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


def dcp_save(strategy: "Strategy", directory: Path, extra_state: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(strategy.unwrapped_model, strategy.optimizer)
    state = {
        "model": model_state,
        "optimizer": optim_state,
        "scheduler": strategy.scheduler.state_dict(),
        "scaler": strategy.scaler.state_dict(),
    }
    dcp.save(state, checkpoint_id=str(directory))
    save_side_state(directory, extra_state, strategy.dist_env)


def dcp_load(strategy: "Strategy", directory: Path, extra_state: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(strategy.unwrapped_model, strategy.optimizer)
    state = {
        "model": model_state,
        "optimizer": optim_state,
        "scheduler": strategy.scheduler.state_dict(),
        "scaler": strategy.scaler.state_dict(),
    }
    try:
        dcp.load(state, checkpoint_id=str(directory))
    except Exception as e:  # DCP raises a CheckpointException wrapping per-rank tracebacks
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {directory} does not fit this model/optimizer: {first}") from None
    set_state_dict(strategy.unwrapped_model, strategy.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    strategy.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        strategy.scaler.load_state_dict(state["scaler"])
    load_side_state(directory, extra_state, strategy.dist_env)


# ---------------------------------------------------------------- the manager


class Checkpointer:
    def __init__(self, cfg: Config, dist_env: DistEnv, strategy: "Strategy") -> None:
        self.cfg = cfg
        self.dist_env = dist_env
        self.strategy = strategy
        self.directory = Path(cfg.output_dir) / "checkpoints"
        self.last_saved_step: Optional[int] = None
        self.last_save_time = time.monotonic()

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
        if not self._due(step, force):
            return None
        return self.save(step, extra_state)

    def save(self, step: int, extra_state: dict) -> Path:
        final = self.directory / step_dir_name(step)
        tmp = self.directory / f"{TMP_PREFIX}{step:08d}"
        if self.dist_env.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.strategy.barrier()
        self.strategy.save_checkpoint(tmp, extra_state)
        self.strategy.barrier()
        if self.dist_env.is_main:
            progress = extra_state["progress"].state_dict() if "progress" in extra_state else {}
            meta = {
                "step": step,
                "epoch": progress.get("epoch"),
                "world_size": self.dist_env.world_size,
                "strategy": self.strategy.name,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": {"torch": torch.__version__, "python": platform.python_version()},
                "config": self.cfg.to_dict(),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            (tmp / COMPLETE_MARKER).write_text(f"step {step}\n")
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
            self._purge()
        self.strategy.barrier()
        self.last_saved_step = step
        self.last_save_time = time.monotonic()
        return final

    def _purge(self) -> None:
        complete = complete_checkpoints(self.directory)
        for old in complete[: -self.cfg.checkpoint.keep_latest]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, spec: str, extra_state: dict) -> Optional[Path]:
        try:
            path = find_checkpoint(spec, Path(self.cfg.output_dir))
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        if path is None:
            return None
        meta = read_meta(path)
        check_compatible(meta, self.cfg, path)
        self.strategy.load_checkpoint(path, extra_state)
        self.last_saved_step = meta["step"]
        return path

    def wait(self) -> None:
        """Block until an asynchronous save (if any) is on disk."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
