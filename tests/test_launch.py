"""Real launches: `dist-train launch` (torchrun) on one node and as two c10d "nodes", accelerate launch with
the DDP and DeepSpeed configs, elastic restarts after a killed rank, and SIGTERM outside Slurm.

The torchrun runs train a paced linear regression (each training forward sleeps), so a test can kill or
signal a run mid-way on any machine; their final parameters must equal the plain 2-process run's.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dist_train.cli import main as cli_main
from tests.procs import REPO, assert_same_parameters, clean_env, final_model, free_port, kill_group, run
from tests.workers.paced_model import TOTAL_STEPS
from tests.workers.paced_model import TRAIN_ARGS as PACED

CNN_SHORT = ["configs/cnn_digits.yaml", "train.max_steps=4", "train.log_interval=2", "train.progress_bar=false"]
LAUNCH = [sys.executable, "-m", "dist_train", "launch"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.fixture
def start():
    """Starts background jobs, each in its own process group with output to a log the test can watch;
    whatever is still running when the test ends (a failed assertion included) is killed by group id."""
    started: list[subprocess.Popen] = []

    def _start(cmd: list, log: Path, env: dict | None = None) -> subprocess.Popen:
        with open(log, "wb") as f:
            proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=clean_env(env), start_new_session=True)
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        kill_group(proc)
        proc.wait()


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"timed out after {timeout}s (a hang)\n{log.read_text()[-6000:]}")
    finally:
        kill_group(proc)
    return log.read_text()


def _wait_until(condition, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"never saw {what} (exit {proc.poll()})\n{log.read_text()[-6000:]}")
        time.sleep(0.1)


def test_dry_run_prints_the_torchrun_command(capsys):
    args = ["launch", "--nproc-per-node", "2", "--nnodes", "2", "--rdzv-endpoint", "node1:29400", "--max-restarts", "1", "--dry-run", *CNN_SHORT, "train.micro_batch_size=16"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "batch: global batch 64 = micro batch 16 x 4 ranks x 1 accumulation steps" in out
    assert "without periodic checkpoints restarts from step 0; set checkpoint.interval_steps" in out
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 " in out  # what the real launch sets, shown (issue 17)
    assert (
        "-m torch.distributed.run --nproc_per_node 2 --nnodes 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint node1:29400 "
        "--rdzv_id dist_train --max_restarts 1 -m dist_train train configs/cnn_digits.yaml train.max_steps=4"
    ) in out


def test_launch_refuses_a_batch_that_does_not_divide_before_starting(capsys):
    assert cli_main(["launch", "--nproc-per-node", "3", "--dry-run", *CNN_SHORT]) == 2
    assert "train.global_batch_size=64 is not divisible" in capsys.readouterr().err


def test_launch_scripts_build_the_documented_commands():
    env = {"PYTHON": sys.executable, "DRY_RUN": "1", "NNODES": "2", "RDZV_ENDPOINT": "node1:29400"}
    single = run(["bash", "launch/torchrun_single_node.sh", "2", *CNN_SHORT], env=env, timeout=120).stdout
    assert "--nproc_per_node 2 --standalone -m dist_train train configs/cnn_digits.yaml" in single
    multi = run(["bash", "launch/torchrun_multi_node.sh", "1", *CNN_SHORT], env=env, timeout=120).stdout
    assert "--nnodes 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint node1:29400 --rdzv_id dist_train" in multi


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """`dist-train launch --nproc-per-node 2` (torchrun, standalone rendezvous): 2 processes train and evaluate."""
    out = tmp_path_factory.mktemp("launch_reference")
    result = run([*LAUNCH, "--nproc-per-node", "2", *PACED, f"output_dir={out}"], timeout=300)
    return out, result.output


@pytest.mark.slow
def test_torchrun_two_processes_train_and_evaluate(reference):
    out, output = reference
    assert "--standalone" in output
    assert "launcher=torchrun rank=0/2 local_rank=0 node=0/1" in output
    assert f"eval at step {TOTAL_STEPS}: loss=" in output and f"done: {TOTAL_STEPS} optimizer steps" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["eval"]["eval/mse"] < 0.1


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous(reference, tmp_path, start):
    """Two `dist-train launch --nnodes 2` commands (one process each) meet at a c10d rendezvous."""
    out, endpoint = tmp_path / "out", f"127.0.0.1:{free_port()}"
    nodes = [
        start([*LAUNCH, "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", str(r), "--rdzv-endpoint", endpoint, "--rdzv-id", "t2n", *PACED, f"output_dir={out}"], tmp_path / f"node{r}.log")
        for r in range(2)
    ]
    outputs = [_wait(p, tmp_path / f"node{r}.log", timeout=300) for r, p in enumerate(nodes)]
    for proc, output in zip(nodes, outputs):
        assert proc.returncode == 0, output
    main_output = next(o for o in outputs if "launcher=torchrun rank=0/2" in o)
    assert "node=0/2" in main_output and f"done: {TOTAL_STEPS} optimizer steps" in main_output
    assert_same_parameters(final_model(reference[0]), final_model(out))


@pytest.mark.slow
def test_max_restarts_resumes_after_a_rank_is_killed(reference, tmp_path, start):
    out, log = tmp_path / "out", tmp_path / "job.log"
    proc = start([*LAUNCH, "--nproc-per-node", "2", "--max-restarts", "1", *PACED, "checkpoint.interval_steps=10", f"output_dir={out}"], log)
    _wait_until(lambda: any((out / "checkpoints").glob("step-*/COMPLETE")), proc, log, 300, "a complete checkpoint")
    # `dist-train launch` exec'd torchrun, so proc.pid is the agent; its workers carry RANK in their environment.
    workers = {w.environ().get("RANK"): w for w in psutil.Process(proc.pid).children()}
    workers["1"].kill()
    output = _wait(proc, log, timeout=300)
    assert proc.returncode == 0, output
    assert "restart 1 of this job (torchrun): continuing from the newest checkpoint of its run" in output
    resumed = re.search(r"resumed from \S+step-(\d+) at optimizer step (\d+)", output)
    assert resumed and int(resumed.group(1)) >= 10 and int(resumed.group(1)) % 10 == 0, output
    assert f"done: {TOTAL_STEPS} optimizer steps" in output
    assert_same_parameters(final_model(reference[0]), final_model(out))


@pytest.mark.slow
def test_sigterm_outside_slurm_saves_and_exits_interrupted(tmp_path, start):
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = start([sys.executable, "-m", "dist_train", "train", *PACED, f"output_dir={out}"], log)
    _wait_until(lambda: re.search(r"step\s+5/\d+ \|", log.read_text()), proc, log, 300, "training progress")
    proc.send_signal(signal.SIGTERM)
    output = _wait(proc, log, timeout=120)
    assert proc.returncode == 130, output
    stopped = re.search(r"dist-train: interrupted: stopped on request at optimizer step (\d+)", output)
    assert stopped and 5 <= int(stopped.group(1)) < TOTAL_STEPS, output
    assert "received SIGTERM" in output and "Traceback" not in output
    assert (out / "checkpoints" / f"step-{int(stopped.group(1)):08d}" / "COMPLETE").is_file()


@pytest.mark.slow
def test_accelerate_launch_ddp_config_forms_one_group(tmp_path):
    result = run([*ACCELERATE, "--config_file", "configs/accelerate/ddp.yaml", "-m", "dist_train", "train", *CNN_SHORT, f"output_dir={tmp_path}"], timeout=300)
    # One group of two: rank 0 alone prints; two separate rank-0 processes would each print "rank=0/1".
    assert result.output.count("launcher=accelerate rank=0/2") == 1 and "rank=0/1" not in result.output
    assert result.output.count("done: 4 optimizer steps") == 1
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_accelerate_setting_that_contradicts_the_config_is_reported(tmp_path):
    cmd = [*ACCELERATE, "--num_processes", "1", "--mixed_precision", "bf16", "-m", "dist_train", "train", *CNN_SHORT, "train.precision=fp32", f"output_dir={tmp_path}"]
    result = run(cmd, timeout=120, check=False)
    assert result.returncode != 0
    assert "accelerate's config sets mixed_precision=bf16 but the dist_train config sets train.precision=fp32" in result.output
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None or not (REPO / "dist_train/strategies/deepspeed.py").exists(), reason="needs deepspeed and dist_train/strategies/deepspeed.py")
def test_accelerate_launch_deepspeed_zero2_config(tmp_path):
    result = run([*ACCELERATE, "--config_file", "configs/accelerate/deepspeed_zero2.yaml", "-m", "dist_train", "train", *CNN_SHORT, f"output_dir={tmp_path}"], timeout=300)
    assert "strategy.name=deepspeed (from accelerate's distributed_type)" in result.output
    assert "launcher=accelerate rank=0/2" in result.output and "strategy=deepspeed" in result.output
    assert result.output.count("done: 4 optimizer steps") == 1
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_accelerate_launch_fsdp2_config_trains_and_reports_a_conflicting_key(tmp_path):
    launch = [*ACCELERATE, "--config_file", "configs/accelerate/fsdp2.yaml", "-m", "dist_train", "train", *CNN_SHORT]
    result = run([*launch, f"output_dir={tmp_path / 'run'}"], timeout=300)
    assert "strategy.name=fsdp2 (from accelerate's distributed_type)" in result.output
    assert "launcher=accelerate rank=0/2" in result.output and "strategy=fsdp2" in result.output
    assert result.output.count("done: 4 optimizer steps") == 1
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "meta.json").read_text())["strategy"] == "fsdp2"
    conflict = run([*launch, "strategy.name=ddp", f"output_dir={tmp_path / 'conflict'}"], timeout=120, check=False)
    assert conflict.returncode != 0 and not (tmp_path / "conflict" / "config.yaml").exists()
    assert "accelerate's config sets distributed_type=fsdp2 but the dist_train config sets strategy.name=ddp" in conflict.output
