"""DDP (and plain single-process) strategy: NCCL on CUDA, gloo on CPU; checkpoints in DCP (strategies/dcp.py).

`scaled_backward` and `scaled_optimizer_step` (loss-scaler unscale, global-norm clipping, step, skip flag on
the device) are the torch-native backward and optimizer step that FSDP2 shares."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError
from .base import StepResult, Strategy, check_precision_supported
from .dcp import DCPCheckpointing


class DDPStrategy(DCPCheckpointing, Strategy):
    name = "ddp"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        check_precision_supported(self.train.precision, self.device)
        if self.settings.ddp.sync_batchnorm and self.device.type != "cuda":
            raise ConfigError(
                "strategy.ddp.sync_batchnorm=true needs CUDA (torch's SyncBatchNorm has no CPU kernel); on CPU set it to false: "
                "each rank then normalises its own micro-batch and rank 0's running statistics are the ones evaluated, saved and exported"
            )

    def setup_module(self, model: nn.Module) -> None:
        if self.settings.ddp.sync_batchnorm and self.dist_env.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        self._module = model
        if self.dist_env.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(
                model, device_ids=device_ids, find_unused_parameters=self.settings.ddp.find_unused_parameters
            )
        else:
            self.model = model
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.train.precision == "fp16")
        self._params = [p for p in model.parameters() if p.requires_grad]

    @property
    def unwrapped_model(self) -> nn.Module:
        return self._module

    @property
    def wants_fused_optimizer(self) -> bool:
        return self.train.precision == "fp16"  # GradScaler.step then skips on the device, without a sync

    def accumulation_context(self, is_last_micro_batch: bool) -> ContextManager:
        if self.dist_env.distributed and not is_last_micro_batch:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, micro_batch_loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        # DDP averages over ranks; dividing by the accumulation count makes the sum over micro-batches a mean,
        # so the gradient is the mean over the whole global batch, as with one big batch on one process.
        scaled_backward(self.scaler, micro_batch_loss, self.arithmetic.grad_accum_steps)

    def optimizer_step(self, compute_grad_norm: bool = True) -> StepResult:
        # After DDP's all-reduce every rank holds the same gradients, so every rank sees the same inf/nan
        # and the scaler skips the same steps everywhere.
        self.finish_staging()  # an asynchronous save may still be copying the parameters this step writes
        return scaled_optimizer_step(self.optimizer, self.scaler, self._params, self.train.grad_clip, compute_grad_norm)

    def eval_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # Not through DDP: its forward would broadcast buffers (a collective) for every eval batch.
        return self._module(inputs)

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        # Every DDP replica holds the whole model, so no rank waits on another: only the main process copies.
        if not self.dist_env.is_main:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in self._module.state_dict().items()}


def scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """After `scaler.unscale_(optimizer)`: 1 if any gradient was inf/nan, else 0, as a tensor on the device.

    GradScaler keeps the flag per device in its per-optimizer state (private since torch 1.6, unchanged in
    2.x); summing it there is what GradScaler.step and update do themselves.
    """
    per_device = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    return sum(per_device.values()).reshape(())


def scaled_backward(scaler: Any, micro_batch_loss: torch.Tensor, grad_accum_steps: int) -> None:
    """Backward of loss / grad_accum_steps, loss-scaled under fp16; no extra tensor op when neither applies
    (dividing by 1 changes no bit, but costs a kernel launch per micro-batch)."""
    loss = micro_batch_loss if grad_accum_steps == 1 else micro_batch_loss / grad_accum_steps
    (scaler.scale(loss) if scaler.is_enabled() else loss).backward()


def scaled_optimizer_step(optimizer: Any, scaler: Any, params: list, grad_clip: Any, compute_grad_norm: bool) -> StepResult:
    """Unscale, clip to the global norm, step, zero the gradients; the skip flag stays on the device."""
    scaler.unscale_(optimizer)
    grad_norm = None
    if grad_clip is not None or compute_grad_norm:
        grad_norm = total_grad_norm(params)
    if grad_clip is not None:
        clip_to_norm(params, grad_clip, grad_norm)
    skipped: Any = False
    if scaler.is_enabled():
        # The flag the scaler itself skips on, kept on the device: get_scale() before and after the step
        # would read the scale on the host twice a step.
        found_inf = scaler_found_inf(scaler, optimizer)
        scaler.step(optimizer)
        scaler.update()
        skipped = found_inf > 0
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(grad_norm, skipped)


def total_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm over all gradients, without clip_grad_norm_'s rescaling pass. Gradients may be
    sharded DTensors (FSDP2): their norm is a partial result, completed over the ranks here."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        norm = torch.nn.utils.get_total_norm(grads)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads]))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.detach()


def clip_to_norm(params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every gradient by max_norm / total_norm when above it (clip_grad_norm_'s second half)."""
    if hasattr(torch.nn.utils, "clip_grads_with_norm_"):  # torch >= 2.6
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
        return
    coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.detach().mul_(coefficient.to(p.grad.device))
