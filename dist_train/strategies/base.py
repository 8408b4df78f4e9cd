"""The strategy contract: everything that differs between backends (DDP, FSDP2, DeepSpeed), and nothing else.

In the order a backend needs it: `setup_module` wraps or shards the model (FSDP2 swaps in DTensor
parameters here), then the trainer builds the optimizer over the parameters the module now has and hands
it to `setup_optimizer`. In the loop the strategy owns the no-gradient-sync context used during
accumulation, backward, the optimizer step (clipping over possibly sharded gradients, loss scaling), and
the collectives the trainer needs. It saves and loads its own state (model, optimizer, scheduler, scaler)
in its backend's format into a directory the Checkpointer hands it, and exports the full model. The trainer
loop is the same code for every strategy; a new backend is one file and one line in `strategies/__init__.py`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import BatchArithmetic, Config, ConfigError, StrategyConfig, TrainConfig
from ..distributed.groups import GroupNeeds, ProcessGroups
from ..errors import CheckpointError


@dataclass
class StepResult:
    grad_norm: Optional[torch.Tensor]  # global norm before clipping (0-dim tensor, no host sync); None if not asked for
    # fp16 overflow: the optimizer did not step (same answer on every rank). A bool, or a 0-dim bool tensor
    # on the device where reading it would cost a host sync every step (DDP's GradScaler).
    skipped: Any


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_precision_supported(precision: str, device: torch.device) -> None:
    """Refuse, before any training, a precision this device cannot run."""
    if precision == "fp32":
        return
    dtype = autocast_dtype(precision)
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.precision=bf16 is not supported on {torch.cuda.get_device_name(device)}; set train.precision=fp16 or fp32")
        return
    try:
        with torch.autocast(device_type=device.type, dtype=dtype):
            probe = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
        if probe.dtype != dtype:
            raise RuntimeError(f"autocast produced {probe.dtype}")
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"train.precision={precision} cannot run on {device.type} with torch {torch.__version__} ({e}); set train.precision=fp32") from None


class Strategy(ABC):
    name = "base"

    def __init__(self, settings: StrategyConfig, train: TrainConfig, groups: ProcessGroups, arithmetic: BatchArithmetic) -> None:
        """`settings`: the strategy section (its own sub-section is `settings.<name>`); `train`: the loop's
        section (precision, clipping); `groups`: this process's groups (distributed/groups.py)."""
        self.settings = settings
        self.train = train
        self.groups = groups
        self.dist_env = groups.dist_env
        self.arithmetic = arithmetic
        self.device = groups.device
        self.model: Any = None  # the wrapped model the loop calls
        self.optimizer: Any = None
        self.scheduler: Any = None

    @classmethod
    def from_config(cls, cfg: Config, groups: ProcessGroups, arithmetic: BatchArithmetic) -> "Strategy":
        """Build from the sections this backend reads (the factory's one place that sees the whole config)."""
        return cls(cfg.strategy, cfg.train, groups, arithmetic)

    @classmethod
    def group_needs(cls, cfg: Config) -> GroupNeeds:
        """What this backend needs from torch.distributed, known before any group exists."""
        return GroupNeeds(backend=cfg.strategy.backend, background_checkpoint=cfg.checkpoint.async_save and cls.checkpoint_format == "dcp")

    # ------------------------------------------------------------ setup

    @abstractmethod
    def setup_module(self, model: nn.Module) -> None:
        """Move to the device and wrap or shard; afterwards `self.model` is what the loop calls and
        `unwrapped_model` holds the parameters an optimizer must be built over."""

    def setup_optimizer(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """Take the optimizer built over `unwrapped_model`'s parameters; afterwards `self.optimizer` and
        `self.scheduler` are the ones to use."""
        self.optimizer = optimizer
        self.scheduler = scheduler

    @property
    @abstractmethod
    def unwrapped_model(self) -> nn.Module:
        """The user's nn.Module (its state_dict keys are the tutorial's)."""

    @property
    def wants_fused_optimizer(self) -> bool:
        """True when the optimizer should be built with fused kernels (see optim.build_optimizer)."""
        return False

    @property
    def steps_scheduler(self) -> bool:
        """True when the backend steps the LR scheduler itself (DeepSpeed with a JSON scheduler)."""
        return False

    # ------------------------------------------------------------ the loop

    def autocast(self) -> ContextManager:
        dtype = autocast_dtype(self.train.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @abstractmethod
    def accumulation_context(self, is_last_micro_batch: bool) -> ContextManager:
        """No gradient sync on all but the last micro-batch of an optimizer step."""

    @abstractmethod
    def backward(self, micro_batch_loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        """`micro_batch_loss` is the mean over one micro-batch; the strategy normalises over the global batch."""

    @abstractmethod
    def optimizer_step(self, compute_grad_norm: bool = True) -> StepResult:
        """Clip, step, zero the gradients; called once per optimizer step, after the last micro-batch.

        Without clipping the norm is an extra pass over every gradient, so the trainer asks for it only on
        the steps it logs.
        """

    def eval_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)  # through the wrapper: sharded backends gather their parameters in its hooks

    def train_mode(self, training: bool) -> None:
        self.unwrapped_model.train(training)

    # ------------------------------------------------------------ collectives

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dist_env.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dist_env.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def barrier(self) -> None:
        if self.dist_env.distributed:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """The main process's `obj` on every rank."""
        return self.groups.broadcast_from_main(obj)

    def all_gather_rows(self, vector: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D `vector` stacked: row r is rank r's. One collective for many per-rank facts."""
        if not self.dist_env.distributed:
            return vector.unsqueeze(0)
        rows = [torch.empty_like(vector) for _ in range(self.dist_env.world_size)]
        dist.all_gather(rows, vector.contiguous())  # the list form: gloo has no all_gather_into_tensor
        return torch.stack(rows)

    def sync_buffers(self) -> None:
        """Collective: rank 0's buffers (BatchNorm running statistics) on every rank.

        Each rank updates its BatchNorm statistics from its own micro-batches, so the replicas drift apart
        between two training forwards (DDP broadcasts rank 0's buffers only at the start of each). Called
        where one model is observed (evaluation, checkpoint, export), so all three describe rank 0's model;
        training is unchanged, since the next forward would broadcast rank 0's buffers anyway."""
        if not self.dist_env.distributed:
            return
        for buffer in self.unwrapped_model.buffers():
            dist.broadcast(buffer, src=0)

    def local_parameters(self) -> list[torch.Tensor]:
        """The parameter data this rank holds (for the finiteness check before a save)."""
        return list(self.unwrapped_model.parameters())

    # ------------------------------------------------------------ checkpoints

    checkpoint_format = "none"  # recorded in meta.json; strategies with the same format load each other's checkpoints

    @abstractmethod
    def save_checkpoint(self, directory: Path, background: bool = False) -> Any:
        """Collective: every rank calls it; writes model, optimizer, scheduler and scaler state under `directory`.

        Returns None when the files are written, or (`background`, where the backend can) a Future that
        completes on the main process once every rank's files are written; the Checkpointer marks the
        directory complete after that."""

    def finish_staging(self) -> None:
        """Block until a background save has copied the state it saves; the optimizer step calls it first.
        A no-op for backends that save nothing in the background."""

    @abstractmethod
    def load_checkpoint(self, directory: Path, meta: dict) -> None:
        """Collective: restores model, optimizer, scheduler and scaler; `meta` is the checkpoint's meta.json.
        Raises CheckpointError naming what to change when the checkpoint cannot load here."""

    def full_training_state(self) -> tuple[dict, dict]:
        """Collective: (model state_dict with fp32 weights, optimizer state by parameter name {state, param_groups,
        scheduler}) as this process holds them now, complete on the main process (verify-resume compares them
        with a checkpoint's)."""
        raise NotImplementedError(f"strategy.name={self.name} cannot report its training state")

    @abstractmethod
    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the complete model state_dict on CPU (tutorial keys) on the main process; other ranks
        may get an empty dict (only the main process writes model.pt, so only it copies the model)."""

    def teardown(self) -> None:
        """Release backend resources (the process group is destroyed by the caller)."""


def written_format(meta: dict) -> str:
    """The checkpoint format a meta.json records ("dcp" or "deepspeed"; older checkpoints only name the strategy)."""
    return meta.get("format", "deepspeed" if meta.get("strategy") == "deepspeed" else "dcp")


def require_dcp_files(directory: Path, meta: dict) -> Path:
    """`directory`, which its meta.json says holds DCP files; CheckpointError if they are not there."""
    if not (Path(directory) / ".metadata").is_file():
        raise CheckpointError(
            f"checkpoint {directory} has no DCP files (.metadata) although strategy.name={meta.get('strategy')} wrote it; it is "
            "damaged: resume from an earlier step-N directory"
        )
    return Path(directory)
