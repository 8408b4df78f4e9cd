"""What a run leaves behind besides checkpoints: its console log, each rank's warnings and tracebacks, and
its metrics history.

  OUTPUT_DIR/logs/console.log    what the main process's terminal showed (progress-bar frames left out)
  OUTPUT_DIR/logs/rank-K.log     everything rank K wrote to stderr: warnings, tracebacks
  OUTPUT_DIR/metrics.jsonl       one JSON object per logged global step: {"step": N, "train/loss": ..., ...}

All three are appended across resumes. The history holds each step once: a resumed run first drops the
rows an earlier attempt wrote after the checkpoint it resumes from, and a second log call at the same
step (the eval after the train line) is merged into that step's row.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import IO, Any, Optional

from .tracking import Tracker

LOG_DIR = "logs"
CONSOLE_LOG = "console.log"
METRICS_FILE = "metrics.jsonl"


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


# ---------------------------------------------------------------- metrics history


def read_history(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl (a run directory or the file itself); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _plain(value: Any) -> Any:
    value = float(value) if not isinstance(value, (int, str)) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsHistory(Tracker):
    """OUTPUT_DIR/metrics.jsonl: every logged scalar at its global optimizer step (see the module doc)."""

    name, key = "metrics history", "history"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: Optional[IO[str]] = None
        self._row: Optional[dict] = None
        self._row_offset = 0

    def start(self, cfg: Any, step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [row for row in read_history(self.path) if row["step"] <= step]
        text = "".join(json.dumps(row) + "\n" for row in kept)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._row = kept[-1] if kept else None
        self._row_offset = len(text.encode()) - (len((json.dumps(kept[-1]) + "\n").encode()) if kept else 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._file is None:  # not started: an evaluation of a checkpoint writes no history
            return
        values = {k: _plain(v) for k, v in metrics.items()}
        if self._row is not None and self._row["step"] == step:
            self._row.update(values)
            self._file.seek(self._row_offset)
            self._file.truncate()
        else:
            self._file.seek(0, os.SEEK_END)
            self._row_offset = self._file.tell()
            self._row = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(self._row) + "\n")
        self._file.flush()

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
