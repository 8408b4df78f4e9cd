"""Which exceptions reach the user as one clear line (no traceback)."""

from __future__ import annotations

from typing import Optional


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and what differs."""


def user_facing_message(error: BaseException) -> Optional[str]:
    from .env import LaunchError

    user_errors: tuple[type[BaseException], ...] = (CheckpointError, LaunchError, FloatingPointError)
    try:
        from .data.shards import DataError

        user_errors += (DataError,)
    except ImportError:
        pass
    if isinstance(error, user_errors):
        return str(error)
    return None
