"""Console output and experiment trackers.

Only the global main process gets real trackers; every other rank gets `NullTracker`, so the loop calls
`tracker.log(...)` everywhere with no rank checks.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from .config import Config
from .env import DistEnv


class Tracker:
    """The tracker interface; also the null tracker (every method does nothing)."""

    def start(self, cfg: Config, step: int) -> None:
        """Open (or resume) the run; `step` is the optimizer step training continues from."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record scalars at a global optimizer step."""

    def finish(self) -> None:
        """Flush and close."""

    # Checkpointed so a requeued job continues the same run.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


NullTracker = Tracker


def build_tracker(cfg: Config, dist_env: DistEnv) -> Tracker:
    if not dist_env.is_main:
        return NullTracker()
    return NullTracker()


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


class ConsoleLog:
    """Prints on the main process only; per-rank problems still surface as exceptions."""

    def __init__(self, dist_env: DistEnv, show_progress_bar: bool = True, stream: Any = None) -> None:
        self.enabled = dist_env.is_main
        self.show_progress_bar = show_progress_bar
        self.stream = stream or sys.stdout

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def progress_bar(self, total: int, initial: int = 0) -> Any:
        if not (self.enabled and self.show_progress_bar and sys.stderr.isatty()):
            return _NullBar()
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, dynamic_ncols=True, leave=False)

    def log_line(self, step: int, epoch: int, metrics: dict[str, float], bar: Any = None) -> None:
        line = (
            f"step {step:>6} | epoch {epoch} | loss {metrics['train/loss']:.4f} | lr {metrics['train/lr']:.3e} | "
            f"grad_norm {metrics['train/grad_norm']:.3f} | {metrics['train/samples_per_second']:.0f} samples/s"
        )
        self.print(line)
