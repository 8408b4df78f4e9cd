"""Distributed facts, built once.

`detect_environment()` asks a few small detector classes, in priority order, which launcher started this
process (torchrun / accelerate launch, Slurm's srun, or nothing) and turns the answer into one frozen
`DistEnv`. Nothing else in dist_train reads os.environ for rank or world size.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Mapping, Optional

import torch


class LaunchError(RuntimeError):
    """The launch environment is inconsistent; the message says what to change in the launch command."""


@dataclass(frozen=True)
class DistEnv:
    global_rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "plain"
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def describe(self) -> str:
        return (
            f"launcher={self.launcher} rank={self.global_rank}/{self.world_size} local_rank={self.local_rank} "
            f"node={self.node_rank}/{self.num_nodes} device={self.device}"
        )


# ---------------------------------------------------------------- detectors


def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise LaunchError(f"environment variable {key} is missing")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {key}={value!r} is not an integer") from None


class PlainEnvironment:
    """A process started by hand: world size 1."""

    name = "plain"

    @staticmethod
    def detect(env: Mapping[str, str]) -> bool:
        return True

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        return dict(master_port=_free_port())


class TorchElasticEnvironment:
    """torchrun (and `accelerate launch`, which runs torchrun underneath): RANK/WORLD_SIZE/LOCAL_RANK.

    RANK wins over SLURM_PROCID: under `srun torchrun ...` Slurm's task id is the node, not the process.
    """

    name = "torchrun"

    @staticmethod
    def detect(env: Mapping[str, str]) -> bool:
        return all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        world_size = _int(env, "WORLD_SIZE")
        local_world_size = _int(env, "LOCAL_WORLD_SIZE", world_size)
        global_rank = _int(env, "RANK")
        return dict(
            global_rank=global_rank,
            local_rank=_int(env, "LOCAL_RANK"),
            world_size=world_size,
            local_world_size=local_world_size,
            node_rank=_int(env, "GROUP_RANK", global_rank // max(local_world_size, 1)),
            num_nodes=max(world_size // max(local_world_size, 1), 1),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", 29500),
        )


class AccelerateEnvironment(TorchElasticEnvironment):
    """`accelerate launch`: torchrun variables plus ACCELERATE_* settings exported from its config."""

    name = "accelerate"

    @staticmethod
    def detect(env: Mapping[str, str]) -> bool:
        return TorchElasticEnvironment.detect(env) and "ACCELERATE_MIXED_PRECISION" in env


class SlurmEnvironment:
    """One task per process under `srun` (no torchrun): ranks from SLURM_PROCID / SLURM_LOCALID."""

    name = "slurm"

    @staticmethod
    def detect(env: Mapping[str, str]) -> bool:
        # The batch script itself also sees SLURM_PROCID=0; only an srun step has SLURM_STEP_ID.
        return "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        world_size = _int(env, "SLURM_NTASKS")
        num_nodes = _int(env, "SLURM_NNODES", 1)
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE")
        local_world_size = world_size // max(num_nodes, 1)
        if tasks_per_node and tasks_per_node.split("(")[0].isdigit():
            declared = int(tasks_per_node.split("(")[0])
            if declared * num_nodes != world_size:
                raise LaunchError(
                    f"SLURM_NTASKS_PER_NODE={declared} x SLURM_NNODES={num_nodes} != SLURM_NTASKS={world_size}; "
                    "set #SBATCH --ntasks-per-node to the number of processes per node"
                )
            local_world_size = declared
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        port = env.get("MASTER_PORT")
        return dict(
            global_rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID", 0),
            world_size=world_size,
            local_world_size=local_world_size,
            node_rank=_int(env, "SLURM_NODEID", 0),
            num_nodes=num_nodes,
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            # Ports are shared between jobs on a node: derive one from the job id unless given.
            master_port=int(port) if port else 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000,
        )


DETECTORS = (AccelerateEnvironment, TorchElasticEnvironment, SlurmEnvironment, PlainEnvironment)


def detect_environment(env: Optional[Mapping[str, str]] = None, prefer_cuda: bool = True) -> DistEnv:
    env = os.environ if env is None else env
    for detector in DETECTORS:
        if detector.detect(env):
            facts = detector.facts(env)
            break
    dist_env = DistEnv(launcher=detector.name, **facts)
    _check_consistent(dist_env)
    device = "cpu"
    if prefer_cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if dist_env.local_rank >= count:
            raise LaunchError(
                f"local rank {dist_env.local_rank} has no GPU (this node has {count}); "
                f"start at most {count} processes per node (--nproc-per-node / --ntasks-per-node)"
            )
        device = f"cuda:{dist_env.local_rank}"
    return replace(dist_env, device=device)


def _check_consistent(e: DistEnv) -> None:
    if not 0 <= e.global_rank < e.world_size:
        raise LaunchError(f"rank {e.global_rank} is outside world size {e.world_size}; check the launcher's process count")
    if not 0 <= e.local_rank < max(e.local_world_size, 1):
        raise LaunchError(
            f"local rank {e.local_rank} >= processes per node {e.local_world_size}; "
            "the per-node process count disagrees with the launcher's"
        )


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return nodelist.split(",")[0].split("[")[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- process group


def backend_for(dist_env: DistEnv, requested: Optional[str] = None) -> str:
    if requested:
        if requested == "nccl" and not dist_env.device.startswith("cuda"):
            from .config import ConfigError

            raise ConfigError("strategy.backend=nccl needs CUDA and this process has no GPU; set strategy.backend=gloo or leave it unset")
        return requested
    return "nccl" if dist_env.device.startswith("cuda") else "gloo"


def init_process_group(dist_env: DistEnv, backend: str, timeout_seconds: float) -> None:
    """Joins the default process group (no-op at world size 1)."""
    import torch.distributed as dist

    if dist_env.device.startswith("cuda"):
        torch.cuda.set_device(dist_env.torch_device)
    if not dist_env.distributed or dist.is_initialized():
        return
    # Under torchrun the rendezvous store already lives in the agent (TORCHELASTIC_USE_AGENT_STORE): env://
    # connects to it, whereas tcp:// would try to open a second server on the same port.
    torchrun_started = dist_env.launcher in (TorchElasticEnvironment.name, AccelerateEnvironment.name)
    init_method = "env://" if torchrun_started else f"tcp://{dist_env.master_addr}:{dist_env.master_port}"
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=dist_env.global_rank,
        world_size=dist_env.world_size,
        timeout=timedelta(seconds=timeout_seconds),
    )


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
