"""DeepSpeed ZeRO (stages 1, 2, 3) behind the same Strategy contract as DDP.

The DeepSpeed JSON (`strategy.deepspeed.config`) is reconciled with dist_train's config on the config side
(config/deepspeed_json.py); this module builds the engine from the result. DeepSpeed joins the process group
dist_train made and is told the device dist_train chose (distributed/groups.py). Accumulation, loss scaling,
clipping and the LR schedule's stepping are DeepSpeed's: `engine.backward` divides the loss by the
accumulation steps and `engine.step` after every micro-batch advances its micro-step counter, updating
the weights only at the boundary. Checkpoints are DeepSpeed's own sharded files inside the step directory
the Checkpointer hands out, plus dist_train's side state (progress, data position, RNG). DeepSpeed's loader
reads them back on the same world size, ZeRO stage and precision; any other checkpoint (another world size,
stage or precision, or a DDP/FSDP2 one) is loaded by parameter name through strategies/zero_bridge.py.
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
from . import zero_bridge
from .base import StepResult, Strategy, autocast_dtype, check_precision_supported, require_dcp_files, written_format
from .zero_bridge import ZERO_TAG as CHECKPOINT_TAG, refuse_loss_scale_crossing


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
        if written_format(meta) == self.checkpoint_format and self._same_partitioning(meta):
            self._load_own_partitions(directory)
            return
        # Another world size, ZeRO stage or precision, or another strategy's checkpoint: by parameter name.
        refuse_loss_scale_crossing(directory, meta, self.train.precision)
        if written_format(meta) == self.checkpoint_format:
            source = zero_bridge.dcp_view(directory, self.groups)
        else:
            source = require_dcp_files(directory, meta)
        from .dcp import load_dcp_full

        state = load_dcp_full(source)
        zero_bridge.load_into_engine(self.engine, state, str(directory))
        self._load_schedule_and_counters(state, meta, directory)

    def _same_partitioning(self, meta: dict) -> bool:
        """DeepSpeed's own loader reads only the partitions of the same world size, ZeRO stage and precision
        (bf16 renames the files and changes what the module holds)."""
        then = upgrade_saved_config(meta.get("config", {}))
        return (
            meta.get("world_size") == self.dist_env.world_size
            and then.get("strategy", {}).get("deepspeed", {}).get("zero_stage") == self.settings.deepspeed.zero_stage
            and then.get("train", {}).get("precision", "fp32") == self.train.precision
        )

    def _load_own_partitions(self, directory: Path) -> None:
        refuse_code_in_pickles(sorted((Path(directory) / CHECKPOINT_TAG).glob("*.pt")))  # DeepSpeed unpickles with weights_only=False
        load_path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        if load_path is None:
            raise CheckpointError(f"checkpoint {directory} has no DeepSpeed files under {CHECKPOINT_TAG}/; it was not written by strategy.name=deepspeed")

    def _load_schedule_and_counters(self, state: dict, meta: dict, directory: Path) -> None:
        saved, scheduler = state.get("scheduler") or {}, self.engine.lr_scheduler
        if scheduler is not None and saved:
            if set(saved) != set(scheduler.state_dict()):
                raise CheckpointError(
                    f"checkpoint {directory} holds an LR schedule of another kind than this run's {type(scheduler).__name__} "
                    f"(state keys {sorted(saved)}); remove the \"scheduler\" section of strategy.deepspeed.config, or add the one it was trained with"
                )
            scheduler.load_state_dict(saved)
        counters = state.get("deepspeed") or {}
        step = int(meta["step"])
        self.engine.global_steps = int(counters.get("global_steps") or step)
        self.engine.global_samples = int(counters.get("global_samples") or step * self.arithmetic.global_batch_size)
        self.engine.skipped_steps = int(counters.get("skipped_steps") or 0)

    def full_training_state(self) -> tuple[dict, dict]:
        model, optimizer = zero_bridge.engine_state(self.engine, keep=self.dist_env.is_main)
        if self.dist_env.is_main and self.engine.lr_scheduler is not None:
            optimizer["scheduler"] = self.engine.lr_scheduler.state_dict()
        return model, optimizer

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
