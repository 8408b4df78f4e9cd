"""Divergence: noticed without a host sync per step, never saved, and reported with the first bad step.

Policy: stop. A non-finite loss or gradient norm (or, under fp16, more than
`train.max_consecutive_skipped_steps` steps in a row skipped by the loss scaler) ends the run with one
line naming the first bad optimizer step and exit code 3; the checkpoint before it stays the newest one,
and a restart of the job (torchrun, Slurm) refuses to train into the same divergence again.

How it stays cheap: each step appends its (detached) loss tensor to a list, no device work at all; at log
steps (where the loop syncs anyway) and before every save the list is stacked once, giving both the
window's loss sum and the first non-finite entry, which is the first bad step. The gradient norm joins a
step's entry as `0 * norm` (0 when finite, NaN otherwise) on the steps that compute it. Under fp16, steps
the scaler skipped leave the weights untouched and enter as 0; they are counted instead. Saves also check
that the parameters themselves are finite.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Union

import torch

from ..errors import EXIT_DIVERGED  # noqa: F401 (defined with the other exit codes)


class TrainingDiverged(RuntimeError):
    """Training produced non-finite values; nothing after the last good checkpoint was saved."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


Skipped = Union[bool, torch.Tensor]


class StepWindow:
    """The steps between two log lines; everything stays on the device so no step forces a host sync."""

    def __init__(self, device: torch.device, first_step: int) -> None:
        self.device = device
        self.first_step = first_step  # the optimizer step this window's first entry belongs to
        self.losses: list[torch.Tensor] = []  # per step: the sum of its micro-batch losses (0 if skipped)
        self.counted: Any = 0  # micro-batches in the losses: an int, or a device tensor once steps can be skipped
        self.steps = 0
        self.grad_norm: Any = None
        self.data_wait = 0.0
        self.forward = 0.0  # forward + loss, before the step's first collective
        self.compute = 0.0
        self.start_time = time.perf_counter()

    def add_step(self, step_loss: torch.Tensor, micro_batches: int, grad_norm: Optional[torch.Tensor], skipped: Skipped) -> None:
        """`step_loss`: the sum of this step's micro-batch losses, detached."""
        if grad_norm is not None:
            step_loss = step_loss + grad_norm.to(step_loss.device) * 0.0  # NaN unless the norm is finite
        if isinstance(skipped, torch.Tensor):
            kept = ~skipped
            step_loss = torch.where(kept, step_loss, torch.zeros_like(step_loss))
            self.counted = self.counted + kept.to(torch.float32) * micro_batches
        elif skipped:
            step_loss = torch.zeros_like(step_loss)
        else:
            self.counted = self.counted + micro_batches
        if step_loss.dtype != torch.float32 or step_loss.dim():  # a model's own loss may be half or shaped [1]
            step_loss = step_loss.float().reshape(())
        self.losses.append(step_loss)
        self.grad_norm = grad_norm
        self.steps += 1

    def _stacked(self) -> torch.Tensor:
        if not self.losses:
            return torch.zeros(0, device=self.device)
        return torch.stack(self.losses)

    @property
    def loss_sum(self) -> torch.Tensor:
        """Device scalar: the window's loss total (over the kept micro-batches)."""
        return self._stacked().sum()

    def first_bad_step(self) -> torch.Tensor:
        """Device scalar: the first optimizer step with a non-finite value in this window, -1 if none."""
        if self.steps == 0:
            return torch.full((), -1.0, device=self.device)
        bad = ~torch.isfinite(self._stacked())
        first = self.first_step + bad.to(torch.int64).argmax().to(torch.float32)
        return torch.where(bad.any(), first, torch.full_like(first, -1.0))


class SkipCounter:
    """fp16: steps skipped by the loss scaler, in total and in a row, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros((), device=device)
        self.in_a_row = torch.zeros((), device=device)
        self.longest_run = torch.zeros((), device=device)

    def add(self, skipped: Skipped) -> None:
        flag = torch.as_tensor(skipped, device=self.total.device).to(torch.float32)
        self.total += flag
        self.in_a_row = (self.in_a_row + 1.0) * flag
        self.longest_run = torch.maximum(self.longest_run, self.in_a_row)


def parameters_finite(parameters: list[torch.Tensor]) -> torch.Tensor:
    """Device bool scalar: every element of every tensor is finite (one fused norm over all of them)."""
    tensors = [p.detach() for p in parameters if p.numel()]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        total = torch.nn.utils.get_total_norm(tensors, norm_type=2.0)
    else:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))
    return torch.isfinite(total)


def divergence_message(first_bad_step: int, longest_skip_run: int, limit: int, last_saved_step: Optional[int], checkpoint_dir: str) -> str:
    if first_bad_step >= 0:
        what = f"the loss or gradient norm became non-finite at optimizer step {first_bad_step}"
    elif longest_skip_run > limit:
        what = f"the fp16 loss scaler skipped {longest_skip_run} optimizer steps in a row (train.max_consecutive_skipped_steps={limit})"
    else:
        what = "the parameters became non-finite"
    saved = f"the newest checkpoint is step {last_saved_step} in {checkpoint_dir}" if last_saved_step is not None else "no checkpoint was saved"
    return (
        f"training diverged: {what}; nothing non-finite was saved ({saved}). "
        "Lower optim.lr or set train.grad_clip, then resume with train.resume=auto (or a step-N path)"
    )
