"""Exit codes, and which exceptions reach the user as one clear line (no traceback).

The exit codes are chosen so that torchrun, Slurm and a user's script each do the right thing:

  0    done, or stopped at `train.stop_at_step` with a checkpoint saved (a planned stop is not a failure)
  1    unexpected error (a bug, or something dist_train does not recognise): the traceback says where
  2    configuration, launch, data or checkpoint error: fix what the line names, then rerun; don't retry
  3    diverged (guard.py): lower the LR or clip, then resume by hand; a restart would diverge again
  74   storage error (disk full, permission denied, read-only file system): free space or fix the path,
       then resume; the previous checkpoint is intact (EX_IOERR in sysexits.h)
  75   a rank hung or was lost: retry from the newest checkpoint (EX_TEMPFAIL; Slurm admins can list it
       in RequeueExit so a job requeues itself, torchrun --max-restarts restarts on it)
  130  stopped by a signal (SIGTERM, SIGINT, train.preemption_signal) with a checkpoint saved: resume
"""

from __future__ import annotations

import errno
from typing import Optional

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3  # guard.py re-exports it
EXIT_STORAGE_ERROR = 74
EXIT_RETRY = 75
EXIT_INTERRUPTED = 130

_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


def storage_error(error: BaseException) -> Optional[OSError]:
    """The disk-full / permission OSError behind `error`, looking through exception chains and DCP's
    CheckpointException (which keeps each rank's failure in `.failures`)."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _STORAGE_ERRNOS:
            return current
        text = str(current)
        # torch.save's zip writer loses the errno: "PytorchStreamWriter failed writing file ...: file write failed".
        if "No space left on device" in text or "file write failed" in text:
            return OSError(errno.ENOSPC, "No space left on device")
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):  # DCP: {rank: (exception, traceback summary)}
            for failure in failures.values():
                failure = failure[0] if isinstance(failure, tuple) and failure else failure
                if isinstance(failure, BaseException):
                    pending.append(failure)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)
    return None


def describe_storage_error(error: OSError, hint_path: Optional[str] = None) -> str:
    what = _STORAGE_ERRNOS.get(error.errno or 0, error.strerror or str(error))
    path = error.filename or hint_path
    where = f" writing {path}" if path else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free space there (or set output_dir= to a larger disk)"
    else:
        todo = "make it writable by this user (or set output_dir= to a directory that is)"
    return f"{what}{where}: {todo}, then resume with train.resume=auto; complete checkpoints already written are intact"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and what differs."""


def _file_in_the_way(path: str) -> Optional[str]:
    """`path` or the parent of it that is a file where a directory was to be made; None if there is none."""
    from pathlib import Path

    return next((str(p) for p in (Path(path), *Path(path).parents) if p.exists() and not p.is_dir()), None)


def user_facing_message(error: BaseException) -> Optional[str]:
    """The one line to print for `error`, or None when it is unexpected (then the traceback is wanted)."""
    classified = classify(error)
    return classified[1] if classified else None


def classify(error: BaseException) -> Optional[tuple[str, str, int]]:
    """(kind, one line, exit code) for an error the user can act on; None for an unexpected one."""
    from .config import ConfigError
    from .distributed.environment import LaunchError, MachineError

    if isinstance(error, ConfigError):
        return "config error", str(error), EXIT_CONFIG_ERROR
    if isinstance(error, MachineError):  # one machine's own setup: said by its ranks (the main process may not meet it)
        return "launch error on this machine", str(error), EXIT_CONFIG_ERROR
    if isinstance(error, LaunchError):  # like a config error, the launch command or its environment must change
        return "launch error", str(error), EXIT_CONFIG_ERROR
    in_the_way = _file_in_the_way(str(error.filename)) if isinstance(error, (FileExistsError, NotADirectoryError)) and error.filename else None
    if in_the_way is not None:
        return "config error", f"{in_the_way} is a file where a directory is needed: set output_dir (or the key naming it) to a directory", EXIT_CONFIG_ERROR
    storage = storage_error(error)
    if storage is not None:
        return "storage error", describe_storage_error(storage), EXIT_STORAGE_ERROR
    if isinstance(error, CheckpointError):
        return "error", str(error), EXIT_CONFIG_ERROR
    try:
        from .data.shards import DataError
    except ImportError:  # pragma: no cover - the data extra is part of the package
        DataError = ()  # type: ignore[assignment,misc]
    if DataError and isinstance(error, DataError):
        return "error", str(error), EXIT_CONFIG_ERROR
    if isinstance(error, FloatingPointError):
        return "error", str(error), EXIT_ERROR
    return None
