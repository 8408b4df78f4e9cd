"""Hang detection that names the rank: a heartbeat per rank through the rendezvous store.

The loop marks where it is with one attribute write per phase (`watchdog.mark(step, "forward/backward")`);
a daemon thread on every rank publishes that, a beat counter and the main thread's last stack lines to
the c10d store of the default process group every `beat_seconds`. The store is a TCP key-value server
that no collective uses after start-up, so it still answers while a collective is stuck.

When a rank's loop has stayed in one phase longer than its limit (`strategy.hang_timeout_seconds` once
training is steady; `strategy.startup_timeout_seconds` before the first step completes and during
evaluation, checkpoints and the end of the run), its thread sets a hang key in the store. Every live rank
that sees it writes all its Python stacks (and, on CUDA, the NCCL flight recorder where torch provides
it) to OUTPUT_DIR/hang/; the lowest live rank reads every rank's last heartbeat and prints one screen:
which rank is behind (or stopped answering), at which step and phase, and its last stack lines. Every
live rank then exits with EXIT_RETRY (75): torchrun --max-restarts restarts the job and it resumes from
the newest checkpoint, as a Slurm requeue does.

A rank that is stopped (SIGSTOP, a swapped-out node) or dead publishes nothing: its heartbeat counter is
frozen, which is how it is told apart from a rank that is alive but waiting. Its last published stack is
the one the screen shows. A rank that cannot reach the store at all treats it as a lost peer (the store
lives on rank 0's host) and exits the same way.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from ..errors import EXIT_RETRY

# Ordered as they happen within one optimizer step; boundary work (log, eval, checkpoint) belongs to the
# step just completed, so (step, order) sorts ranks by how far they got.
PHASES = ("startup", "data", "forward/backward", "optimizer", "log", "eval", "checkpoint", "finish")
# Phases that may legitimately take long on one rank while the others wait for it.
SLOW_PHASES = {"startup", "eval", "checkpoint", "finish"}
STACK_LINES = 6


def main_thread_stack(limit: int = STACK_LINES) -> list[str]:
    """The main thread's innermost `limit` frames as 'file:line in function: source' lines."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    if frame is None:
        return []
    frames = traceback.extract_stack(frame)[-limit:]
    return [f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in frames]


class NullWatchdog:
    """One process, or the watchdog turned off: marks cost one call and do nothing."""

    steady = False
    last_checkpoint_step: Optional[int] = None

    def mark(self, step: int, phase: str) -> None:
        pass

    def stop(self) -> None:
        pass


