"""Preemption: a signal becomes a stop request that every rank honours at the same step boundary.

SIGTERM (what Slurm, Kubernetes and torchrun send before killing), SIGINT (Ctrl-C) and
`train.preemption_signal` (default SIGUSR2, asked for with `#SBATCH --signal=USR2@120`) only set
`trainer.stop_requested`. The handler does no I/O beyond one write to stderr and no collectives: the
trainer max-reduces the flag at the next step boundary, so all ranks save the same checkpoint collectively
(a save gated on the rank that got the signal would deadlock) and raise `TrainingInterrupted`.
`finish_interrupted` then requeues a Slurm job from the main process (`scontrol requeue`), and the
requeued job resumes from that checkpoint because `SLURM_RESTART_COUNT` is set.

Only the preemption signal requeues. SIGTERM under Slurm means `scancel` or the hard time limit (or a
preemption that Slurm requeues by itself): the checkpoint is saved and the job ends.

Not SIGUSR1 by default: NCCL may use it, and a stray USR1 should not stop training.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import Any, Optional

from ..config import ConfigError
from ..distributed.environment import DistEnv
from ..errors import EXIT_INTERRUPTED

_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}


def resolve_signal(name: str) -> signal.Signals:
    """'USR2', 'SIGUSR2' or '12' -> signal.SIGUSR2; ConfigError naming train.preemption_signal otherwise."""
    text = str(name).strip().upper()
    if text.isdigit():
        try:
            sig = signal.Signals(int(text))
        except ValueError:
            sig = None
    else:
        sig = getattr(signal.Signals, text if text.startswith("SIG") else "SIG" + text, None)
    if sig is None or sig.name in _UNCATCHABLE:
        raise ConfigError(
            f"train.preemption_signal={name!r} is not a signal this process can catch; use e.g. SIGUSR2 "
            "(and the same name in #SBATCH --signal=USR2@120)"
        )
    return sig


class StopOnSignals:
    """Context manager: while active, the signals set `target.stop_requested = True`; restores the old handlers."""

    def __init__(self, target: Any, signals: list[signal.Signals], preemption_signal: signal.Signals, announce: bool = True) -> None:
        self.target = target
        self.signals = list(dict.fromkeys([*signals, preemption_signal]))
        self.preemption_signal = preemption_signal
        self.announce = announce
        self.received: list[str] = []
        self.first_received_at: Optional[float] = None  # time.monotonic() of the first signal
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> "StopOnSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @property
    def preempted(self) -> bool:
        """The preemption signal (not just SIGTERM/SIGINT) arrived: the job should requeue."""
        return self.preemption_signal.name in self.received

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if self.first_received_at is None:
            self.first_received_at = time.monotonic()
        if self.announce and not self.target.stop_requested:
            # os.write, not print: a handler may interrupt a print in progress (print is not reentrant).
            os.write(2, f"dist-train: received {name}; saving a checkpoint at the next step boundary and stopping (continue later with train.resume=auto)\n".encode())
        self.target.stop_requested = True


def stop_on_signals(target: Any, preemption_signal: str, announce: bool = True) -> StopOnSignals:
    return StopOnSignals(target, [signal.SIGTERM, signal.SIGINT], resolve_signal(preemption_signal), announce)


def requeue_slurm_job(job_id: str, timeout: float = 60.0) -> tuple[bool, str]:
    """`scontrol requeue JOB`; (done, message). Never raises: the checkpoint is already safe."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return False, (
            f"scontrol is not on PATH, so Slurm job {job_id} cannot requeue itself; the checkpoint is complete: "
            "resubmit the job (it resumes with train.resume=auto)"
        )
    try:
        result = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"scontrol requeue {job_id} failed ({e}); the checkpoint is complete: resubmit the job to resume"
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip()
        return False, (
            f"scontrol requeue {job_id} failed: {reason} (is JobRequeue / #SBATCH --requeue allowed?); "
            "the checkpoint is complete: resubmit the job to resume"
        )
    return True, f"requeued Slurm job {job_id}; it resumes from the checkpoint when Slurm restarts it"


