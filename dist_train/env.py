"""Distributed facts, built once.

`detect_environment()` asks a few small detector classes, in priority order, which launcher started this
process (torchrun / accelerate launch, Slurm's srun, or nothing) and turns the answer into one frozen
`DistEnv`. Nothing else in dist_train reads os.environ for rank or world size, restart counts or the
settings `accelerate launch` exports; `reconcile_launcher_settings` checks the latter against the config.

Priority: accelerate > torchrun > Slurm (srun, one task per process) > plain. torchrun's RANK wins over
SLURM_PROCID, because under `srun torchrun ...` Slurm's task id numbers the node's launcher, not the process.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Mapping, Optional

import torch

if TYPE_CHECKING:
    from .config import Config


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
    slurm_job_id: Optional[str] = None  # set inside any Slurm job (batch script, srun step, torchrun under srun)
    restart_count: int = 0  # torchrun's elastic restarts or Slurm requeues of this job so far
    accelerate: Optional["AccelerateSettings"] = None  # what `accelerate launch` exported from its config

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


def _slurm_tasks_per_node(env: Mapping[str, str]) -> Optional[int]:
    """SLURM_NTASKS_PER_NODE, or the first entry of SLURM_TASKS_PER_NODE ("2(x2)" or "2,1")."""
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = env.get(key, "").split("(")[0].split(",")[0]
        if value.isdigit():
            return int(value)
    return None


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    # The batch script also sees SLURM_PROCID=0; only a task started by srun has SLURM_STEP_ID.
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env


class PlainEnvironment:
    """A process started by hand (or a Slurm batch script without srun): world size 1."""

    name = "plain"

    @staticmethod
    def detect(env: Mapping[str, str]) -> bool:
        return True

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        return dict(master_port=_free_port())


class TorchElasticEnvironment:
    """torchrun: RANK/WORLD_SIZE/LOCAL_RANK (+ LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT).

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
        if world_size % max(local_world_size, 1):
            raise LaunchError(
                f"WORLD_SIZE={world_size} is not a multiple of LOCAL_WORLD_SIZE={local_world_size}; "
                "start the same --nproc-per-node on every node"
            )
        if _in_slurm_step(env):
            srun_tasks_per_node = _slurm_tasks_per_node(env)
            if srun_tasks_per_node is not None and srun_tasks_per_node > 1:
                raise LaunchError(
                    f"srun started {srun_tasks_per_node} tasks per node and each runs torchrun, so every node has "
                    f"{srun_tasks_per_node} launchers; with torchrun inside srun use #SBATCH --ntasks-per-node=1 "
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


class AccelerateEnvironment(TorchElasticEnvironment):
    """`accelerate launch`: torchrun's variables (none for one process) plus ACCELERATE_* settings from its config.

    accelerate always exports ACCELERATE_MIXED_PRECISION; with DeepSpeed also ACCELERATE_USE_DEEPSPEED and,
    when its config sets them, the ZeRO stage, accumulation steps, clipping and a DeepSpeed JSON path.
    """

    name = "accelerate"

    @staticmethod
    def detect(env: Mapping[str, str]) -> bool:
        return "ACCELERATE_MIXED_PRECISION" in env

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        # With one process accelerate runs the script directly, without torchrun's variables.
        base = TorchElasticEnvironment if TorchElasticEnvironment.detect(env) else PlainEnvironment
        return dict(base.facts(env), accelerate=AccelerateEnvironment.settings(env))

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
        )


