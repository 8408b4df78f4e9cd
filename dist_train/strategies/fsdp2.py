"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded over ranks.

Each natural block of the model is its own FSDP unit (torchvision's BasicBlock/Bottleneck, else every
Linear/Conv layer), then the root: a unit's parameters are gathered just before its forward and (with
`strategy.fsdp2.reshard_after_forward`) freed right after. The optimizer is built after sharding, over the DTensor
parameters. bf16/fp16 run through FSDP's MixedPrecisionPolicy (parameters cast for compute, gradients
reduced in fp32), not torch autocast; normalisation layers stay in fp32 (their own units), since BatchNorm's
fp32 running statistics need fp32 inputs on CPU. Checkpoints are DCP with the same keys as DDP's, so either
resumes the other on any world size.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, ContextManager

import torch
from torch import nn

from ..config import ConfigError
from ..distributed.groups import GroupNeeds
from .base import StepResult, Strategy, autocast_dtype, check_precision_supported
from .dcp import DCPCheckpointing
from .ddp import scaled_backward, scaled_optimizer_step

BLOCK_CLASS_NAMES = ("BasicBlock", "Bottleneck")  # torchvision ResNets' residual blocks
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that get their own fully_shard call, innermost first (the root comes after them)."""
    blocks = [m for m in model.modules() if type(m).__name__ in BLOCK_CLASS_NAMES]
    if blocks:
        return blocks
    return [m for m in model.modules() if isinstance(m, LAYER_TYPES) and m is not model and any(True for _ in m.parameters(recurse=False))]


class FSDP2Strategy(DCPCheckpointing, Strategy):
    name = "fsdp2"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            raise ConfigError(f"strategy.name=fsdp2 needs torch >= 2.6 (this is {torch.__version__}); use strategy.name=ddp") from None
        check_precision_supported(self.train.precision, self.device)
        if self.settings.ddp.sync_batchnorm:
            raise ConfigError("strategy.ddp.sync_batchnorm=true is a DDP option; with strategy.name=fsdp2 set it to false")
        if self.settings.fsdp2.cpu_offload and self.device.type != "cuda":
            raise ConfigError("strategy.fsdp2.cpu_offload=true moves sharded parameters from the GPU to the CPU; this run is on the CPU already: set it to false")

    @classmethod
    def group_needs(cls, cfg: Any) -> GroupNeeds:
        # fully_shard needs a group even for one process; CPU-offloaded shards are reduced as CPU tensors.
        return replace(super().group_needs(cfg), alone=True, cpu_collectives=cfg.strategy.fsdp2.cpu_offload)

    # ------------------------------------------------------------ setup

    def setup_module(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        model.to(self.device)
        compute = autocast_dtype(self.train.precision)
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute else MixedPrecisionPolicy()
        options = dict(
            reshard_after_forward=self.settings.fsdp2.reshard_after_forward,
            offload_policy=CPUOffloadPolicy() if self.settings.fsdp2.cpu_offload else OffloadPolicy(),
        )
        if compute is not None:
            norm_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
            for norm in [m for m in model.modules() if isinstance(m, NORM_TYPES) and any(True for _ in m.parameters(recurse=False))]:
                fully_shard(norm, mp_policy=norm_policy, **options)
        for unit in shard_units(model):
            fully_shard(unit, mp_policy=policy, **options)
        fully_shard(model, mp_policy=policy, **options)
        self.model = self._module = model
        # The scaler's found-inf flag must agree over ranks that hold different gradient shards.
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        self.scaler = ShardedGradScaler(self.device.type, enabled=self.train.precision == "fp16")
        self._params = [p for p in model.parameters() if p.requires_grad]

    @property
    def unwrapped_model(self) -> nn.Module:
        return self._module  # fully_shard changes the module in place: it is the model and its own wrapper

    # ------------------------------------------------------------ the loop

    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()  # MixedPrecisionPolicy casts parameters and inputs

    def accumulation_context(self, is_last_micro_batch: bool) -> ContextManager:
        # Gradients accumulate unsharded-and-unreduced until the last micro-batch, which reduce-scatters.
        self._module.set_requires_gradient_sync(is_last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, micro_batch_loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        # The reduce-scatter averages over ranks; dividing by the accumulation count makes it the global mean.
        scaled_backward(self.scaler, micro_batch_loss, self.arithmetic.grad_accum_steps)

    def optimizer_step(self, compute_grad_norm: bool = True) -> StepResult:
        self.finish_staging()  # an asynchronous save may still be copying the parameters this step writes
        return scaled_optimizer_step(self.optimizer, self.scaler, self._params, self.train.grad_clip, compute_grad_norm)

    def local_parameters(self) -> list[torch.Tensor]:
        return [p.to_local() if hasattr(p, "to_local") else p for p in self._module.parameters()]

    # ------------------------------------------------------------ export

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Collective (every rank sends its shards); with cpu_offload only the main process keeps the result.
        state = get_model_state_dict(self._module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.dist_env.is_main else {}
