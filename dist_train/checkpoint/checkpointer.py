"""Checkpoints: step-N directories, written under a temporary name and renamed when complete.

Layout of OUTPUT_DIR/checkpoints/:
  index.json         the checkpointer's record of what it wrote: name, step, run id, order, meta.json's sha256

and of each OUTPUT_DIR/checkpoints/step-00000042/:
  meta.json          step, epoch, run id and fingerprint, world size, strategy, versions, resolved config
  <backend files>    whatever the strategy writes: DCP shards (DDP, FSDP2) or DeepSpeed's own layout (ZeRO)
  rank-K.state.pt    per-rank state the backend does not shard (RNG), tensors and plain types only
  trainer.json       trainer progress, data position, tracker run id (identical on every rank)
  COMPLETE           written last; a directory without it is never loaded

This module knows no backend: the strategy writes and reads its own files in the directory it is handed;
the checkpointer writes the side state (progress, data position, RNG, tracker) and owns names, markers,
the index, lineage and retention. Every rank calls save and load. A crash mid-save leaves only a
`.tmp-step-N` directory, which resume ignores and the next save removes. A checkpoint belongs to the run
that wrote it (see lineage.py): `resume=auto` and keep-latest-K consider only this run's checkpoints, in
the index's order, and only those whose meta.json is unchanged since it was written. The main process writes
meta.json + COMPLETE and renames only once every rank's files are on disk: after a barrier for a
synchronous save; for `checkpoint.async_save` once DCP's own finish step (which gathers every rank's
write results) has returned on the main process.

Loading never unpickles arbitrary objects: per-rank files and trainer state load with `weights_only=True`
or as JSON (strategies/dcp.py does the same for DCP's files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import Config, ConfigError
from ..distributed.environment import DistEnv
from ..errors import CheckpointError
from ..files import atomic_write, fsync_dir, fsync_tree, write_synced
from .lineage import ResumePlan, RunInfo
from .resume_semantics import resume_changes

COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.json"
TRAINER_FILE = "trainer.json"
INDEX_FILE = "index.json"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
TRASH_PREFIX = ".trash-"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / META_FILE).is_file()


def read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/{META_FILE} is missing or unreadable ({e}); not a complete dist_train checkpoint") from None


def _sha256(file: Path) -> Optional[str]:
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()
    except OSError:
        return None


class CheckpointIndex:
    """The checkpointer's own record of what it wrote, in the order it wrote it (checkpoints/index.json).

    Ordering, `resume=auto` and retention follow this record, not a field in meta.json that anyone can edit:
    each entry keeps the sha256 of the meta.json it wrote, and a checkpoint whose meta.json no longer
    matches is neither resumed from nor counted. Written only by the main process, atomically.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.entries: list[dict] = []
        self.next_seq = 0
        try:
            raw = json.loads((directory / INDEX_FILE).read_text())
            self.entries, self.next_seq = list(raw["entries"]), int(raw["next_seq"])
        except (OSError, ValueError, KeyError, TypeError):
            pass

    @property
    def exists(self) -> bool:
        return (self.directory / INDEX_FILE).is_file()

    def add(self, name: str, step: int, run_id: Optional[str]) -> None:
        self.entries = [e for e in self.entries if e["name"] != name]
        self.entries.append({"name": name, "step": step, "run_id": run_id, "seq": self.next_seq, "meta_sha256": _sha256(self.directory / name / META_FILE)})
        self.next_seq += 1
        self.write()

    def remove(self, names: set[str]) -> None:
        self.entries = [e for e in self.entries if e["name"] not in names]
        self.write()

    def write(self) -> None:
        atomic_write(self.directory / INDEX_FILE, json.dumps({"entries": self.entries, "next_seq": self.next_seq}, indent=1) + "\n")

    def problem(self, entry: dict) -> Optional[str]:
        """Why an entry cannot be trusted (None when its directory is complete and unchanged)."""
        path = self.directory / entry["name"]
        if not is_complete(path):
            return f"{path} is missing or incomplete"
        if _sha256(path / META_FILE) != entry.get("meta_sha256"):
            return f"{path}/{META_FILE} was changed after the checkpoint was written"
        return None

    def verified(self, run_id: Optional[str] = None) -> list[Path]:
        """Trusted checkpoints (of `run_id`, if given), oldest first."""
        return [
            self.directory / e["name"]
            for e in self.entries
            if (run_id is None or e.get("run_id") == run_id) and self.problem(e) is None
        ]