class SlurmEnvironment:
    """One task per process under `srun` (no torchrun): ranks from SLURM_PROCID / SLURM_LOCALID."""

    name = "slurm"

    @staticmethod
    def detect(env: Mapping[str, str]) -> bool:
        return _in_slurm_step(env) and "SLURM_NTASKS" in env

    @staticmethod
    def facts(env: Mapping[str, str]) -> dict:
        world_size = _int(env, "SLURM_NTASKS")
        num_nodes = _int(env, "SLURM_NNODES", 1)
        local_world_size = world_size // max(num_nodes, 1)
        declared = _slurm_tasks_per_node(env)
        if declared is not None:
            if declared * num_nodes != world_size:
                raise LaunchError(
                    f"Slurm runs {declared} tasks per node x {num_nodes} nodes but SLURM_NTASKS={world_size}; "
                    "set #SBATCH --ntasks-per-node to the number of processes per node and leave --ntasks unset"
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


def _restart_facts(env: Mapping[str, str]) -> dict:
    """Facts that hold under every launcher: the Slurm job (if any) and how often it was restarted."""
    # torchrun sets TORCHELASTIC_RESTART_COUNT=0 on the first attempt; Slurm sets SLURM_RESTART_COUNT only
    # from the first requeue on.
    restarts = max(_int(env, "TORCHELASTIC_RESTART_COUNT", 0), _int(env, "SLURM_RESTART_COUNT", 0))
    return dict(slurm_job_id=env.get("SLURM_JOB_ID") or None, restart_count=restarts)


def detect_environment(env: Optional[Mapping[str, str]] = None, prefer_cuda: bool = True) -> DistEnv:
    env = os.environ if env is None else env
    for detector in DETECTORS:
        if detector.detect(env):
            facts = detector.facts(env)
            break
    dist_env = DistEnv(launcher=detector.name, **facts, **_restart_facts(env))
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


# ---------------------------------------------------------------- launcher settings vs the config


def reconcile_launcher_settings(cfg: "Config", dist_env: DistEnv, explicit_keys: "set[str] | frozenset[str]") -> list[str]:
    """Fold what `accelerate launch` set into `cfg` (in place); returns one line per value taken from it.

    A key the preset or an override set explicitly must agree with accelerate's value; a disagreement is a
    ConfigError naming both, never a silent override either way. A key left at its default takes
    accelerate's value; a value accelerate did not export leaves the config alone.
    """
    from .config import ConfigError, batch_arithmetic

    settings = dist_env.accelerate
    if settings is None:
        return []
    if settings.use_fsdp:
        raise ConfigError("accelerate's config enables FSDP, which dist_train does not run; use a DDP or DeepSpeed accelerate config (configs/accelerate/)")
    taken: list[str] = []

    def take(key: str, accelerate_name: str, accelerate_value: object, current: object, apply) -> None:
        if accelerate_value is None or accelerate_value == current:
            return
        if key in explicit_keys:
            raise ConfigError(
                f"accelerate's config sets {accelerate_name}={accelerate_value} but the dist_train config sets "
                f"{key}={current}; make them agree (edit one of them) or drop {key} to take accelerate's value"
            )
        apply(accelerate_value)
        taken.append(f"{key}={accelerate_value} (from accelerate's {accelerate_name})")

    if settings.mixed_precision not in (None, "fp32", "bf16", "fp16"):
        raise ConfigError(f"accelerate's mixed_precision={settings.mixed_precision} is not supported; use no, bf16 or fp16 (train.precision)")
    take("train.precision", "mixed_precision", settings.mixed_precision, cfg.train.precision, lambda v: setattr(cfg.train, "precision", v))
    if settings.use_deepspeed:
        take("strategy.name", "distributed_type", "deepspeed", cfg.strategy.name, lambda v: setattr(cfg.strategy, "name", v))
        take("strategy.zero_stage", "zero_stage", settings.zero_stage, cfg.strategy.zero_stage, lambda v: setattr(cfg.strategy, "zero_stage", v))
        take("strategy.deepspeed_config", "deepspeed_config_file", settings.deepspeed_config_file, cfg.strategy.deepspeed_config, lambda v: setattr(cfg.strategy, "deepspeed_config", v))
    take("train.grad_clip", "gradient_clipping", settings.grad_clip, cfg.train.grad_clip, lambda v: setattr(cfg.train, "grad_clip", v))
    if settings.grad_accum_steps is not None:
        derived = batch_arithmetic(cfg.train, dist_env.world_size).grad_accum_steps
        if settings.grad_accum_steps != derived:
            # Accumulation is derived from the global batch, so accelerate's value sets the global batch.
            if "train.global_batch_size" in explicit_keys:
                raise ConfigError(
                    f"accelerate's config sets gradient_accumulation_steps={settings.grad_accum_steps} but the dist_train "
                    f"config derives {derived} (train.global_batch_size={cfg.train.global_batch_size} / (train.micro_batch_size="
                    f"{cfg.train.micro_batch_size} x {dist_env.world_size} processes)); make them agree or drop train.global_batch_size"
                )
            cfg.train.global_batch_size = cfg.train.micro_batch_size * dist_env.world_size * settings.grad_accum_steps
            taken.append(f"train.global_batch_size={cfg.train.global_batch_size} (from accelerate's gradient_accumulation_steps={settings.grad_accum_steps})")
    return taken


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


def broadcast_from_main(obj: object, dist_env: DistEnv) -> object:
    """The main process's `obj` on every rank (a decision taken once, e.g. which checkpoint to load)."""
    import torch.distributed as dist

    if not dist_env.distributed or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
