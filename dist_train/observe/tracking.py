"""Console output and experiment trackers (Weights & Biases, TensorBoard).

Only the global main process gets real trackers; every other rank gets `NullTracker`, so the loop calls
`tracker.log(...)` everywhere with no rank checks. Real trackers sit behind a `TrackerGroup`, which fans
out to each of them, keeps logged steps strictly increasing across a resume, and turns any tracker's
failure into one warning: training never dies because W&B or TensorBoard did.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Optional

from ..config import Config, WandbConfig
from ..distributed.environment import DistEnv


class Tracker:
    """The tracker interface; also the null tracker (every method does nothing)."""

    name = "null"  # in messages
    key = "null"  # in the checkpointed state

    def start(self, cfg: Config, step: int) -> None:
        """Open (or resume) the run; `step` is the optimizer step training continues from."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record scalars at a global optimizer step; a second call at the same step adds to that step."""

    def finish(self) -> None:
        """Flush and close; a second call does nothing."""

    # Checkpointed so a requeued job continues the same run.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


NullTracker = Tracker


def build_tracker(cfg: Config, dist_env: DistEnv) -> Tracker:
    if not dist_env.is_main:
        return NullTracker()
    # The plain-text history is always kept: it is what `dist-train plot` and the end-of-run picture read.
    trackers: list[Tracker] = [MetricsHistory(Path(cfg.output_dir) / METRICS_FILE)]
    if cfg.tracking.wandb.enabled:
        trackers.append(WandbTracker(cfg.tracking.wandb, cfg.output_dir))
    if cfg.tracking.tensorboard.enabled:
        trackers.append(TensorBoardTracker(Path(cfg.output_dir) / "tensorboard"))
    return TrackerGroup(trackers)


def warn(text: str) -> None:
    print(f"dist_train: warning: {text}", file=sys.stderr, flush=True)


