"""The variables each launch engine sets for the process it starts, as the engine's own code or docs specify.

Tests detect them (tests/test_env.py) and start real processes with exactly these (tests/test_engines.py).
Addresses that name cluster hosts or services in production are parameters, so a test can put loopback there.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Sequence


def open_mpi_missing() -> str:
    """Why Open MPI's mpirun cannot be used here ('' when it can): the tests' skip reason."""
    if shutil.which("mpirun") is None:
        return "mpirun is not installed; run tests/install_system_deps.sh as root (Debian's openmpi-bin)"
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout
    return "" if "Open MPI" in version else f"mpirun is not Open MPI's: {version.splitlines()[:1]}"


def pytorchjob_pod(index: int, pods: int = 2, nproc_per_node: str = "1", master_addr: str = "job-master-0", master_port: int = 23456) -> dict:
    """Pod `index` (0 = Master, worker i = i + 1) of a Kubeflow training-operator v1 PyTorchJob with a Master
    replica (kubeflow/training-operator pkg/controller.v1/pytorch/envvar.go and master.go): RANK is the pod,
    WORLD_SIZE counts pods x nprocPerNode ('auto', the default, counts 1), 23456 is the default port."""
    per_pod = int(nproc_per_node) if nproc_per_node.isdigit() else 1
    return {
        "PYTHONUNBUFFERED": "1", "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
        "PET_MASTER_ADDR": master_addr, "PET_MASTER_PORT": str(master_port), "WORLD_SIZE": str(pods * per_pod),
        "RANK": str(index), "PET_NODE_RANK": str(index), "PET_NPROC_PER_NODE": nproc_per_node, "PET_NNODES": str(pods),
    }  # fmt: skip


def trainjob_pod(index: int, nodes: int = 2, nproc_per_node: str = "1", master_addr: str = "job-node-0-0.job", master_port: int = 29500) -> dict:
    """Pod `index` of a Kubeflow Trainer v2 TrainJob on a torch runtime (kubeflow/trainer
    pkg/runtime/framework/plugins/torch/torch.go): PET_* only, the node rank from the Job's completion index."""
    return {
        "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": nproc_per_node, "PET_NODE_RANK": str(index),
        "PET_MASTER_ADDR": master_addr, "PET_MASTER_PORT": str(master_port),
    }  # fmt: skip


def skypilot_node(rank: int, ips: Sequence[str] = ("10.0.0.1", "10.0.0.2"), task_id: str = "sky-2026-11-28-06-00-00-000000_mycluster_1") -> dict:
    """SkyPilot's variables for a task's `run` on node `rank` (docs.skypilot.co running-jobs/environment-variables):
    the node IPs one per line in rank order, no port."""
    return {
        "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NODE_IPS": "\n".join(ips), "SKYPILOT_NUM_NODES": str(len(ips)),
        "SKYPILOT_NUM_GPUS_PER_NODE": "0", "SKYPILOT_TASK_ID": task_id,
    }  # fmt: skip


def srun_task(procid: int, ntasks: int, job_id: str = "4242") -> dict:
    """A task of `srun --ntasks N` on one node (node1), as Slurm sets it."""
    return {
        "SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid),
        "SLURM_NODEID": "0", "SLURM_NTASKS": str(ntasks), "SLURM_NNODES": "1", "SLURM_TASKS_PER_NODE": str(ntasks),
        "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_TASKS_PER_NODE": str(ntasks),
        "SLURM_JOB_NODELIST": "node1", "SLURM_STEP_NODELIST": "node1",
    }  # fmt: skip
