"""Distributed facts, built once.

`detect_environment()` asks small detector classes, in a fixed order, which engine started this process and
turns the answer into one frozen `DistEnv`. Nothing else in dist_train reads os.environ for rank or world
size, restart counts or the settings `accelerate launch` exports (config/accelerate.py folds the latter into
the config). The first detector whose variables are all present decides:

  accelerate > torchrun > Open MPI > MPICH/Intel MPI > Slurm srun > Kubeflow PyTorchJob > Kubeflow TrainJob
  > SkyPilot > plain

A launcher that starts the processes itself comes before one that starts a command per node or pod, so the
innermost launcher wins: torchrun's RANK over SLURM_PROCID under `srun torchrun` (Slurm numbers the node's
launcher), mpirun's OMPI_COMM_WORLD_RANK over SLURM_PROCID under `mpirun` in an allocation (Slurm numbers
mpirun's per-node daemon). A plain single process is the answer only when no variable shows that several
processes were started; otherwise the launch is refused with one line naming what was seen and what is
missing, never run as N independent "rank 0" processes writing one output_dir. The README's launcher table
is this order.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import zlib
from dataclasses import dataclass, replace
from typing import Mapping, Optional

import torch


class LaunchError(RuntimeError):
    """The launch environment is inconsistent; the message says what to change in the launch command."""


class MachineError(LaunchError):
    """One machine's own setup is wrong (its name, its network): the processes there say so, not rank 0."""


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
    slurm_job_id: Optional[str] = None  # set inside any Slurm job (batch script, srun step, torchrun under srun)
    restart_count: int = 0  # torchrun's elastic restarts or Slurm requeues of this job so far
    accelerate: Optional["AccelerateSettings"] = None  # what `accelerate launch` exported from its config
    torchrun_store: bool = False  # torchrun's agent serves the rendezvous store: join it with env://

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
    def restarted(self) -> bool:
        """This process belongs to a restarted (torchrun) or requeued (Slurm) job: it should resume."""
        return self.restart_count > 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def describe(self) -> str:
        return (
            f"launcher={self.launcher} rank={self.global_rank}/{self.world_size} local_rank={self.local_rank} "
            f"node={self.node_rank}/{self.num_nodes} device={self.device}"
        )


# ---------------------------------------------------------------- reading variables


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


def _int_or_none(env: Mapping[str, str], key: str) -> Optional[int]:
    try:
        return int(env.get(key, ""))
    except ValueError:
        return None


def _job_port(env: Mapping[str, str], job_id: Optional[str]) -> int:
    """MASTER_PORT, else a port every process of one job derives alike from the job's id (ports are per machine
    and jobs share machines), else torch's default."""
    if env.get("MASTER_PORT"):
        return _int(env, "MASTER_PORT")
    return 20000 + zlib.crc32(job_id.encode()) % 20000 if job_id else 29500


def _local_address(env: Mapping[str, str], world_size: int, local_world_size: int, engine: str) -> str:
    """MASTER_ADDR, or loopback when every process runs on this machine; several machines need MASTER_ADDR."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    if world_size == local_world_size:
        return "127.0.0.1"
    raise LaunchError(
        f"{engine} started {world_size} processes on several machines but gives no rendezvous address; "
        "export MASTER_ADDR=<host of rank 0> (and MASTER_PORT=<free port>) to every process"
    )


# ---------------------------------------------------------------- detectors


class _Detector:
    """One launch engine. It claims a process when all of `needs` are set and none of `absent` is.

    `sizes` / `ranks` are its variables whose value (> 1 / > 0) shows that several processes were started;
    when no detector claims a process that shows them, the refusal names them and this engine's missing `needs`.
    """

    name = ""
    title = ""  # the engine in an error message
    needs: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    sizes: tuple[str, ...] = ()
    ranks: tuple[str, ...] = ()
    remedy = "start the processes with one of the launchers in the README's table"

    @classmethod
    def detect(cls, env: Mapping[str, str]) -> bool:
        return all(k in env for k in cls.needs) and not any(k in env for k in cls.absent)

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        raise NotImplementedError


class PlainEnvironment(_Detector):
    """A process started by hand (or a Slurm batch script without srun): world size 1."""

    name = "plain"

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        return dict(master_port=_free_port())


def _slurm(env: Mapping[str, str], key: str) -> Optional[str]:
    """A Slurm fact for this step: srun's SLURM_STEP_* where the step differs from the job (`srun -n 2` in a
    4-task job), else the job's. SLURM_NTASKS_PER_NODE is srun's input, so inside a step it can be the job's."""
    step_key = {
        "SLURM_NTASKS": "SLURM_STEP_NUM_TASKS",
        "SLURM_NNODES": "SLURM_STEP_NUM_NODES",
        "SLURM_TASKS_PER_NODE": "SLURM_STEP_TASKS_PER_NODE",
        "SLURM_JOB_NODELIST": "SLURM_STEP_NODELIST",
    }[key]
    return env.get(step_key) or env.get(key) or None


