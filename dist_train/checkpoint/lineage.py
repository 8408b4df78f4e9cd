"""A run directory belongs to one run: its identity, its lock, and what a new start may do to it.

Layout of OUTPUT_DIR:
  run.json       {run_id, fingerprint, created_at, parent, diverged_at_step}: written at the first start
  run.lock       held (flock) by the main process while a job runs; names its host and PID
  config.yaml, checkpoints/, model.pt, summary.json, tensorboard/, wandb/   the run's outputs
  logs/, metrics.jsonl, curves.png   its console and per-rank logs, metrics history and picture (runlog.py)
  previous/<run_id>-<time>/   outputs of an earlier run moved aside by train.start_over=true

Before any of it is written, every rank checks that it sees the output_dir rank 0 sees (`check_shared`):
on several machines it must be on a filesystem they all share, or the first checkpoint would fail on the
ranks whose node has its own directory of that name, after the training was done.

A fresh start (no train.resume) into a directory that holds another run's outputs is refused with one line
saying what to do; `train.start_over=true` moves them into previous/ (never deletes them). `resume=auto`
continues the run that run.json names. A restart of the job (torchrun restart, Slurm requeue) always
continues that run from its newest checkpoint, whatever train.resume said at the first start.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from ..config import Config, ConfigError
from ..distributed.groups import ProcessGroups
from ..files import atomic_write
from .resume_semantics import fingerprint

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
PREVIOUS_DIR = "previous"
# What belongs to a run; train.start_over moves exactly these (output_dir may hold other files of the user's).
RUN_ARTIFACTS = ("run.json", "config.yaml", "checkpoints", "model.pt", "summary.json", "tensorboard", "wandb", "logs", "metrics.jsonl", "curves.png")


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """Where the checkpointer resumes from: 'none', 'auto' (newest of this run) or 'path'.

    `fallback` is the path to use when 'auto' finds nothing of this run yet (a restart of a job that
    was started from an explicit checkpoint and crashed before its first save)."""

    kind: str = "none"
    path: Optional[str] = None
    fallback: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class RunInfo:
    run_id: str
    fingerprint: str
    resume: ResumePlan
    notes: tuple[str, ...] = ()

    @classmethod
    def detached(cls, cfg: Config) -> "RunInfo":
        """For a Trainer built without `RunDirectory.open` (tests, benchmarks): the run that output_dir's
        run.json names, if any; no lock is taken and nothing is decided or written."""
        existing = read_run_file(Path(cfg.output_dir)) or {}
        resume = cfg.train.resume
        plan = ResumePlan() if resume is None else ResumePlan("auto") if resume == "auto" else ResumePlan("path", resume)
        return cls(existing.get("run_id", "detached"), existing.get("fingerprint", fingerprint(cfg)), plan)


class RunLockedError(ConfigError):
    """Another live job holds the output directory."""


class RunDirectory:
    """Opened collectively at the start of `dist-train train`: the main process locks, inspects and
    decides; every rank gets the same `RunInfo` (or raises the same ConfigError)."""

    def __init__(self, path: Path, info: RunInfo, lock_fd: Optional[int]) -> None:
        self.path = path
        self.info = info
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, cfg: Config, groups: ProcessGroups) -> "RunDirectory":
        dist_env = groups.dist_env
        path = Path(cfg.output_dir)
        check_shared(path, groups)
        lock_fd = None
        decision: Any
        if dist_env.is_main:
            try:
                lock_fd = acquire_lock(path)
                decision = decide_start(path, cfg, restarted=dist_env.restarted)
            except ConfigError as e:
                decision = ("error", str(e))
        else:
            decision = None
        decision = groups.broadcast_from_main(decision)
        if isinstance(decision, tuple):
            raise ConfigError(decision[1])
        return cls(path, decision, lock_fd)

    def record_divergence(self, step: int) -> None:
        """Main process: a restart of this job must not train into the same divergence again."""
        update_run_file(self.path, diverged_at_step=step)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


# ---------------------------------------------------------------- one directory for every node

SHARED_CHECK_PREFIX = ".dist_train-shared-check-"


def check_shared(path: Path, groups: ProcessGroups) -> None:
    """Collective: rank 0 writes a token file into OUTPUT_DIR, every rank reads it back; a rank that cannot is
    on a machine with another directory of that name (a node-local disk, its own /tmp): every rank raises the
    same ConfigError naming those machines. The token is removed again; nothing else is written."""
    dist_env = groups.dist_env
    if not dist_env.distributed:
        return
    failure: Optional[BaseException] = None
    written: Optional[tuple[str, str]] = None
    if dist_env.is_main:
        token = uuid.uuid4().hex
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / f"{SHARED_CHECK_PREFIX}{token}").write_text(token)
            written = (token, socket.gethostname())
        except OSError as e:  # said by rank 0 (a storage error); the others only learn that it failed
            failure = e
    written = groups.broadcast_from_main(written)
    if written is None:
        if failure is not None:
            raise failure
        raise ConfigError(f"output_dir={path}: rank 0 could not write there")
    token, main_host = written
    seen = _sees_token(path / f"{SHARED_CHECK_PREFIX}{token}", token)
    views = groups.gather_from_all((socket.gethostname(), seen))
    if dist_env.is_main:
        (path / f"{SHARED_CHECK_PREFIX}{token}").unlink(missing_ok=True)
    blind: dict[str, list[int]] = {}
    for rank, (host, ok) in enumerate(views):
        if not ok:
            blind.setdefault(host, []).append(rank)
    if blind:
        who = ", ".join(f"{host} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})" for host, ranks in blind.items())
        raise ConfigError(
            f"output_dir={path} is not the same directory on every node: {who} cannot see what rank 0 wrote there on "
            f"{main_host}; output_dir must be on a filesystem every node shares (NFS, Lustre, ...), not a node's own disk or /tmp"
        )


def _sees_token(file: Path, token: str, wait_seconds: float = 2.0) -> bool:
    """Read back the token, allowing a network filesystem a moment to show another client's new file."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            if file.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