def finish_interrupted(reason: BaseException, dist_env: DistEnv, preempted: bool, signalled: bool = True, timing: str = "") -> int:
    """After the collective checkpoint: say so, requeue a preempted Slurm job (main process), return the status.

    `preempted`: this rank got the preemption signal; `signalled`: this rank got any stop signal; any
    rank's counts. A stop that no signal asked for (train.stop_at_step) is planned: exit 0, so torchrun
    does not report it as a failure. A signalled stop exits EXIT_INTERRUPTED: the training did not finish,
    and a wrapper script must not mistake it for success. A requeued job runs again regardless of it.
    """
    import torch
    import torch.distributed as dist

    from ..errors import EXIT_OK

    grouped = dist.is_available() and dist.is_initialized()
    if grouped:
        flags = torch.tensor([float(preempted), float(signalled)], device=dist_env.torch_device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        preempted, signalled = bool(flags[0].item()), bool(flags[1].item())
    if dist_env.is_main:
        requeued = dist_env.slurm_job_id is not None and preempted  # the requeued job resumes by itself
        how = "" if requeued else "; to continue, run the same command with train.resume=auto"
        print(f"dist-train: {'interrupted: ' if signalled else ''}{reason}" + (f" ({timing})" if timing else "") + how, file=sys.stderr, flush=True)
        if requeued:
            _, message = requeue_slurm_job(dist_env.slurm_job_id)
            print(f"dist-train: {message}", file=sys.stderr, flush=True)
        elif dist_env.slurm_job_id is not None and signalled:
            print(f"dist-train: Slurm job {dist_env.slurm_job_id} not requeued: only the preemption signal (train.preemption_signal) requeues", file=sys.stderr, flush=True)
    # The other ranks wait for the requeue: an earlier non-zero exit would let srun (--kill-on-bad-exit)
    # end the step, and rank 0 with it, before `scontrol requeue` was sent.
    if grouped:
        dist.barrier()
    return EXIT_INTERRUPTED if signalled else EXIT_OK


class StopAgreement:
    """All ranks agree on a stop request at the same optimizer step, soon after it arrived, without a host
    sync per step.

    At every `every`-th step boundary each rank starts an asynchronous MAX all-reduce of its stop flag on the
    control group (gloo, distributed/groups.py: CPU tensors, no device sync, even under NCCL) and waits for the one it started at
    the previous such boundary, which has long finished (DDP keeps ranks within one step of each other).
    Every rank reads the same result at the same boundary, so all stop at the same step. `every` follows the
    step time (`pace`, told at log steps with a value every rank shares), so the flag crosses the network
    about every `poll_seconds` however short the steps are: one tiny collective per half second, overlapped
    with compute, and a stop honoured within about a second, well inside any preemption grace period.
    (Measured on 2 gloo ranks with 1 thread each: a call costs 0.02-0.5 ms of the loop's time, which every
    step paid when it polled every step.)"""

    def __init__(self, control_group: Any, poll_seconds: float = 0.5, max_every: int = 1000) -> None:
        """`control_group`: ProcessGroups.control (None for one process: a stop needs no agreement)."""
        import torch
        import torch.distributed as dist

        self._torch, self._dist = torch, dist
        self.group = control_group
        self.poll_seconds = poll_seconds
        self.max_every = max_every
        self.every = 1  # until the first log step tells the pace
        self._boundaries = 0
        self._work: Any = None
        self._flag: Any = None

    def pace(self, step_seconds: float) -> None:
        """Call on every rank with the same value (the slowest rank's seconds per step, agreed at a log step)."""
        self.every = max(1, min(self.max_every, int(self.poll_seconds / max(step_seconds, 1e-9))))

    def step(self, requested: bool) -> bool:
        """Called at every step boundary on every rank; True on every rank alike once any rank's request has
        crossed (a boundary or two of the agreement interval after it)."""
        if self.group is None:
            return requested
        self._boundaries += 1
        if self._boundaries % self.every:
            return False
        agreed = False
        if self._work is not None:
            self._work.wait()
            agreed = bool(self._flag.item() > 0)
        self._flag = self._torch.tensor([float(requested)])
        self._work = self._dist.all_reduce(self._flag, op=self._dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def close(self) -> None:
        """Finish the collective in flight (every rank started it), so none is pending at teardown."""
        if self._work is not None:
            self._work.wait()
            self._work = None