def _slurm_tasks_on_nodes(env: Mapping[str, str]) -> Optional[list[int]]:
    """Tasks on each node of the step, from "2(x2),1" -> [2, 2, 1]; None when Slurm does not say."""
    spec = _slurm(env, "SLURM_TASKS_PER_NODE")
    if spec is None:
        per_node, nodes = _int_or_none(env, "SLURM_NTASKS_PER_NODE"), _int_or_none(env, "SLURM_NNODES")
        return [per_node] * nodes if per_node and nodes else None
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    # The batch script also sees SLURM_PROCID=0; only a task started by srun has SLURM_STEP_ID.
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env


class TorchElasticEnvironment(_Detector):
    """torchrun: RANK/WORLD_SIZE/LOCAL_RANK (+ LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT).

    RANK wins over SLURM_PROCID: under `srun torchrun ...` Slurm's task id is the node, not the process.
    """

    name = "torchrun"
    title = "torchrun"
    needs = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    sizes = ("WORLD_SIZE", "LOCAL_WORLD_SIZE")
    ranks = ("RANK", "LOCAL_RANK")

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        world_size = _int(env, "WORLD_SIZE")
        local_world_size = _int(env, "LOCAL_WORLD_SIZE", world_size)
        global_rank = _int(env, "RANK")
        if world_size % max(local_world_size, 1):
            raise LaunchError(
                f"WORLD_SIZE={world_size} is not a multiple of LOCAL_WORLD_SIZE={local_world_size}; "
                "start the same --nproc-per-node on every node"
            )
        if _in_slurm_step(env):
            srun_tasks = max(_slurm_tasks_on_nodes(env) or [1])
            if srun_tasks > 1:
                raise LaunchError(
                    f"srun started {srun_tasks} tasks per node and each runs torchrun, so every node has "
                    f"{srun_tasks} launchers; with torchrun inside srun use #SBATCH --ntasks-per-node=1 "
                    "(or drop torchrun and let srun start one task per process)"
                )
        return dict(
            global_rank=global_rank,
            local_rank=_int(env, "LOCAL_RANK"),
            world_size=world_size,
            local_world_size=local_world_size,
            node_rank=_int(env, "GROUP_RANK", global_rank // max(local_world_size, 1)),
            num_nodes=max(world_size // max(local_world_size, 1), 1),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", 29500),
            torchrun_store=True,
        )


@dataclass(frozen=True)
class AccelerateSettings:
    """What `accelerate launch` exported from its config file / flags; None = accelerate did not say."""

    mixed_precision: Optional[str] = None  # dist_train's names: accelerate's 'no' is fp32
    use_deepspeed: bool = False
    zero_stage: Optional[int] = None
    grad_accum_steps: Optional[int] = None
    grad_clip: Optional[float] = None
    deepspeed_config_file: Optional[str] = None
    use_fsdp: bool = False
    fsdp_version: Optional[int] = None
    fsdp_reshard_after_forward: Optional[bool] = None
    fsdp_offload_params: Optional[bool] = None


class AccelerateEnvironment(TorchElasticEnvironment):
    """`accelerate launch`: torchrun's variables plus ACCELERATE_* settings from its config.

    accelerate always exports ACCELERATE_MIXED_PRECISION; with DeepSpeed also ACCELERATE_USE_DEEPSPEED and,
    when its config sets them, the ZeRO stage, accumulation steps, clipping and a DeepSpeed JSON path. With
    one process it runs the script directly, without torchrun's variables: `detect_environment` then takes
    the settings on top of whichever launcher (or none) says this is a single process.
    """

    name = "accelerate"
    title = "accelerate launch"
    signature = "ACCELERATE_MIXED_PRECISION"
    needs = (signature, *TorchElasticEnvironment.needs)

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        return dict(TorchElasticEnvironment.facts(env), accelerate=AccelerateEnvironment.settings(env))

    @staticmethod
    def settings(env: Mapping[str, str]) -> AccelerateSettings:
        precision = env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() or None
        precision = {"no": "fp32"}.get(precision, precision)  # type: ignore[arg-type]

        def optional(key: str, kind: type) -> Optional[object]:
            value = env.get(key, "").strip().lower()
            if value in ("", "none", "auto"):  # DeepSpeed-style 'auto': leave it to dist_train's config
                return None
            try:
                return kind(value)
            except ValueError:
                raise LaunchError(f"environment variable {key}={env[key]!r} is not a {kind.__name__}; fix it in the accelerate config") from None

        return AccelerateSettings(
            mixed_precision=precision,
            use_deepspeed=env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true",
            zero_stage=optional("ACCELERATE_DEEPSPEED_ZERO_STAGE", int),  # type: ignore[arg-type]
            grad_accum_steps=optional("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", int),  # type: ignore[arg-type]
            grad_clip=optional("ACCELERATE_GRADIENT_CLIPPING", float),  # type: ignore[arg-type]
            deepspeed_config_file=env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None,
            use_fsdp=env.get("ACCELERATE_USE_FSDP", "").lower() == "true",
            fsdp_version=optional("FSDP_VERSION", int),  # type: ignore[arg-type]
            fsdp_reshard_after_forward=_optional_bool(env, "FSDP_RESHARD_AFTER_FORWARD"),
            fsdp_offload_params=_optional_bool(env, "FSDP_OFFLOAD_PARAMS"),
        )


def _optional_bool(env: Mapping[str, str], key: str) -> Optional[bool]:
    value = env.get(key, "").strip().lower()
    return {"true": True, "false": False}.get(value)  # FSDP1's sharding-strategy names here mean "not said"


class OpenMPIEnvironment(_Detector):
    """`mpirun` / `mpiexec` of Open MPI: OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE} for each process.

    MPI gives no rendezvous address: one machine uses loopback, several need MASTER_ADDR exported to all ranks
    (`mpirun -x MASTER_ADDR=host0`). The port is MASTER_PORT, else derived from the MPI job id.
    """

    name = "mpi"
    title = "mpirun (Open MPI)"
    needs = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
    sizes = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")
    ranks = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        world_size = _int(env, "OMPI_COMM_WORLD_SIZE")
        # Without the local variables (a launcher that sets only rank and size) each process is its own node.
        local_world_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1)
        job = env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid")
        return _mpi_facts(
            env, "Open MPI", _int(env, "OMPI_COMM_WORLD_RANK"), world_size,
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0), local_world_size, job,
        )  # fmt: skip