def complete_checkpoints(directory: Path) -> list[Path]:
    """Trusted complete step directories, oldest first: in the index's order where there is an index, else
    (a directory from before the index existed) ordered by the step recorded inside."""
    if not directory.is_dir():
        return []
    index = CheckpointIndex(directory)
    if index.exists:
        return index.verified()
    found = []
    for path in directory.iterdir():
        if path.name.startswith(STEP_PREFIX) and path.is_dir() and is_complete(path):
            found.append((read_meta(path)["step"], path))
    return [p for _, p in sorted(found)]


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
    if path.is_file():
        start_from = f"; to start a run from its weights, set model.weights={spec} instead" if key == "train.resume" else ""
        raise CheckpointError(
            f"{key}={spec} is a file (a tutorial checkpoint dict or a state_dict?), not a dist_train checkpoint: a step-N "
            f"directory or an output_dir{start_from}"
        )
    if not path.is_dir():
        raise CheckpointError(f"{key}={spec}: no such checkpoint directory")
    if not path.name.startswith((STEP_PREFIX, TMP_PREFIX)) and not (path / META_FILE).exists():
        raise CheckpointError(f"{key}={spec} is neither a step-N checkpoint directory nor an output_dir with checkpoints/ in it")
    if not is_complete(path):
        raise CheckpointError(f"{key}={spec}: the checkpoint is incomplete (no {COMPLETE_MARKER} marker); pick an older step-N directory")
    return path


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
        out["cuda"] = state["cuda"]  # this rank's own device's generator (a list in older checkpoints)
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
        write_synced(directory / TRAINER_FILE, json.dumps(shared, indent=2))