class Watchdog:
    """One per rank; `mark` from the loop, everything else in the thread."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        directory: Path,
        hang_timeout: float,
        startup_timeout: float,
        attempt: int = 0,
        is_cuda: bool = False,
    ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.directory = Path(directory)
        self.hang_timeout = hang_timeout
        self.startup_timeout = startup_timeout
        self.is_cuda = is_cuda
        self.beat_seconds = min(max(hang_timeout / 10.0, 0.2), 5.0)
        self.prefix = f"dist_train/watchdog/{attempt}"
        self.where: tuple[int, str, float] = (0, "startup", time.monotonic())
        self.steady = False  # set after the first optimizer step: from then on hang_timeout applies
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._beat = 0
        self.last_checkpoint_step: Optional[int] = None
        self.run_ended = False  # every rank finished together: a store that goes away is a peer that is done

    # ------------------------------------------------------------ the loop's side (cheap)

    def mark(self, step: int, phase: str) -> None:
        self.where = (step, phase, time.monotonic())

    # ------------------------------------------------------------ life cycle

    def start(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._run, name="dist_train-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Join the thread, so no thread of ours is alive when the process group and interpreter go down."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self.beat_seconds * 4, 10.0))
            self._thread = None

    # ------------------------------------------------------------ the thread

    def _key(self, *parts: object) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def _limit(self, phase: str) -> float:
        return self.startup_timeout if (phase in SLOW_PHASES or not self.steady) else self.hang_timeout

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.beat_seconds):
                step, phase, since = self.where
                stalled = time.monotonic() - since
                self._beat += 1
                beat = {"beat": self._beat, "step": step, "phase": phase, "stalled": round(stalled, 1), "pid": os.getpid(), "stack": main_thread_stack()}
                self.store.set(self._key("beat", self.rank), json.dumps(beat))
                if self.store.check([self._key("hang")]):
                    self._on_hang()
                    return
                if stalled > self._limit(phase) and not self._stop.is_set():
                    reason = {"rank": self.rank, "step": step, "phase": phase, "stalled": round(stalled, 1), "limit": self._limit(phase)}
                    self.store.set(self._key("hang"), json.dumps(reason))
                    self._on_hang()
                    return
        except Exception as e:  # the store stopped answering: its host (rank 0's) is gone or stopped
            if self._stop.is_set() or self.run_ended:
                return
            self._lost_store(e)

    def _on_hang(self) -> None:
        self._dump_own_stacks()
        self.store.set(self._key("dumped", self.rank), "1")
        peers = self._read_peers()
        reporter = min((r for r, p in peers.items() if p["responding"]), default=self.rank)
        if reporter == self.rank:
            deadline = time.monotonic() + max(3 * self.beat_seconds, 3.0)
            alive = [r for r, p in peers.items() if p["responding"]]
            while time.monotonic() < deadline and not self.store.check([self._key("dumped", r) for r in alive]):
                time.sleep(0.1)
            reason = json.loads(self.store.get(self._key("hang")))
            screen = hang_report(peers, reason, self.directory, self.last_checkpoint_step)
            self._write(self.directory / "hang" / "report.txt", screen)
            print(screen, file=sys.stderr, flush=True)
            self.store.set(self._key("reported"), "1")
        else:
            # Wait for the report before leaving: a launcher kills the others once one rank exits.
            deadline = time.monotonic() + max(10 * self.beat_seconds, 10.0)
            while time.monotonic() < deadline and not self.store.check([self._key("reported")]):
                time.sleep(0.1)
        self._exit()

    def _lost_store(self, error: BaseException) -> None:
        self._dump_own_stacks()
        step, phase, since = self.where
        print(
            f"dist-train: HANG: rank {self.rank} lost the rendezvous store (rank 0's host) at step {step}, phase {phase} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); a peer is gone or stopped. "
            f"Stacks: {self.directory / 'hang'}; exiting with {EXIT_RETRY} to retry from the newest checkpoint",
            file=sys.stderr,
            flush=True,
        )
        self._exit()

    def _read_peers(self) -> dict[int, dict]:
        """Every rank's last heartbeat, read twice two beats apart: a frozen counter means not responding."""

        def read() -> dict[int, dict]:
            beats = {}
            for r in range(self.world_size):
                key = self._key("beat", r)
                if self.store.check([key]):
                    beats[r] = json.loads(self.store.get(key))
            return beats

        first = read()
        time.sleep(2.5 * self.beat_seconds)
        second = read()
        peers = {}
        for r in range(self.world_size):
            beat = second.get(r) or first.get(r) or {"beat": 0, "step": -1, "phase": "startup", "stalled": 0.0, "stack": []}
            moved = r in second and second[r]["beat"] != first.get(r, {}).get("beat")
            peers[r] = {**beat, "responding": r == self.rank or moved}
        return peers

    def _dump_own_stacks(self) -> None:
        folder = self.directory / "hang"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"rank-{self.rank}.txt", "w") as f:
                step, phase, since = self.where
                f.write(f"rank {self.rank} pid {os.getpid()}: step {step}, phase {phase}, {time.monotonic() - since:.1f} s in it\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
            if self.is_cuda:
                self._dump_nccl_flight_recorder(folder)
        except OSError as e:
            print(f"dist-train: rank {self.rank} could not write its stacks to {folder}: {e}", file=sys.stderr, flush=True)

    def _dump_nccl_flight_recorder(self, folder: Path) -> None:
        """torch keeps the last collectives per process when TORCH_NCCL_TRACE_BUFFER_SIZE > 0."""
        try:
            import torch

            dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
            if dump is not None:
                (folder / f"nccl-flight-recorder-rank-{self.rank}.pkl").write_bytes(dump())
        except Exception as e:  # a diagnostic must never mask the hang report
            print(f"dist-train: rank {self.rank}: no NCCL flight recorder dump ({e})", file=sys.stderr, flush=True)

    @staticmethod
    def _write(path: Path, text: str) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
        except OSError:
            pass

    @staticmethod
    def _exit() -> None:
        # The main thread is stuck in a collective or stopped peer: only leaving the process ends it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_RETRY)


def hang_report(peers: dict[int, dict], reason: dict, directory: Path, last_checkpoint_step: Optional[int]) -> str:
    """The one screen: who is behind, where, its last stack lines, and what happens next."""
    order = {p: i for i, p in enumerate(PHASES)}

    def position(p: dict) -> tuple:
        return (p["step"], order.get(p["phase"], 0))

    silent = [r for r, p in peers.items() if not p["responding"]]
    if silent:
        behind = silent
    else:
        lowest = min(position(p) for p in peers.values())
        behind = [r for r, p in peers.items() if position(p) == lowest]
        if len(behind) == len(peers):
            behind = [int(reason["rank"])]
    lines = [
        f"dist-train: HANG: rank {reason['rank']} made no progress for {reason['stalled']:.0f} s in phase {reason['phase']} "
        f"(limit {reason['limit']:.0f} s: strategy.hang_timeout_seconds / strategy.startup_timeout_seconds)"
    ]
    for r in behind:
        p = peers[r]
        state = "stopped answering (process stopped, killed or stuck outside Python)" if not p["responding"] else f"{p['stalled']:.0f} s in this phase"
        lines.append(f"  rank {r} is behind: step {p['step']}, phase {p['phase']}, pid {p.get('pid', '?')}, {state}")
        stack = p.get("stack") or []
        lines.append(f"    its last stack lines{' (from its last heartbeat)' if not p['responding'] else ''}:")
        lines += [f"      {s}" for s in stack] or ["      (none published)"]
    for r, p in sorted(peers.items()):
        if r not in behind:
            top = (p.get("stack") or ["?"])[-1]
            lines.append(f"  rank {r}: step {p['step']}, phase {p['phase']}, waiting {p['stalled']:.0f} s at {top}")
    saved = f"step {last_checkpoint_step}" if last_checkpoint_step is not None else "none of this attempt; the run's newest"
    lines.append(f"  all stacks of every live rank: {directory / 'hang'}/rank-*.txt")
    lines.append(
        f"  exiting with {EXIT_RETRY}: retry from the newest checkpoint ({saved}); torchrun --max-restarts and a Slurm "
        "requeue resume it with train.resume=auto"
    )
    return "\n".join(lines)


def start_watchdog(settings: Any, output_dir: str, groups: Any) -> Optional[Watchdog]:
    """A started Watchdog on every rank of a multi-process job, or None (one process, or turned off).
    `settings`: the strategy section (its timeouts); `groups`: ProcessGroups, whose rendezvous store carries
    the heartbeats."""
    if settings.hang_timeout_seconds <= 0 or not groups.dist_env.distributed:
        return None
    store = groups.rendezvous_store(timeout_seconds=max(settings.hang_timeout_seconds, 10.0))
    if store is None:
        return None
    dist_env = groups.dist_env
    watchdog = Watchdog(
        store,
        dist_env.global_rank,
        dist_env.world_size,
        Path(output_dir),
        settings.hang_timeout_seconds,
        settings.startup_timeout_seconds,
        attempt=dist_env.restart_count,
        is_cuda=dist_env.device.startswith("cuda"),
    )
    return watchdog.start()