class HydraMPIEnvironment(_Detector):
    """MPICH's and Intel MPI's `mpiexec` (Hydra): PMI_RANK/PMI_SIZE and MPI_LOCALRANKID/MPI_LOCALNRANKS.

    Slurm's `srun --mpi=pmi2` also sets PMI_RANK/PMI_SIZE, without the local pair: the Slurm detector takes those.
    """

    name = "mpi"
    title = "mpiexec (MPICH / Intel MPI)"
    needs = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")
    sizes = ("PMI_SIZE", "MPI_LOCALNRANKS")
    ranks = ("PMI_RANK", "MPI_LOCALRANKID")

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        world_size = _int(env, "PMI_SIZE")
        return _mpi_facts(
            env, "MPICH/Intel MPI", _int(env, "PMI_RANK"), world_size,
            _int(env, "MPI_LOCALRANKID"), _int(env, "MPI_LOCALNRANKS", 1), None,
        )  # fmt: skip


def _mpi_facts(env: Mapping[str, str], engine: str, rank: int, world_size: int, local_rank: int, local_world_size: int, job_id: Optional[str]) -> dict:
    if local_world_size < 1 or world_size % local_world_size:
        raise LaunchError(
            f"{engine} runs {local_world_size} processes on this machine, which does not divide its {world_size} "
            "processes; start the same number on every machine (mpirun --map-by ppr:N:node or -npernode N)"
        )
    return dict(
        global_rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        # MPI's default mapping fills a machine's slots before the next machine (ranks in blocks per node).
        node_rank=rank // local_world_size,
        num_nodes=world_size // local_world_size,
        master_addr=_local_address(env, world_size, local_world_size, engine),
        master_port=_job_port(env, job_id),
    )


