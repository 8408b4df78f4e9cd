"""Real 2-process runs under the engines dist_train detects besides torchrun, accelerate and Slurm.

Open MPI's `mpirun -np 2` (launch/mpirun.sh) runs the main preset. Kubeflow's PyTorchJob (2 pods x 1 process
and 1 pod x 2 processes), Kubeflow Trainer's TrainJob and SkyPilot cannot run here, so the test starts the
commands of their templates (launch/k8s/*.yaml, launch/skypilot.yaml) as the engine would: one process per
pod or node, with exactly the variables the engine sets (tests/engines.py), loopback in place of the service
or node address. Every run must train as rank 0/2 and 1/2 and end with the torchrun run's parameters, bit for
bit. Ambiguous environments must be refused by every process, in one line, before anything is written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dist_train.distributed.environment import detect_environment
from tests.engines import open_mpi_missing, pytorchjob_pod, skypilot_node, srun_task, trainjob_pod
from tests.procs import REPO, Result, assert_same_parameters, clean_env, final_model, free_port, kill_group, run

pytestmark = pytest.mark.slow

CNN_SHORT = ["configs/cnn_digits.yaml", "train.max_steps=4", "train.log_interval=2", "train.progress_bar=false"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _assert_one_group_of_two(output: str, launcher: str) -> None:
    # Two independent processes would each print rank=0/1 and "done"; one group prints both ranks, one "done".
    assert f"launcher={launcher} rank=0/2" in output and f"launcher={launcher} rank=1/2" in output, output[-4000:]
    assert "rank=0/1" not in output and output.count("done: 4 optimizer steps") == 1, output[-4000:]


def _run_together(commands: list[tuple[list, dict]], timeout: float = 300) -> list[Result]:
    """Starts each (command, engine variables) as its own process, as the engine starts one per pod or node."""
    procs = [
        subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=clean_env(env), start_new_session=True)
        for cmd, env in commands
    ]
    deadline, results = time.monotonic() + timeout, []
    try:
        for proc in procs:
            try:
                stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"timed out after {timeout}s (a hang): {proc.args}")
            results.append(Result(proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            kill_group(proc)
            proc.wait()
    return results


def _succeeded(results: list[Result]) -> str:
    for r in results:
        assert r.returncode == 0, r.output[-6000:]
    return "".join(r.output for r in results)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The same short run of the main preset under torchrun, 2 processes."""
    out = tmp_path_factory.mktemp("torchrun_reference")
    run([*TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "dist_train", "train", *CNN_SHORT, f"output_dir={out}"])
    return final_model(out)


