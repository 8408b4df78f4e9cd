"""DeepSpeed ZeRO (stages 1, 2, 3) behind the same Strategy contract as DDP.

The DeepSpeed JSON (`strategy.deepspeed.config`) is reconciled with dist_train's config on the config side
(config/deepspeed_json.py); this module builds the engine from the result. DeepSpeed joins the process group
dist_train made and is told the device dist_train chose (distributed/groups.py). Accumulation, loss scaling,
clipping and the LR schedule's stepping are DeepSpeed's: `engine.backward` divides the loss by the
accumulation steps and `engine.step` after every micro-batch advances its micro-step counter, updating
the weights only at the boundary. Checkpoints are DeepSpeed's own sharded files inside the step directory
the Checkpointer hands out, plus dist_train's side state (progress, data position, RNG).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, ContextManager, Optional

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.safe_load import refuse_code_in_pickles
from ..config import BatchArithmetic, Config, ConfigError, upgrade_saved_config
from ..config.deepspeed_json import build_deepspeed_config, load_user_config
from ..distributed.groups import GroupNeeds, ProcessGroups, deepspeed_environment
from ..errors import CheckpointError
from .base import StepResult, Strategy, autocast_dtype, check_precision_supported

# DeepSpeed's files live in <step dir>/zero/ (its "tag"); one fixed tag so export and resume need no `latest` file.
CHECKPOINT_TAG = "zero"


# ---------------------------------------------------------------- the strategy


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def __init__(self, *args: Any, ds_config: dict) -> None:
        """`ds_config`: the reconciled DeepSpeed JSON (config/deepspeed_json.py)."""
        super().__init__(*args)
        precision = self.train.precision
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError(
                "train.precision=fp16 with strategy.name=deepspeed needs a GPU: DeepSpeed's CPU accelerator has no fp16 "
                "loss-scaling path; set train.precision=bf16 or fp32"
            )
        check_precision_supported(precision, self.device)
        if self.settings.ddp.sync_batchnorm:
            raise ConfigError("strategy.ddp.sync_batchnorm=true is a DDP option; with strategy.name=deepspeed set it to false")
        self.ds_config = ds_config
        if precision != "fp32" and hasattr(deepspeed.runtime.constants, "BUFFER_DTYPE"):
            # DeepSpeed >= 0.18 casts only the parameters and leaves buffers fp32, so a BatchNorm (ResNet-18) gets
            # bf16 weights with fp32 running stats and refuses to run; older DeepSpeed cast the whole module.
            self.ds_config.setdefault("data_types", {}).setdefault("buffer_dtype", precision)
        self.engine: Any = None
        self._input_cast: Any = None  # the forward pre-hook casting inputs to bf16/fp16
        self._saved_environ: dict[str, Optional[str]] = {}

    @classmethod
    def from_config(cls, cfg: Config, groups: ProcessGroups, arithmetic: BatchArithmetic) -> "DeepSpeedStrategy":
        path = cfg.strategy.deepspeed.config
        user = load_user_config(path) if path else None
        ds_config = build_deepspeed_config(cfg, arithmetic, user, source=path or "")
        return cls(cfg.strategy, cfg.train, groups, arithmetic, ds_config=ds_config)

    @classmethod
    def group_needs(cls, cfg: Config) -> GroupNeeds:
        return replace(super().group_needs(cfg), alone=True)  # DeepSpeed's engine needs a group even for one process

    # ------------------------------------------------------------ setup

    def setup_module(self, model: nn.Module) -> None:
        # DeepSpeed wraps model and optimizer in one call (deepspeed.initialize): that happens in setup_optimizer.
        self._module = model

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.engine.module if self.engine is not None else self._module

    def setup_optimizer(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        model = self._module
        # The tutorial's dtypes, so the exported state_dict is fp32 even when DeepSpeed keeps bf16 weights.
        self._state_dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        self._join_process_group()
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO dumps the whole config on every start
        client_optimizer = None if "optimizer" in self.ds_config else optimizer
        client_scheduler: Any
        if client_optimizer is None:
            # dist_train's schedule (a JSON's scheduler runs as one: config/deepspeed_json.py), re-attached to
            # the optimizer DeepSpeed builds from the JSON.
            lr_lambda = scheduler.lr_lambdas[0]
            client_scheduler = lambda ds_optimizer: torch.optim.lr_scheduler.LambdaLR(ds_optimizer, lr_lambda)  # noqa: E731
        else:
            client_scheduler = scheduler
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model,
            optimizer=client_optimizer,
            model_parameters=[p for p in model.parameters() if p.requires_grad] if client_optimizer is None else None,
            lr_scheduler=client_scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self.engine = self.model = engine
        self.optimizer = ds_optimizer
        self.scheduler = ds_scheduler
        compute_dtype = autocast_dtype(self.train.precision)
        if compute_dtype is not None:
            self._input_cast = engine.module.register_forward_pre_hook(_cast_floating_inputs(compute_dtype))

    def _join_process_group(self) -> None:
        """DeepSpeed must use the group dist_train already joined (gloo on CPU, NCCL on CUDA), never its own, and
        the device dist_train chose (it reads LOCAL_RANK from the environment: groups.deepspeed_environment)."""
        for key, value in deepspeed_environment(self.dist_env).items():
            self._saved_environ.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        if self.device.type == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce with g++ (minutes on first use) that
            # only its tensor-parallel inference layers call; training collectives go through torch.distributed.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # With a group already initialised this wraps it (no MPI discovery, no second init_process_group).
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, dist_init_required=False, verbose=False)

    @property
    def steps_scheduler(self) -> bool:
        return True  # engine.step() steps the scheduler at each boundary (and not on an fp16 overflow)

    # ------------------------------------------------------------ the loop

    def autocast(self) -> ContextManager:
        # bf16/fp16.enabled: the engine has cast the module itself and the inputs are cast to match (as its
        # fp16.auto_cast does); torch autocast on top would re-cast every op's inputs for nothing.
        return contextlib.nullcontext()

    def accumulation_context(self, is_last_micro_batch: bool) -> ContextManager:
        return contextlib.nullcontext()  # DeepSpeed reduces gradients only at its accumulation boundary

    def backward(self, micro_batch_loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        if self.engine.is_gradient_accumulation_boundary() != is_last_micro_batch:
            raise RuntimeError(
                f"DeepSpeed's micro-step counter disagrees with the loader: an optimizer step must have exactly "
                f"{self.arithmetic.grad_accum_steps} micro-batches (gradient_accumulation_steps)"
            )
        self.engine.backward(micro_batch_loss)  # divides by gradient_accumulation_steps itself
        if not is_last_micro_batch:
            self.engine.step()  # off the boundary this only advances DeepSpeed's micro-step counter

    def optimizer_step(self, compute_grad_norm: bool = True) -> StepResult:
        self.engine.step()  # DeepSpeed computes the norm on every boundary step anyway
        norm = self.engine.get_global_grad_norm()  # before clipping; None when nothing computed it (stage 0)
        grad_norm = torch.full((), float("nan")) if norm is None else torch.as_tensor(norm).detach()
        return StepResult(grad_norm, skipped=not self.engine.was_step_applied())

    def train_mode(self, training: bool) -> None:
        self.engine.train(training)

    def local_parameters(self) -> list[torch.Tensor]:
        # Under ZeRO-3 a module parameter is an empty placeholder; this rank's partition is its ds_tensor.
        params = list(self.engine.module.parameters())
        return [getattr(p, "ds_tensor", p) for p in params]

    # ------------------------------------------------------------ checkpoints

    checkpoint_format = "deepspeed"

    def save_checkpoint(self, directory: Path, background: bool = False) -> None:
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG)  # always synchronous (see checkpoint.async_save)

    def load_checkpoint(self, directory: Path, meta: dict) -> None:
        refuse_code_in_pickles(sorted((Path(directory) / CHECKPOINT_TAG).glob("*.pt")))  # DeepSpeed unpickles with weights_only=False
        if meta.get("format", "deepspeed" if meta.get("strategy") == "deepspeed" else "dcp") != self.checkpoint_format:
            raise CheckpointError(
                f"checkpoint {directory} was written by strategy.name={meta.get('strategy')} (DCP), which DeepSpeed cannot load; "
                f"resume it with strategy.name={meta.get('strategy')}, or `dist-train export` it and start from the weights (model.weights=...)"
            )
        then_config = upgrade_saved_config(meta.get("config", {}))
        then_world, then_stage = meta.get("world_size"), then_config.get("strategy", {}).get("deepspeed", {}).get("zero_stage")
        now_stage = self.settings.deepspeed.zero_stage
        if then_stage != now_stage:
            raise CheckpointError(
                f"checkpoint {directory} was written with strategy.deepspeed.zero_stage={then_stage}, this run has "
                f"strategy.deepspeed.zero_stage={now_stage}; set strategy.deepspeed.zero_stage={then_stage}"
            )
        if then_world != self.dist_env.world_size:
            raise CheckpointError(
                f"checkpoint {directory} holds ZeRO partitions of {then_world} processes and this run has "
                f"{self.dist_env.world_size}; resume with {then_world} processes, or `dist-train export` it and "
                "start from the weights (model.weights=...)"
            )
        load_path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        if load_path is None:
            raise CheckpointError(f"checkpoint {directory} has no DeepSpeed files under {CHECKPOINT_TAG}/; it was not written by strategy.name=deepspeed")

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        module = self.engine.module
        gather: ContextManager = contextlib.nullcontext()
        if self.engine.zero_optimization_stage() == 3:
            gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        # The gathers are collective; only the main process, which writes model.pt, copies to CPU.
        keep = self.dist_env.is_main
        with gather:
            state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()} if keep else {}
        if self.train.precision != "fp32":
            # The weights the module holds are bf16/fp16 copies; the optimizer's fp32 masters are the trained ones.
            for name, param in module.named_parameters():
                master = deepspeed.utils.safe_get_full_fp32_param(param)  # collective under ZeRO
                if keep and master is not None and name in state:
                    state[name] = master.detach().to("cpu", copy=True)
        return {k: v.to(self._state_dtypes.get(k, v.dtype)) for k, v in state.items()}

    def teardown(self) -> None:
        if self._input_cast is not None:
            self._input_cast.remove()
            self._input_cast = None
        if self.engine is not None:
            self.engine.destroy()  # releases ZeRO-3's hooks and buffers
            self.engine = None
        for key, value in self._saved_environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_environ.clear()


def _cast_floating_inputs(dtype: torch.dtype) -> Any:
    def hook(module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    return hook


# ---------------------------------------------------------------- export


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The plain fp32 state_dict (tutorial keys) of a dist_train step directory written under any ZeRO stage,
    by DeepSpeed's own consolidation; no process group needed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / CHECKPOINT_TAG).is_dir():
        raise CheckpointError(f"{checkpoint_dir} has no DeepSpeed files under {CHECKPOINT_TAG}/; not a strategy.name=deepspeed checkpoint")
    refuse_code_in_pickles(sorted((checkpoint_dir / CHECKPOINT_TAG).glob("*.pt")))  # zero_to_fp32 unpickles with weights_only=False
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=CHECKPOINT_TAG)
    # Clone: the consolidated tensors are views into one flat buffer, which torch.save would write whole.
    # Buffers keep the dtype they were trained in (bf16 under train.precision=bf16); the tutorial's are fp32.
    return {k: (v.float() if v.is_floating_point() else v).clone() for k, v in state.items()}
