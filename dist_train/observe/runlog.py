"""What a run's processes wrote: the console log and each rank's warnings and tracebacks.

  OUTPUT_DIR/logs/console.log    what the main process's terminal showed (progress-bar frames left out)
  OUTPUT_DIR/logs/rank-K.log     everything rank K wrote to stderr: warnings, tracebacks

Both are appended across resumes. The metrics history (metrics.jsonl) is a tracker: tracking.py.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import IO, Any


LOG_DIR = "logs"
CONSOLE_LOG = "console.log"


class _Tee:
    """A text stream that also writes into a file (or a buffer until the file is known).

    Progress-bar frames (tqdm redraws with a carriage return) stay on the terminal only."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.files: list[IO[str]] = []
        self.pending: list[str] = []  # written before the run directory was decided

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        if text and "\r" not in text and "\x1b[" not in text:
            if self.files:
                for f in self.files:
                    f.write(text)
                    f.flush()
            else:
                self.pending.append(text)
        return written if written is not None else len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class RunLog:
    """Captures this process's stdout/stderr from the start of `dist-train train`; `attach` opens the files
    once the run directory is decided (a start_over moves the old logs aside first) and writes what was
    captured before. The main process's terminal goes to console.log; every rank's stderr to rank-K.log."""

    def __init__(self) -> None:
        self._stdout = _Tee(sys.stdout)
        self._stderr = _Tee(sys.stderr)
        self._files: list[IO[str]] = []
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = self._stdout, self._stderr

    def attach(self, output_dir: str | Path, dist_env: Any) -> None:
        self.is_main, self.global_rank = dist_env.is_main, dist_env.global_rank
        directory = Path(output_dir) / LOG_DIR
        directory.mkdir(parents=True, exist_ok=True)
        stamp = f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} pid {os.getpid()} ---\n"
        rank_file = open(directory / f"rank-{self.global_rank}.log", "a", encoding="utf-8")
        rank_file.write(stamp)
        self._files.append(rank_file)
        if self.is_main:
            console_file = open(directory / CONSOLE_LOG, "a", encoding="utf-8")
            console_file.write(stamp)
            self._files.append(console_file)
            # The terminal's interleaving of stdout and stderr is lost in the buffers; order by stream is kept.
            console_file.write("".join(self._stdout.pending + self._stderr.pending))
            self._stdout.files = [console_file]
            self._stderr.files = [console_file, rank_file]
        else:
            self._stdout.files = []
            self._stderr.files = [rank_file]
        rank_file.write("".join(self._stderr.pending))
        for f in self._files:
            f.flush()
        self._stdout.pending.clear()
        self._stderr.pending.clear()

    def record_exception(self, error: BaseException) -> None:
        """The full traceback of an error that ends this rank, into rank-K.log only (the terminal gets one line)."""
        import traceback

        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        for f in self._files[:1]:
            f.write(text)
            f.flush()

    def close(self) -> None:
        sys.stdout, sys.stderr = self._saved
        for f in self._files:
            f.close()
        self._files.clear()


# ---------------------------------------------------------------- known warning floods


def filter_known_warnings() -> None:
    """Silence the library warnings that repeat every step and say nothing to a dist_train user; any other
    warning still shows (each filter matches one message)."""
    # torch deprecates the collectives that DeepSpeed's ZeRO-3 calls several times per optimizer step.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base|_reduce_scatter_base)` is (deprecated|a private function)",
        category=FutureWarning,
    )
    # DCP without a process group (one process, `dist-train eval`/`export`): that is intended.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled, unavailable or uninitialized.*")


# ---------------------------------------------------------------- model summary


def model_summary(model: Any) -> str:
    """`Name: N parameters (T trainable, F frozen)`; counted before any wrapper partitions the parameters."""
    trainable = frozen = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return f"{type(model).__name__}: {trainable + frozen:,} parameters ({trainable:,} trainable, {frozen:,} frozen)"
