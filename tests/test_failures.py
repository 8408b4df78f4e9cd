"""When a cluster job goes wrong (issue 11): a stuck rank is named and the job retries from its checkpoint,
a straggler is named, a signal to the torchrun agent still ends in a checkpoint and leaves no worker.

Real torchrun jobs (`dist-train launch`) of the paced linear regression (tests/workers/paced_model.py), so
the test can stop, signal and kill processes mid-run; the stuck-rank job must end bitwise equal to the
uninterrupted one, which is also the straggler run (rank 1 sleeps longer; the arithmetic is the same).
"""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from dist_train.errors import EXIT_RETRY
from tests.procs import assert_same_parameters, final_model
from tests.test_launch import _wait, _wait_until, start  # noqa: F401 (start is a fixture)
from tests.workers.paced_model import TOTAL_STEPS
from tests.workers.paced_model import TRAIN_ARGS as PACED

LAUNCH = [sys.executable, "-m", "dist_train", "launch", "--nproc-per-node", "2"]
# Rank 1 is 4x slower in its forward than rank 0: a straggler; the numbers are the paced run's.
STRAGGLER = [*PACED, "model.kwargs={delay_seconds: 0.02, slow_rank: 1, slow_delay_seconds: 0.08}"]
HANG_TIMEOUT = 4.0


def _workers(agent: psutil.Process) -> dict[str, psutil.Process]:
    """torchrun's workers by their RANK (`dist-train launch` exec's torchrun, so the agent is the launched pid)."""
    return {w.environ().get("RANK"): w for w in agent.children()}


@pytest.fixture(scope="module")
def straggler_run(tmp_path_factory):
    """The uninterrupted reference: 2 processes, rank 1 slow, TensorBoard on."""
    from tests.procs import run

    out = tmp_path_factory.mktemp("straggler")
    result = run([*LAUNCH, *STRAGGLER, "tracking.tensorboard.enabled=true", f"output_dir={out}"], timeout=300)
    return out, result.output


@pytest.mark.slow
def test_straggler_is_named_in_the_log_and_the_tracker(straggler_run):
    from tests.test_tracking import scalars

    out, output = straggler_run
    assert re.search(r"step\s+\d+ \|.*\| slowest rank 1 x\d", output), output[-3000:]
    assert "warning: rank 1 is a straggler: its data + forward time is" in output
    logged = scalars(out / "tensorboard")
    slowest = logged["train/slowest_rank"]
    assert len(slowest) == TOTAL_STEPS // 5 and all(v == 1.0 for v in slowest.values()), slowest
    assert min(logged["train/rank_skew"].values()) > 2.0


@pytest.mark.slow
def test_stopped_rank_is_named_and_the_job_retries_from_its_checkpoint(straggler_run, tmp_path, start):
    out, log = tmp_path / "out", tmp_path / "job.log"
    args = [*STRAGGLER, f"output_dir={out}", "checkpoint.interval_steps=10",
            f"strategy.hang_timeout_seconds={HANG_TIMEOUT}", "strategy.startup_timeout_seconds=60"]  # fmt: skip
    agent = start([*LAUNCH, "--max-restarts", "1", *args], log)
    _wait_until(lambda: any((out / "checkpoints").glob("step-*/COMPLETE")), agent, log, 300, "a complete checkpoint")
    workers = _workers(psutil.Process(agent.pid))
    workers["1"].suspend()  # SIGSTOP: alive, holding its sockets, answering nothing
    stopped_at = time.monotonic()
    _wait_until(lambda: not workers["0"].is_running() or workers["0"].status() == psutil.STATUS_ZOMBIE, agent, log, 120, "rank 0 exiting")
    detection_seconds = time.monotonic() - stopped_at
    report = (out / "hang" / "report.txt").read_text()
    # torchrun noticed rank 0's exit and now waits (30 s) for the stopped rank: the test kills it instead.
    _wait_until(lambda: "closing signal SIGTERM" in log.read_text(), agent, log, 60, "torchrun noticing rank 0's exit")
    workers["1"].kill()
    output = _wait(agent, log, timeout=300)

    # Named within the configured time: the limit, two beats to tell it stopped, and a margin for CI.
    assert detection_seconds < HANG_TIMEOUT + 15, (detection_seconds, output[-4000:])
    behind = re.search(r"rank 1 is behind: step (\d+), phase (\S+), pid \d+, stopped answering", report)
    assert behind and int(behind.group(1)) > 10, report
    assert "paced_model.py" in report and "in forward" in report, report  # its last stack lines
    assert report in output.replace("\r", "") or report.splitlines()[0] in output
    assert (out / "hang" / "rank-0.txt").read_text().count("File ") > 3  # rank 0's own stacks, dumped
    assert f"failed (exitcode: {EXIT_RETRY}) local_rank: 0" in output
    # torchrun restarted the job, which resumed from the newest checkpoint and finished bitwise equal.
    resumed = re.search(r"resumed from \S+step-(\d+) at optimizer step (\d+)", output)
    assert resumed and int(resumed.group(1)) >= 10, output[-4000:]
    assert f"done: {TOTAL_STEPS} optimizer steps" in output
    assert_same_parameters(final_model(straggler_run[0]), final_model(out))
    print(f"stuck rank named {detection_seconds:.1f} s after SIGSTOP (hang_timeout_seconds={HANG_TIMEOUT})")


SLOW_STEPS = [*PACED, "model.kwargs={delay_seconds: 1.0}", "train.log_interval=50", "checkpoint.save_at_end=false"]


def _started(log: Path) -> bool:
    return "optimizer steps planned" in log.read_text()


@pytest.mark.slow
def test_sigterm_to_the_agent_saves_a_checkpoint_before_the_grace_period_ends(tmp_path, start):
    out, log = tmp_path / "out", tmp_path / "job.log"
    agent = start([*LAUNCH, *SLOW_STEPS, f"output_dir={out}"], log)
    _wait_until(lambda: _started(log), agent, log, 300, "training start")
    time.sleep(3.0)  # a few 1 s steps, far from a log step (50)
    agent.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    output = _wait(agent, log, timeout=60)
    elapsed = time.monotonic() - signalled
    assert elapsed < 30, output[-4000:]  # torchrun's grace period (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s)
    stopped = re.search(r"interrupted: stopped on request at optimizer step (\d+); .*\(the checkpoint took ([\d.]+) s; ([\d.]+) s after the signal arrived\)", output)
    assert stopped, output[-4000:]
    assert (out / "checkpoints" / f"step-{int(stopped.group(1)):08d}" / "COMPLETE").is_file()
    assert float(stopped.group(3)) < 10  # agreed within a step or two, not at the next log step


@pytest.mark.slow
def test_sigusr2_to_the_agent_leaves_no_worker_running(tmp_path, start):
    out, log = tmp_path / "out", tmp_path / "job.log"
    agent = start([*LAUNCH, *SLOW_STEPS, f"output_dir={out}"], log)
    _wait_until(lambda: _started(log), agent, log, 300, "training start")
    workers = list(_workers(psutil.Process(agent.pid)).values())
    assert len(workers) == 2
    time.sleep(2.0)
    agent.send_signal(signal.SIGUSR2)
    output = _wait(agent, log, timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, output[-4000:]
    # The workers got the signal from the agent, saved and stopped as for a preemption.
    assert "received SIGUSR2" in output and re.search(r"interrupted: stopped on request at optimizer step \d+", output), output[-4000:]
    assert list((out / "checkpoints").glob("step-*/COMPLETE"))
