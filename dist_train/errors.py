"""Which exceptions reach the user as one clear line (no traceback)."""

from __future__ import annotations

from typing import Optional


def user_facing_message(error: BaseException) -> Optional[str]:
    from .checkpoint import CheckpointError
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