class SlurmEnvironment(_Detector):
    """One task per process under `srun` (no torchrun): ranks from SLURM_PROCID / SLURM_LOCALID.

    Counts come from the step (SLURM_STEP_NUM_TASKS, SLURM_STEP_TASKS_PER_NODE, ...) where srun sets them, so
    `srun -n 2` inside a 4-task allocation is a 2-process run.
    """

    name = "slurm"
    title = "srun (Slurm)"
    needs = ("SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS")
    sizes = ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    remedy = "a batch script is one process, so start training with `srun python -m dist_train train CONFIG` (as slurm/*.sbatch do)"

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        world_size = int(_slurm(env, "SLURM_NTASKS") or 1)
        num_nodes = int(_slurm(env, "SLURM_NNODES") or 1)
        node_rank = _int(env, "SLURM_NODEID", 0)
        local_world_size = world_size // max(num_nodes, 1)
        tasks_on_nodes = _slurm_tasks_on_nodes(env)
        if tasks_on_nodes is not None:
            if sum(tasks_on_nodes) != world_size or len(tasks_on_nodes) != num_nodes:
                raise LaunchError(
                    f"Slurm runs {'+'.join(map(str, tasks_on_nodes))} tasks on {num_nodes} nodes but {world_size} in all; "
                    "set #SBATCH --ntasks-per-node to the number of processes per node and leave --ntasks unset"
                )
            local_world_size = tasks_on_nodes[min(node_rank, len(tasks_on_nodes) - 1)]
        nodelist = _slurm(env, "SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        port = env.get("MASTER_PORT")
        return dict(
            global_rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID", 0),
            world_size=world_size,
            local_world_size=local_world_size,
            node_rank=node_rank,
            num_nodes=num_nodes,
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            # Ports are shared between jobs on a node: derive one from the job id unless given.
            master_port=int(port) if port else 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000,
        )


def _node_per_process(rank: int, nodes: int, master_addr: str, master_port: int) -> dict:
    """Facts under an engine that starts one command per pod or node, each one dist_train process."""
    return dict(global_rank=rank, world_size=nodes, node_rank=rank, num_nodes=nodes, master_addr=master_addr, master_port=master_port)


def _one_process_per_pod(processes_per_pod: str, engine: str) -> None:
    """A container that starts dist_train itself is one process: the job must count one per pod."""
    if processes_per_pod != "1":
        raise LaunchError(
            f"{engine} asks for {processes_per_pod} processes per pod but dist_train was started directly, one process "
            "per pod; start the container with `torchrun -m dist_train train CONFIG` (torchrun reads PET_NNODES, "
            "PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT) or set nprocPerNode / numProcPerNode to 1"
        )


def _pods(env: Mapping[str, str]) -> int:
    value = env.get("PET_NNODES", "")
    if not value.isdigit():
        raise LaunchError(
            f"PET_NNODES={value!r} is an elastic range, which only torchrun can join; start the container with "
            "`torchrun -m dist_train train CONFIG`"
        )
    return int(value)


class KubeflowPyTorchJobEnvironment(_Detector):
    """Kubeflow training operator v1 `PyTorchJob`, container command `python -m dist_train ...` (one process
    per pod): RANK is the pod index (master 0, worker i -> i+1), WORLD_SIZE = pods x nprocPerNode,
    PET_NNODES the pods, MASTER_ADDR/MASTER_PORT the master pod's service. With several processes per pod the
    container must run torchrun, which reads the PET_* variables and sets LOCAL_RANK for its workers.
    """

    name = "kubeflow-pytorchjob"
    title = "Kubeflow PyTorchJob"
    needs = ("RANK", "WORLD_SIZE", "PET_NNODES")
    absent = ("LOCAL_RANK",)
    sizes = ("WORLD_SIZE", "PET_NNODES")
    ranks = ("RANK",)

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        world_size, pods = _int(env, "WORLD_SIZE"), _pods(env)
        per_pod = str(world_size // pods) if pods and world_size % pods == 0 else f"{world_size}/{pods}"
        _one_process_per_pod(per_pod, f"the PyTorchJob (WORLD_SIZE={world_size} processes on PET_NNODES={pods} pods)")
        # 23456: the operator's default container port.
        return _node_per_process(_int(env, "RANK"), pods, _local_address(env, world_size, 1, "the PyTorchJob"), _int(env, "MASTER_PORT", 23456))


class KubeflowTrainJobEnvironment(_Detector):
    """Kubeflow Trainer v2 `TrainJob` (torch runtime): PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK (the
    pod's completion index), PET_MASTER_ADDR/PORT, and no RANK; it means them for torchrun. A container that
    starts dist_train directly is one process per pod, which needs numProcPerNode: 1.
    """

    name = "kubeflow-trainjob"
    title = "Kubeflow TrainJob"
    needs = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK")
    absent = ("RANK",)
    sizes = ("PET_NNODES", "PET_NPROC_PER_NODE")
    ranks = ("PET_NODE_RANK",)

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        pods = _pods(env)
        _one_process_per_pod(env["PET_NPROC_PER_NODE"], "the TrainJob (PET_NPROC_PER_NODE)")
        if pods > 1 and not env.get("PET_MASTER_ADDR"):
            raise LaunchError(f"the TrainJob runs {pods} pods but PET_MASTER_ADDR is not set; set it to the address of the pod with PET_NODE_RANK=0")
        # 29500: the Trainer's container port.
        return _node_per_process(_int(env, "PET_NODE_RANK"), pods, env.get("PET_MASTER_ADDR") or "127.0.0.1", _int(env, "PET_MASTER_PORT", 29500))


class SkyPilotEnvironment(_Detector):
    """SkyPilot's `run` section, one `python -m dist_train ...` per node: SKYPILOT_NODE_RANK, SKYPILOT_NUM_NODES
    and SKYPILOT_NODE_IPS (one IP per line, in node-rank order: the first is rank 0's). SkyPilot gives no port:
    MASTER_PORT, else one derived from SKYPILOT_TASK_ID (the same on every node of a task). Nodes with several
    GPUs need torchrun inside `run`, one process per GPU.
    """

    name = "skypilot"
    title = "SkyPilot"
    needs = ("SKYPILOT_NODE_RANK", "SKYPILOT_NUM_NODES")
    sizes = ("SKYPILOT_NUM_NODES",)
    ranks = ("SKYPILOT_NODE_RANK",)

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        nodes, rank = _int(env, "SKYPILOT_NUM_NODES"), _int(env, "SKYPILOT_NODE_RANK")
        gpus = _int(env, "SKYPILOT_NUM_GPUS_PER_NODE", 0)
        if gpus > 1:  # one process per node would leave all but one GPU idle, silently
            raise LaunchError(
                f"SKYPILOT_NUM_GPUS_PER_NODE={gpus} but dist_train was started once per node; run `torchrun --nnodes "
                "$SKYPILOT_NUM_NODES --node-rank $SKYPILOT_NODE_RANK --nproc-per-node $SKYPILOT_NUM_GPUS_PER_NODE --master-addr "
                "<first of SKYPILOT_NODE_IPS> -m dist_train train CONFIG` instead (see launch/skypilot.yaml)"
            )
        ips = env.get("SKYPILOT_NODE_IPS", "").split()
        if nodes > 1 and len(ips) != nodes and not env.get("MASTER_ADDR"):
            raise LaunchError(
                f"SKYPILOT_NUM_NODES={nodes} but SKYPILOT_NODE_IPS lists {len(ips)} addresses; run under `sky launch` "
                "(which sets both) or export MASTER_ADDR=<node 0's address>"
            )
        return _node_per_process(rank, nodes, env.get("MASTER_ADDR") or (ips[0] if ips else "127.0.0.1"), _job_port(env, env.get("SKYPILOT_TASK_ID")))


DETECTORS: tuple[type[_Detector], ...] = (
    AccelerateEnvironment,
    TorchElasticEnvironment,
    OpenMPIEnvironment,
    HydraMPIEnvironment,
    SlurmEnvironment,
    KubeflowPyTorchJobEnvironment,
    KubeflowTrainJobEnvironment,
    SkyPilotEnvironment,
    PlainEnvironment,
)


def _restart_facts(env: Mapping[str, str]) -> dict:
    """Facts that hold under every launcher: the Slurm job (if any) and how often it was restarted."""
    # torchrun sets TORCHELASTIC_RESTART_COUNT=0 on the first attempt; Slurm sets SLURM_RESTART_COUNT only
    # from the first requeue on.
    restarts = max(_int(env, "TORCHELASTIC_RESTART_COUNT", 0), _int(env, "SLURM_RESTART_COUNT", 0))
    return dict(slurm_job_id=env.get("SLURM_JOB_ID") or None, restart_count=restarts)


def _several_processes_shown(env: Mapping[str, str]) -> list[str]:
    """'KEY=value' for each launcher variable that says more than one process was started."""
    shown = []
    for detector in DETECTORS:
        for key in detector.sizes + detector.ranks:
            value = _int_or_none(env, key)
            several = value is not None and (value > 1 if key in detector.sizes else value > 0)
            if several and f"{key}={env[key]}" not in shown:
                shown.append(f"{key}={env[key]}")
    if "PMIX_RANK" in env and _int_or_none(env, "PMIX_RANK") != 0:  # PMIx puts the rank, not the size, in the environment
        shown.append(f"PMIX_RANK={env['PMIX_RANK']}")
    if "SLURM_JOB_ID" in env and not shown and sum(_slurm_tasks_on_nodes(env) or [1]) > 1:  # one task on each of several nodes
        shown.append(f"SLURM_TASKS_PER_NODE={env.get('SLURM_TASKS_PER_NODE')}")
    if not env.get("PET_NNODES", "1").isdigit():  # an elastic range "1:4"
        shown.append(f"PET_NNODES={env['PET_NNODES']}")
    return shown


def _refuse_unresolved_launch(env: Mapping[str, str]) -> None:
    """Several processes were started but no detector claimed this one: name what was seen and what is missing."""
    shown = _several_processes_shown(env)
    if not shown:
        return

    def unmet(d: type[_Detector]) -> list[str]:
        return [f"{k} is missing" for k in d.needs if k not in env] + [f"{k} is set" for k in d.absent if k in env]

    candidates = [d for d in DETECTORS if any(k in env for k in d.sizes + d.ranks)]
    if candidates:
        nearest = min(candidates, key=lambda d: len(unmet(d)))  # ties: the earlier one in the table
        what = f"{', '.join(unmet(nearest))} ({nearest.title} sets {', '.join(nearest.needs)} for each process); {nearest.remedy}"
    else:
        what = "PMIx puts no world size in the environment; launch with Open MPI's mpirun or with srun"
    raise LaunchError(
        f"{', '.join(shown)} {'says' if len(shown) == 1 else 'say'} several processes were started, but this one cannot tell its rank and world size: "
        f"{what}, or unset the variables left over from another launch"
    )


def _refuse_accelerate_one_of_many(env: Mapping[str, str]) -> None:
    """accelerate's simple launcher (MULTI_CPU, or --num_processes N without --multi_gpu) starts ONE process
    unless given an MPI hostfile; it exports MASTER_ADDR/MASTER_PORT only when its config asked for more than
    one process or machine (accelerate/utils/launch.py, prepare_simple_launcher_cmd_env)."""
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        raise LaunchError(
            f"accelerate launch was asked for several processes (it exported MASTER_ADDR={env['MASTER_ADDR']} MASTER_PORT={env['MASTER_PORT']}) "
            "but started this one only (its CPU launcher runs one process without --mpirun_hostfile); use "
            "`accelerate launch --config_file configs/accelerate/ddp.yaml` (distributed_type: MULTI_GPU, which runs on CPU too) "
            "or `accelerate launch --multi_gpu --num_processes N`"
        )


def _refuse_stale_accelerate(env: Mapping[str, str], launcher: str, world_size: int) -> None:
    if world_size > 1:
        seen = ", ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("ACCELERATE_"))
        raise LaunchError(
            f"{seen} is set but accelerate did not start this process (torchrun's RANK/WORLD_SIZE/LOCAL_RANK are "
            f"not set), while {launcher} started {world_size} processes; unset the ACCELERATE_* variables (left over "
            "from an outer `accelerate launch`), or run `accelerate launch` inside one task per node"
        )


def detect_environment(env: Optional[Mapping[str, str]] = None, prefer_cuda: bool = True) -> DistEnv:
    env = os.environ if env is None else env
    detector = next(d for d in DETECTORS if d.detect(env))
    if detector is PlainEnvironment:
        _refuse_unresolved_launch(env)
    facts = detector.facts(env)
    launcher = detector.name
    if AccelerateEnvironment.signature in env and detector is not AccelerateEnvironment:
        # accelerate runs a single process directly (no torchrun variables); with any other launcher's
        # process count > 1 the variables are an outer launch's, and which settings count is unknowable.
        _refuse_stale_accelerate(env, detector.title or launcher, facts.get("world_size", 1))
        if detector is PlainEnvironment:
            _refuse_accelerate_one_of_many(env)
        launcher, facts = AccelerateEnvironment.name, dict(facts, accelerate=AccelerateEnvironment.settings(env))
    dist_env = DistEnv(launcher=launcher, **facts, **_restart_facts(env))
    _check_consistent(dist_env)
    visible = torch.cuda.device_count() if prefer_cuda and torch.cuda.is_available() else 0
    return replace(dist_env, device=choose_device(dist_env, visible))


def choose_device(dist_env: DistEnv, visible_cuda_devices: int) -> str:
    """The device this process trains on, from its place on the node and the CUDA devices it can see.

    No device: cpu. At least one per process on the node (it sees all of the node's GPUs): cuda:LOCAL_RANK.
    Exactly one (`--gpus-per-task=1`, a per-process CUDA_VISIBLE_DEVICES): cuda:0. Anything else is a LaunchError.
    """
    if visible_cuda_devices <= 0:
        return "cpu"
    if visible_cuda_devices >= dist_env.local_world_size:
        return f"cuda:{dist_env.local_rank}"
    if visible_cuda_devices == 1:
        return "cuda:0"
    raise LaunchError(
        f"local rank {dist_env.local_rank} of {dist_env.local_world_size} processes on this node sees "
        f"{visible_cuda_devices} GPUs; give every process all of the node's GPUs (--gpus-per-node, one process "
        "per GPU) or exactly one (--gpus-per-task=1), or start fewer processes per node"
    )


def _check_consistent(e: DistEnv) -> None:
    if not 0 <= e.global_rank < e.world_size:
        raise LaunchError(f"rank {e.global_rank} is outside world size {e.world_size}; check the launcher's process count")
    if not 0 <= e.local_rank < max(e.local_world_size, 1):
        raise LaunchError(
            f"local rank {e.local_rank} >= processes per node {e.local_world_size}; "
            "the per-node process count disagrees with the launcher's"
        )
    if not 0 <= e.node_rank < e.num_nodes:
        raise LaunchError(
            f"node rank {e.node_rank} is outside {e.num_nodes} nodes; every node must start the same number of processes"
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
