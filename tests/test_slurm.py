"""The sbatch templates on a real Slurm cluster across two emulated hosts (tests/slurm_cluster.py on
tests/cluster.py: slurmctld and a slurmd on node1, a slurmd on node2), started and stopped here.

One uninterrupted 2-node job (multi-node template, a task on each host) is the reference; a 2-task single-node job gets the
preemption signal mid-run, checkpoints, requeues itself, resumes, and must end with bit-identical parameters. The model is a paced linear
regression, so the signal lands mid-run however fast the machine is.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.procs import REPO, clean_env
from tests.slurm_cluster import SlurmCluster, why_not
from tests.workers.paced_model import TOTAL_STEPS, TRAIN_ARGS

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.cluster,
    pytest.mark.skipif(bool(why_not()), reason=why_not() or "n/a"),
]


@pytest.fixture(scope="module")
def cluster():
    c = SlurmCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _job_env() -> dict:
    return clean_env({"DIST_TRAIN_PYTHON": sys.executable, "PYTHONPATH": str(REPO)})


def _submit(cluster: SlurmCluster, template: str, out: Path, log: Path, shape: list[str]) -> str:
    return cluster.sbatch(
        REPO / "slurm" / template,
        [*TRAIN_ARGS, f"output_dir={out}"],
        sbatch_args=[*shape, f"--output={log}", f"--chdir={REPO}"],
        env=_job_env(),
    )


def _model(path: Path) -> dict:
    return torch.load(path / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference_run(cluster):
    """The multi-node template, 2 nodes x 1 task, run to completion without interruption."""
    root = cluster.tmp("slurm_reference")
    out, log = root / "out", root / "job.log"
    job_id = _submit(cluster, "multi_node.sbatch", out, log, ["--nodes=2", "--ntasks-per-node=1"])
    info = cluster.wait_for_state(job_id, ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"], timeout=240)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}"
    return info, out, text


def test_multi_node_template_runs_with_correct_ranks(reference_run):
    info, out, text = reference_run
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2"
    # Rank 0 speaks for the job; had both nodes believed they were rank 0, the rendezvous would have failed.
    assert "0: dist_train: launcher=slurm rank=0/2 local_rank=0 node=0/2" in text
    assert "1: dist_train: launcher=slurm rank=1/2 local_rank=0 node=1/2" in text  # on node2, its own host
    assert f"done: {TOTAL_STEPS} optimizer steps" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["optimizer_steps"] == TOTAL_STEPS
    final = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert sorted(p.name for p in final.glob("rank-*.state.pt")) == ["rank-0.state.pt", "rank-1.state.pt"]
    assert re.search(r"rendezvous node1:\d+", text)


def test_preempted_job_checkpoints_requeues_resumes_and_matches(cluster, reference_run):
    """The single-node template, 2 tasks: same world size as the reference, so the same arithmetic."""
    tmp_path = cluster.tmp("preempted")
    out, log = tmp_path / "out", tmp_path / "job.log"
    job_id = _submit(cluster, "single_node.sbatch", out, log, ["--nodes=1", "--ntasks-per-node=2"])

    # Signal once training is under way (a log line is printed every 5 steps).
    deadline = time.monotonic() + 180
    while not (log.exists() and re.search(r"step\s+5/\d+ \|", log.read_text())):
        assert time.monotonic() < deadline, f"no training progress\n{log.read_text() if log.exists() else ''}\n{cluster.logs()}"
        state = cluster.job(job_id)["JobState"]
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job ended early: {state}\n{log.read_text() if log.exists() else ''}"
        time.sleep(0.2)
    # Without --batch Slurm signals every task of the job's steps (what --signal=USR2@T does), not the shell.
    cluster.command(["scancel", "--signal=USR2", job_id])

    info = cluster.wait_for_state(job_id, ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"], timeout=240)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text}"

    stopped = re.search(r"stopped on request at optimizer step (\d+)", text)
    assert stopped, text
    stop_step = int(stopped.group(1))
    assert 5 <= stop_step < TOTAL_STEPS, text
    # Both runs are in the one log (--open-mode=append), the second resumed where the first stopped.
    first, second = text.index("restart 0:"), text.index("restart 1:")
    assert first < text.index("received SIGUSR2") < text.index(f"requeued Slurm job {job_id}") < second
    assert f"resumed from {out / 'checkpoints' / f'step-{stop_step:08d}'} at optimizer step {stop_step}" in text[second:]
    assert f"done: {TOTAL_STEPS} optimizer steps" in text[second:]

    reference = _model(reference_run[1])
    resumed = _model(out)
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


def test_batch_script_training_is_refused_and_an_srun_step_uses_its_own_counts(cluster):
    """A 2-task allocation. Training started by the batch script itself would be one process of a job that asked
    for two: refused in one line, nothing written. `srun --ntasks 1` inside it is a 1-process step although the
    job's SLURM_NTASKS_PER_NODE still says 2 (the step's SLURM_STEP_* counts decide)."""
    # A short collective timeout: a batch script wrongly taken for rank 0 of 2 would wait for a rank 1 that never comes.
    short = ["configs/linear_regression.yaml", "train.max_steps=2", "train.progress_bar=false", "strategy.timeout_seconds=30"]
    tmp_path = cluster.tmp("batch")
    script, log = tmp_path / "job.sh", tmp_path / "job.log"
    script.write_text(
        "#!/bin/bash\n"
        f'"$DIST_TRAIN_PYTHON" -m dist_train train {" ".join(short)} output_dir={tmp_path / "batch"}\n'
        'echo "batch script exit $?"\n'
        f'srun --ntasks=1 "$DIST_TRAIN_PYTHON" -m dist_train train {" ".join(short)} output_dir={tmp_path / "step"}\n'
    )
    job_id = cluster.sbatch(script, sbatch_args=["--nodes=1", "--ntasks-per-node=2", f"--output={log}", f"--chdir={REPO}"], env=_job_env())
    info = cluster.wait_for_state(job_id, ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"], timeout=240)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}"
    refused = re.search(r"dist-train: launch error: (.*)\n", text)
    assert refused and "several processes were started" in refused.group(1) and "srun" in refused.group(1), text
    assert "batch script exit 2" in text and not (tmp_path / "batch").exists()
    assert "launcher=slurm rank=0/1" in text and "done: 2 optimizer steps" in text, text