# ---------------------------------------------------------------- the lock


def acquire_lock(path: Path) -> int:
    """flock on OUTPUT_DIR/run.lock, held until the process ends. The kernel drops the lock of a process
    that died, so a stale lock file (a killed job) is taken over; its old contents only feed the message."""
    path.mkdir(parents=True, exist_ok=True)
    lock_path = path / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = _read_json(lock_path) or {}
        raise RunLockedError(
            f"output_dir={path} is in use by another job (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"since {holder.get('started_at', '?')}); wait for it to end, stop it, or choose another output_dir"
        ) from None
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return fd


# ---------------------------------------------------------------- the start decision


def read_run_file(path: Path) -> Optional[dict]:
    return _read_json(path / RUN_FILE)


def update_run_file(path: Path, **fields: Any) -> None:
    record = read_run_file(path) or {}
    record.update(fields)
    atomic_write(path / RUN_FILE, json.dumps(record, indent=2) + "\n")


def _read_json(file: Path) -> Optional[dict]:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _has_outputs(path: Path) -> list[str]:
    """The run artifacts present (run.json alone is not an output: a run that crashed before writing any)."""
    found = []
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()):
        found.append("checkpoints")
    for name in ("model.pt", "summary.json"):
        if (path / name).exists():
            found.append(name)
    return found


def decide_start(path: Path, cfg: Config, restarted: bool) -> RunInfo:
    """Main process, under the lock: who this run is and where it resumes from; writes run.json."""
    resume, start_over = cfg.train.resume, cfg.train.start_over
    existing = read_run_file(path)
    outputs = _has_outputs(path)
    notes: list[str] = []
    run_fingerprint = fingerprint(cfg)

    if existing is not None and (restarted or resume == "auto"):
        plan = ResumePlan("auto")
        if restarted and resume not in (None, "auto"):
            # Restarts move forward: the newest checkpoint of this run, the explicit one only if none exists yet.
            plan = ResumePlan("auto", fallback=resume)
        diverged = existing.get("diverged_at_step")
        if restarted and diverged is not None:
            raise ConfigError(
                f"this run (output_dir={path}) diverged at optimizer step {diverged}; a restart would train into it again. "
                "Lower optim.lr or set train.grad_clip and resume explicitly with train.resume=auto"
            )
        if diverged is not None:  # the user resumes by hand, presumably with a fix
            update_run_file(path, diverged_at_step=None)
        return RunInfo(existing["run_id"], existing.get("fingerprint", run_fingerprint), plan, tuple(notes))

    explicit_path = resume not in (None, "auto")
    if existing is not None and explicit_path and _is_inside(Path(resume), path):
        # Rolling this run back to one of its own checkpoints: the same run, continued from there.
        if existing.get("diverged_at_step") is not None:
            update_run_file(path, diverged_at_step=None)
        return RunInfo(existing["run_id"], existing.get("fingerprint", run_fingerprint), ResumePlan("path", resume), tuple(notes))

    if outputs:
        owner = f"run {existing['run_id']}" if existing else "a run of an older dist_train or another tool"
        if not start_over:
            continue_hint = "set train.resume=auto to continue it, " if existing else ""
            raise ConfigError(
                f"output_dir={path} already holds {' and '.join(outputs)} of {owner}; {continue_hint}choose another "
                f"output_dir, or set train.start_over=true to move them to {path / PREVIOUS_DIR}/ and start a new run"
            )
        moved_to = move_aside(path, existing["run_id"] if existing else "unknown")
        notes.append(f"train.start_over: moved the outputs of {owner} to {moved_to}")

    run_id = uuid.uuid4().hex[:12]
    record = {
        "run_id": run_id,
        "fingerprint": run_fingerprint,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parent": resume if explicit_path else None,
        "diverged_at_step": None,
    }
    atomic_write(path / RUN_FILE, json.dumps(record, indent=2) + "\n")
    if resume == "auto":
        return RunInfo(run_id, run_fingerprint, ResumePlan("none"), (*notes, f"train.resume=auto: nothing to resume in {path}; starting run {run_id}"))
    plan = ResumePlan("path", resume) if explicit_path else ResumePlan("none")
    return RunInfo(run_id, run_fingerprint, plan, tuple(notes))


def _is_inside(candidate: Path, directory: Path) -> bool:
    try:
        candidate.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def move_aside(path: Path, run_id: str) -> Path:
    """Move a run's artifacts into previous/<run_id>-<time>/ (same filesystem: renames, nothing copied)."""
    target = path / PREVIOUS_DIR / f"{run_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while target.exists():
        target = target.with_name(f"{target.name}-{suffix}")
        suffix += 1
    target.mkdir(parents=True)
    for name in RUN_ARTIFACTS:
        if (path / name).exists():
            os.rename(path / name, target / name)
    return target