def describe(error: BaseException) -> str:
    """`Type: first line of the message`: W&B's errors run over several lines."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class TrackerGroup(Tracker):
    """Fan-out to several trackers.

    Steps: within one process a step may be logged more than once (eval after train at the same optimizer
    step lands in the same row); after a resume only steps above the last one logged before the checkpoint
    go out, so no step is logged twice across a restart.
    Failures: a tracker that raises is dropped with one warning and training goes on; its checkpointed
    state is still carried forward so a later restart can continue its run.
    """

    name = key = "group"

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = {t.key: t for t in trackers}
        self.last_step = -1
        self.min_step = 0
        self._carried_state: dict[str, dict] = {}

    def start(self, cfg: Config, step: int) -> None:
        for key in list(self.trackers):
            self._call(key, "start", cfg, step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step < self.min_step:
            return
        self.min_step = self.last_step = step
        for key in list(self.trackers):
            self._call(key, "log", metrics, step)

    def finish(self) -> None:
        for key in list(self.trackers):
            self._call(key, "finish")

    def state_dict(self) -> dict:
        state: dict = {"last_step": self.last_step, **self._carried_state}
        for key, tracker in self.trackers.items():
            try:
                state[key] = tracker.state_dict()
            except Exception as e:  # the checkpoint must not fail because a tracker did
                warn(f"{tracker.name} tracking failed in state_dict ({describe(e)}); its run id is not checkpointed")
        return state

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state.get("last_step", -1))
        self.min_step = self.last_step + 1
        self._carried_state = {k: v for k, v in state.items() if isinstance(v, dict) and k not in self.trackers}
        for key in list(self.trackers):
            if key in state:
                self._call(key, "load_state_dict", state[key])

    def _call(self, key: str, method: str, *args: Any) -> None:
        tracker = self.trackers[key]
        try:
            getattr(tracker, method)(*args)
        except Exception as e:
            del self.trackers[key]
            try:
                self._carried_state[key] = tracker.state_dict()
            except Exception:
                pass
            warn(f"{tracker.name} tracking failed in {method} ({describe(e)}); training continues without {tracker.name}")


# ---------------------------------------------------------------- Weights & Biases


def wandb_api_key_configured() -> bool:
    """Whether W&B would find credentials: WANDB_API_KEY / an identity token, or `wandb login`'s netrc entry.

    Only the yes/no leaves this function; the key itself is never kept, printed or written.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib.wbauth import wbnetrc

        return wbnetrc.read_netrc_auth(host=os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai") is not None
    except Exception:  # no wandb, an unreadable netrc, or wandb's private module moved
        return False


_WANDB_MODE_ALIASES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def resolve_wandb_mode(configured: Optional[str]) -> str:
    """tracking.wandb.mode, else W&B's own WANDB_MODE, else online exactly when an API key is configured."""
    if configured:
        return configured
    env_mode = _WANDB_MODE_ALIASES.get(os.environ.get("WANDB_MODE", "").strip().lower())
    if env_mode:
        return env_mode
    return "online" if wandb_api_key_configured() else "offline"


def _new_run_id() -> str:
    # `secrets`, not `random`: nothing here may draw from the generators training uses.
    return "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))


class WandbTracker(Tracker):
    """One W&B run per training job; its id is checkpointed and a resumed job continues that run."""

    name, key = "W&B", "wandb"

    def __init__(self, settings: WandbConfig, output_dir: str) -> None:
        self.settings = settings
        self.directory = Path(settings.dir or output_dir)
        self.run_id: Optional[str] = None
        self.run: Any = None
        self.min_step = 0

    def start(self, cfg: Config, step: int) -> None:
        """Starts W&B in a background thread and returns at once.

        An online init waits for the server up to init_timeout_seconds (and W&B retries beyond it); on the main
        process that would hold every other rank in its next collective, past strategy.timeout_seconds. Until
        the thread is done, `log` keeps the metrics and sends them in order once the run exists."""
        try:
            import wandb
        except ImportError as e:
            raise ImportError(f"{e}; install it with `pip install 'dist_train[tracking]'` or set tracking.wandb.enabled=false") from e

        mode = resolve_wandb_mode(self.settings.mode)
        if mode == "disabled":
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # The id is known at once, so a checkpoint taken before the init finishes still continues this run.
        self.run_id = self.run_id or _new_run_id()
        init_args: dict[str, Any] = dict(
            project=self.settings.project,
            entity=self.settings.entity,
            name=self.settings.run_name or Path(cfg.output_dir).resolve().name,
            tags=list(self.settings.tags),
            config=cfg.to_dict(),
            dir=str(self.directory),
            settings=wandb.Settings(init_timeout=self.settings.init_timeout_seconds),
            # "allow", not "must": a run started offline and never synced is new to the server.
            id=self.run_id,
            resume="allow",
        )
        self._pending: list[tuple[dict, int]] = []
        self._init_error: Optional[BaseException] = None
        self._ready = threading.Event()
        self._init_thread = threading.Thread(target=self._init, args=(wandb, mode, init_args, step), name="dist_train-wandb-init", daemon=True)
        self._init_thread.start()

    def _init(self, wandb: Any, mode: str, init_args: dict, step: int) -> None:
        try:
            try:
                run = wandb.init(mode=mode, **init_args)
            except Exception as e:
                if mode != "online":
                    raise
                warn(
                    f"W&B online init failed ({describe(e)}); logging offline under {self.directory / 'wandb'} instead "
                    "(upload later with `wandb sync`; waiting longer: tracking.wandb.init_timeout_seconds)"
                )
                mode = "offline"
                # A new id: W&B's service still holds the failed online run under the old one and writes nothing
                # for a second run of that id in this process.
                self.run_id = init_args["id"] = _new_run_id()
                run = wandb.init(mode=mode, **init_args)
            # W&B drops steps below the run's current one: online the server knows it after a resume; offline
            # an earlier attempt that crashed after the checkpoint may have written later steps to its own file.
            min_step = int(getattr(run, "starting_step", 0) or 0)
            if mode == "offline" and step > 0:
                from .wandb_offline import last_logged_step

                previous = last_logged_step(self.directory / "wandb", self.run_id)
                if previous is not None:
                    min_step = max(min_step, previous + 1)
            self.min_step = min_step
            self.run = run
        except BaseException as e:  # reported on the main thread by the next log/finish
            self._init_error = e
        finally:
            self._ready.set()

    def _flush_pending(self) -> None:
        """On the main thread: raise an init failure (TrackerGroup drops the tracker), or send what waited."""
        if self._init_error is not None:
            error, self._init_error = self._init_error, None
            raise error
        pending, self._pending = self._pending, []
        for metrics, step in pending:
            self._log_now(metrics, step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not hasattr(self, "_ready"):
            return
        if not self._ready.is_set():
            self._pending.append((dict(metrics), step))
            return
        self._flush_pending()
        self._log_now(metrics, step)

    def _log_now(self, metrics: dict[str, float], step: int) -> None:
        # An explicit step with the default commit: a second call at the same step joins that step's row;
        # the row is written when a higher step arrives (or at finish).
        if self.run is not None and step >= self.min_step:
            self.run.log(dict(metrics), step=step)

    def finish(self) -> None:
        if not hasattr(self, "_ready"):
            return
        # Bounded: W&B's own init timeout, then the offline fallback.
        self._ready.wait(timeout=2 * self.settings.init_timeout_seconds + 60)
        if not self._ready.is_set():
            warn(f"W&B did not start within {2 * self.settings.init_timeout_seconds + 60:.0f} s; its metrics of this run are not recorded")
            return
        self._flush_pending()
        if self.run is not None:
            self.run.finish()
            self.run = None

    def state_dict(self) -> dict:
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id") or None


# ---------------------------------------------------------------- TensorBoard


class TensorBoardTracker(Tracker):
    """Scalars into OUTPUT_DIR/tensorboard with `torch.utils.tensorboard.SummaryWriter`."""

    name, key = "TensorBoard", "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def start(self, cfg: Config, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # On a resume, events an earlier attempt wrote after the checkpoint's step are hidden by TensorBoard.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=step + 1 if step > 0 else None)
        self.writer.add_text("config", "```\n" + cfg.to_yaml() + "```", global_step=step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=step)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ---------------------------------------------------------------- console


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class ConsoleLog:
    """Prints on the main process only; per-rank problems still surface as exceptions.

    While a progress bar is drawn, lines go through `tqdm.write`, which clears the bar, prints the line and
    redraws the bar below it, so no line is glued to a half-drawn bar."""

    def __init__(self, dist_env: DistEnv, show_progress_bar: bool = True, stream: Any = None) -> None:
        self.enabled = dist_env.is_main
        self.show_progress_bar = show_progress_bar
        self.stream = stream
        self._bar: Any = None
        self._total = 0
        self._initial = 0
        self._start = time.monotonic()

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        stream = self.stream or sys.stdout
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=stream)
            stream.flush()
        else:
            print(text, file=stream, flush=True)

    def progress_bar(self, total: int, initial: int = 0) -> Any:
        """Also starts the clock that log lines' elapsed time and ETA are measured by."""
        self._total, self._initial, self._start = total, initial, time.monotonic()
        if not (self.enabled and self.show_progress_bar and sys.stderr.isatty()):
            return _NullBar()
        from tqdm import tqdm

        console = self

        class _Bar(tqdm):  # type: ignore[misc, valid-type]
            def close(self) -> None:
                console._bar = None
                super().close()

        self._bar = _Bar(total=total, initial=initial, dynamic_ncols=True, leave=False, unit="step")
        return self._bar

    def log_line(self, step: int, epoch: int, metrics: dict[str, float], bar: Any = None) -> None:
        elapsed = time.monotonic() - self._start
        done = step - self._initial
        eta = elapsed / done * (self._total - step) if done > 0 else float("nan")
        width = len(str(self._total))
        line = (
            f"step {step:>{width}}/{self._total} | epoch {epoch} | loss {metrics['train/loss']:.4f} | lr {metrics['train/lr']:.3e} | "
            f"grad_norm {metrics['train/grad_norm']:.3f} | {metrics['train/samples_per_second']:.0f} samples/s | "
            f"elapsed {format_duration(elapsed)} | eta {format_duration(eta) if eta == eta else '?'}"
        )
        if metrics.get("train/rank_skew", 1.0) >= 1.2:  # one rank holds the others back noticeably
            line += f" | slowest rank {metrics['train/slowest_rank']:.0f} x{metrics['train/rank_skew']:.1f}"
        if "train/skipped_steps" in metrics:  # fp16: the loss above leaves out the steps the scaler skipped
            line += f" | skipped {metrics['train/skipped_steps']:.0f}"
        if bar is not None:
            bar.set_postfix_str(f"loss {metrics['train/loss']:.4f}", refresh=False)
        self.print(line)


# ---------------------------------------------------------------- metrics history
# OUTPUT_DIR/metrics.jsonl: one JSON object per logged global step ({"step": N, "train/loss": ..., ...}),
# appended across resumes and holding each step once: a resumed run first drops the rows an earlier attempt
# wrote after the checkpoint it resumes from, and a second log call at the same step (the eval after the
# train line) is merged into that step's row.

METRICS_FILE = "metrics.jsonl"


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