def load_side_state(directory: Path, extra_state: dict, dist_env: DistEnv) -> None:
    try:
        shared = json.loads((directory / TRAINER_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{directory / TRAINER_FILE} is damaged or missing ({e}); resume from an earlier step-N directory with "
            "train.resume=PATH, or start over with train.start_over=true"
        ) from None
    for key, obj in extra_state.items():
        if key != "rng" and key in shared:
            obj.load_state_dict(shared[key])
    rank_file = directory / f"rank-{dist_env.global_rank}.state.pt"
    if "rng" in extra_state and rank_file.is_file():
        saved = torch.load(rank_file, map_location="cpu", weights_only=True)
        extra_state["rng"].load_state_dict(_rng_from_saved(saved["rng"]))
    # A rank that did not exist when the checkpoint was written keeps its fresh seed (seed + rank).


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
    """Decides when to save, writes step-N directories atomically, keeps the latest K of this run, finds the
    resume point.

    Backend-agnostic: the strategy writes its files into the temporary directory (`save_checkpoint` may
    return a Future when it writes in the background); this class owns naming, completeness, the index,
    lineage (a checkpoint belongs to the run that wrote it) and retention.
    """

    def __init__(self, cfg: Config, dist_env: DistEnv, strategy: Any, run: Optional[RunInfo] = None) -> None:
        """`strategy`: any backend with save_checkpoint / load_checkpoint / barrier / broadcast_object."""
        self.cfg = cfg
        self.dist_env = dist_env
        self.strategy = strategy
        self.run = run or RunInfo.detached(cfg)
        self.directory = Path(cfg.output_dir) / "checkpoints"
        self.last_saved_step: Optional[int] = None
        self.last_save_time = time.monotonic()
        self._pending: Optional[_PendingSave] = None

    def due(self, step: int, force: bool = False) -> bool:
        """Same answer on every rank without a collective: step intervals and `force` are known everywhere.
        Time-based saves (checkpoint.interval_seconds) are agreed by the trainer at log steps."""
        if step == self.last_saved_step:
            return False
        interval = self.cfg.checkpoint.interval_steps
        return force or bool(interval and step % interval == 0)

    def seconds_due(self) -> bool:
        """This rank's clock says checkpoint.interval_seconds have passed since the last save."""
        seconds = self.cfg.checkpoint.interval_seconds
        return bool(seconds) and time.monotonic() - self.last_save_time >= seconds

    def maybe_save(self, step: int, extra_state: dict, force: bool = False) -> Optional[Path]:
        """Called by every rank after every optimizer step; saves when an interval is due (or `force`)."""
        self.poll()
        if not self.due(step, force):
            return None
        return self.save(step, extra_state)

    def save(self, step: int, extra_state: dict) -> Path:
        """Collective. Returns the final step-N path (complete on return unless the save is asynchronous)."""
        self._finish_pending()  # one save in flight at a time; also keeps its .tmp dir safe from the cleanup below
        final = self.directory / step_dir_name(step)
        tmp = self.directory / f"{TMP_PREFIX}{step:08d}"
        if self.dist_env.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Leftovers of a save or a purge that a crash interrupted.
            for stale in [*self.directory.glob(f"{TMP_PREFIX}*"), *self.directory.glob(f"{TRASH_PREFIX}*")]:
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.strategy.barrier()
        meta = self._meta(step, extra_state)  # progress as of this step, before training moves on
        # Side files first: once the backend's (possibly background) write completes, everything is on disk.
        save_side_state(tmp, extra_state, self.dist_env)
        future = self.strategy.save_checkpoint(tmp, background=self.cfg.checkpoint.async_save)
        self.last_saved_step = step
        self.last_save_time = time.monotonic()
        if future is not None:
            self._pending = _PendingSave(future, step, tmp, final, meta)
            return final
        # Every rank's files are on disk once all ranks pass this barrier (each synced what it sees: a backend
        # may not sync its own); only then may the marker appear.
        fsync_tree(tmp)
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
            "run_id": self.run.run_id,
            "fingerprint": self.run.fingerprint,
            "world_size": self.dist_env.world_size,
            "strategy": self.strategy.name,
            "format": self.strategy.checkpoint_format,
            "async_save": self.cfg.checkpoint.async_save,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "config": self.cfg.to_dict(),
        }

    def _finalize(self, tmp: Path, final: Path, meta: dict) -> None:
        """Main process only, after every rank's files are on disk: metadata, marker, rename, index, retention."""
        write_synced(tmp / META_FILE, json.dumps(meta, indent=2))
        write_synced(tmp / COMPLETE_MARKER, f"step {meta['step']}\n")
        fsync_dir(tmp)
        replaced = None
        if final.exists():  # the same step saved again (e.g. a rerun): move the old one aside, never lose both
            replaced = self.directory / f"{TRASH_PREFIX}replaced-{final.name}"
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(tmp, final)
        fsync_dir(self.directory)
        index = CheckpointIndex(self.directory)
        index.add(final.name, meta["step"], self.run.run_id)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        self._purge(index, keep=final.name)

    @property
    def writing(self) -> bool:
        """An asynchronous save is still writing in the background."""
        return self._pending is not None

    def poll(self) -> None:
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
        """Collective. Block until an asynchronous save (if any) is complete on disk; a no-op otherwise.

        The barrier is unconditional: whether a save is still pending differs between ranks (each polls
        its own future), and a barrier entered by some ranks only would hang the others."""
        self._finish_pending()
        self.strategy.barrier()

    def _purge(self, index: CheckpointIndex, keep: str) -> None:
        """Keep the newest `keep_latest` checkpoints of this run (never the one just written); other runs'
        and untrusted directories are left alone. A directory is renamed before it is deleted, so an
        interrupted purge never leaves a half-deleted step-N that looks like a checkpoint."""
        own = [e["name"] for e in index.entries if e.get("run_id") == self.run.run_id and index.problem(e) is None]
        doomed = [name for name in own[: -self.cfg.checkpoint.keep_latest] if name != keep]
        if not doomed:
            return
        index.remove(set(doomed))
        for name in doomed:
            trash = self.directory / f"{TRASH_PREFIX}{name}"
            os.rename(self.directory / name, trash)
            shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------ resume

    def resume(self, plan: "ResumePlan | str", extra_state: dict) -> Optional[tuple[Path, list[str]]]:
        """Collective. Loads the checkpoint the plan names; returns (path, lines describing the config keys
        that changed since it was written), or None when there is nothing to resume."""
        if isinstance(plan, str):
            plan = ResumePlan("auto") if plan == "auto" else ResumePlan("path", plan)
        if plan.kind == "none":
            return None
        # The main process decides, so every rank loads the same step even if the directory is changing.
        decision: Any = None  # None (fresh start), a path, or ("error", message) so every rank raises alike
        if self.dist_env.is_main:
            for trash in self.directory.glob(f"{TRASH_PREFIX}*"):  # a purge that a crash interrupted
                shutil.rmtree(trash, ignore_errors=True)
            try:
                path = self._resume_point(plan)
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
        changes = resume_changes(meta.get("config", {}), self.cfg, str(path))
        self.strategy.load_checkpoint(path, meta)
        load_side_state(path, extra_state, self.dist_env)
        self.last_saved_step = meta["step"]
        return path, changes

    def _resume_point(self, plan: ResumePlan) -> Optional[Path]:
        """Main process: the newest trusted checkpoint of this run for 'auto' (its explicit fallback if it has
        none yet); for a path, that checkpoint, moving aside this run's checkpoints written after it."""
        if plan.kind == "auto":
            index = CheckpointIndex(self.directory)
            for entry in reversed(index.entries):
                if entry.get("run_id") != self.run.run_id:
                    continue
                problem = index.problem(entry)
                if problem is None:
                    return self.directory / entry["name"]
                print(f"dist-train: warning: not resuming from {entry['name']}: {problem}", flush=True)
            legacy = [] if index.exists else complete_checkpoints(self.directory)  # written before the index existed
            if legacy:
                return legacy[-1]
            return find_checkpoint(plan.fallback, Path(self.cfg.output_dir)) if plan.fallback else None
        path = find_checkpoint(plan.path, Path(self.cfg.output_dir))
        if path is not None and path.parent.resolve() == self.directory.resolve():
            self._move_aside_newer_than(path)
        return path

    def _move_aside_newer_than(self, path: Path) -> None:
        """Rolling back: checkpoints this run wrote after `path` belong to the abandoned future. They go to
        previous/ (never deleted) so that retention and a later restart's 'auto' see only the new history."""
        index = CheckpointIndex(self.directory)
        seqs = [e["seq"] for e in index.entries if e["name"] == path.name]
        if not seqs:
            return
        newer = [e["name"] for e in index.entries if e["seq"] > seqs[0] and e.get("run_id") == self.run.run_id]
        if not newer:
            return
        target = Path(self.cfg.output_dir) / "previous" / f"{self.run.run_id}-after-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.mkdir(parents=True, exist_ok=True)
        index.remove(set(newer))
        for name in newer:
            if (self.directory / name).exists():
                os.rename(self.directory / name, target / name)
        print(f"dist-train: resuming from {path.name} of this run: moved the {len(newer)} checkpoint(s) written after it to {target}", flush=True)