@pytest.mark.skipif(bool(open_mpi_missing()), reason=open_mpi_missing() or "n/a")
def test_mpirun_trains_the_main_preset_as_torchrun_does(reference, tmp_path):
    env = {
        "PYTHON": sys.executable,
        # Only loopback here (no other interface may be reachable), and CI runs as root in a container.
        "OMPI_MCA_oob_tcp_if_include": "lo", "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_rmaps_base_oversubscribe": "1",
        **({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if os.geteuid() == 0 else {}),
    }  # fmt: skip
    result = run(["bash", "launch/mpirun.sh", "2", *CNN_SHORT, f"output_dir={tmp_path}"], env=env, timeout=300)
    _assert_one_group_of_two(result.output, "mpi")
    assert_same_parameters(reference, final_model(tmp_path))


def _container_command(container: dict, out: Path) -> list:
    command = container["command"]
    assert command[:4] == ["python", "-m", "dist_train", "train"], command  # the same command as every other launcher
    return [sys.executable, *command[1:], *CNN_SHORT[1:], f"output_dir={out}"]


def test_kubeflow_pytorchjob_two_pods_of_one_process(reference, tmp_path):
    job = yaml.safe_load((REPO / "launch/k8s/pytorchjob.yaml").read_text())["spec"]
    replicas = job["pytorchReplicaSpecs"]
    pods = replicas["Master"]["replicas"] + replicas["Worker"]["replicas"]
    container = replicas["Master"]["template"]["spec"]["containers"][0]
    assert pods == 2 and job["nprocPerNode"] == "1" and container["name"] == "pytorch"
    assert replicas["Worker"]["template"]["spec"]["containers"][0]["command"] == container["command"]
    port = free_port()
    pod_envs = [pytorchjob_pod(i, pods, job["nprocPerNode"], "127.0.0.1", port) for i in range(pods)]
    output = _succeeded(_run_together([(_container_command(container, tmp_path), env) for env in pod_envs]))
    _assert_one_group_of_two(output, "kubeflow-pytorchjob")
    assert_same_parameters(reference, final_model(tmp_path))


def test_kubeflow_pytorchjob_one_pod_of_two_processes_under_torchrun(reference, tmp_path):
    # nprocPerNode: "2" in one pod: the container runs torchrun with no flags; it reads PET_NPROC_PER_NODE & co.
    pod = pytorchjob_pod(0, pods=1, nproc_per_node="2", master_addr="127.0.0.1", master_port=free_port())
    output = run([*TORCHRUN, "-m", "dist_train", "train", *CNN_SHORT, f"output_dir={tmp_path}"], env=pod).output
    _assert_one_group_of_two(output, "torchrun")
    assert_same_parameters(reference, final_model(tmp_path))


def test_kubeflow_trainjob_two_pods_of_one_process(reference, tmp_path):
    trainer = yaml.safe_load((REPO / "launch/k8s/trainjob.yaml").read_text())["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 1)
    port = free_port()
    pod_envs = [trainjob_pod(i, trainer["numNodes"], str(trainer["numProcPerNode"]), "127.0.0.1", port) for i in range(trainer["numNodes"])]
    output = _succeeded(_run_together([(_container_command(trainer, tmp_path), env) for env in pod_envs]))
    _assert_one_group_of_two(output, "kubeflow-trainjob")
    assert_same_parameters(reference, final_model(tmp_path))


def test_skypilot_task_on_two_nodes(reference, tmp_path):
    task = yaml.safe_load((REPO / "launch/skypilot.yaml").read_text())
    assert task["num_nodes"] == 2 and "python -m dist_train train" in task["run"]
    # SkyPilot gives no port; dist_train derives it from the task id. Pick an id whose port is free here.
    task_id = next(t for t in (f"sky-test_{os.getpid()}_{n}" for n in range(1000)) if _port_is_free(detect_environment(skypilot_node(0, task_id=t), prefer_cuda=False).master_port))
    python_on_path = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    overrides = {"CONFIG": CNN_SHORT[0], "OVERRIDES": " ".join([*CNN_SHORT[1:], f"output_dir={tmp_path}"])}
    nodes = [skypilot_node(rank, ("127.0.0.1", "127.0.0.1"), task_id) for rank in range(task["num_nodes"])]
    output = _succeeded(_run_together([(["bash", "-c", task["run"]], {**task["envs"], **overrides, **python_on_path, **node}) for node in nodes]))
    _assert_one_group_of_two(output, "skypilot")
    assert_same_parameters(reference, final_model(tmp_path))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_one_gpu_per_pod_trains_on_cuda0_like_torchrun_on_all_gpus(tmp_path):
    # Kubernetes gives each pod its own GPU (it sees one device); torchrun's workers see all and take cuda:LOCAL_RANK.
    mlp = ["configs/mlp_digits.yaml", "train.max_steps=4", "train.progress_bar=false"]
    run([*TORCHRUN, "--nproc_per_node", "2", "--standalone", "-m", "dist_train", "train", *mlp, f"output_dir={tmp_path / 'torchrun'}"])
    port, cmd = free_port(), [sys.executable, "-m", "dist_train", "train", *mlp, f"output_dir={tmp_path / 'pods'}"]
    pods = [(cmd, {**trainjob_pod(i, 2, "1", "127.0.0.1", port), "CUDA_VISIBLE_DEVICES": str(i)}) for i in range(2)]
    output = _succeeded(_run_together(pods))
    assert "launcher=kubeflow-trainjob rank=1/2 local_rank=0 node=1/2 device=cuda:0" in output, output[-4000:]
    gpu_per_pod, all_gpus = final_model(tmp_path / "pods"), final_model(tmp_path / "torchrun")
    for key in all_gpus:
        torch.testing.assert_close(gpu_per_pod[key], all_gpus[key])


def _port_is_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize(
    "process_envs, named",
    [
        pytest.param([{"OMPI_COMM_WORLD_SIZE": "2"}] * 2, "OMPI_COMM_WORLD_SIZE=2", id="open-mpi-size-without-rank"),
        pytest.param([{"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}] * 2, "WORLD_SIZE=2", id="world-size-without-rank"),
        pytest.param([{k: v for k, v in srun_task(0, 2).items() if not k.startswith("SLURM_STEP")}] * 2, "SLURM_NTASKS=2", id="slurm-tasks-outside-srun"),
        pytest.param([{**srun_task(r, 2), "ACCELERATE_MIXED_PRECISION": "no"} for r in range(2)], "ACCELERATE_MIXED_PRECISION=no", id="stale-accelerate-inside-srun"),
    ],
)
def test_an_ambiguous_launch_is_refused_before_anything_is_written(process_envs, named, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dist_train", "train", *CNN_SHORT, f"output_dir={out}"]
    for result in _run_together([(cmd, env) for env in process_envs], timeout=120):
        assert result.returncode == 2, result.output[-4000:]
        assert result.stdout == "" and result.stderr.count("\n") == 1, result.output[-4000:]
        assert result.stderr.startswith("dist-train: launch error: ") and named in result.stderr
    assert not out.exists()
