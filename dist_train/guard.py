"""Divergence: noticed without a host sync per step, never saved, and reported with the first bad step.

Policy: stop. A non-finite loss or gradient norm (or, under fp16, more than
`train.max_consecutive_skipped_steps` steps in a row skipped by the loss scaler) ends the run with one
line naming the first bad optimizer step and exit code 3; the checkpoint before it stays the newest one,
and a restart of the job (torchrun, Slurm) refuses to train into the same divergence again.

How it stays cheap: each step appends the window's running loss sum to a device buffer (one copy). A
running sum stays non-finite once any term was, so the first non-finite entry is the first bad step. The
gradient norm joins the sum as `0 * norm` (0 when finite, NaN otherwise) on the steps that compute it.
Under fp16, steps the scaler skipped leave the weights untouched and are left out of the sum; they are
counted instead. The buffer is read at log steps (where the loop syncs anyway) and before every save,
together with a check that the parameters themselves are finite.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Union

import torch

EXIT_DIVERGED = 3


class TrainingDiverged(RuntimeError):
    """Training produced non-finite values; nothing after the last good checkpoint was saved."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


Skipped = Union[bool, torch.Tensor]


class StepWindow:
    """Running sums between two log lines; everything stays on the device so no step forces a host sync."""

    def __init__(self, device: torch.device, capacity: int, first_step: int) -> None:
        self.device = device
        self.first_step = first_step  # the optimizer step this window's first entry belongs to
        self.loss_sum = torch.zeros((), device=device)
        self.counted: Any = 0  # micro-batches in loss_sum: an int, or a device tensor once steps can be skipped
        self.running = torch.zeros(max(capacity, 1), device=device)
        self.steps = 0
        self.grad_norm: Any = None
        self.data_wait = 0.0
        self.compute = 0.0
        self.start_time = time.perf_counter()

    def add_step(self, step_loss: torch.Tensor, micro_batches: int, grad_norm: Optional[torch.Tensor], skipped: Skipped) -> None:
        """`step_loss`: the sum of this step's micro-batch losses."""
        if grad_norm is not None:
            step_loss = step_loss + grad_norm.to(step_loss.device) * 0.0  # NaN unless the norm is finite
        if isinstance(skipped, torch.Tensor):
            kept = ~skipped
            self.loss_sum += torch.where(kept, step_loss, torch.zeros_like(step_loss))
            self.counted = self.counted + kept.to(torch.float32) * micro_batches
        elif not skipped:
            self.loss_sum += step_loss
            self.counted = self.counted + micro_batches
        if self.steps >= self.running.numel():  # more steps than the log interval (a save between logs)
            self.running = torch.cat([self.running, torch.zeros_like(self.running)])
        self.running[self.steps] = self.loss_sum
        self.grad_norm = grad_norm
        self.steps += 1

    def first_bad_step(self) -> torch.Tensor:
        """Device scalar: the first optimizer step with a non-finite value in this window, -1 if none."""
        if self.steps == 0:
            return torch.full((), -1.0, device=self.device)
        bad = ~torch.isfinite(self.running[: self.steps])
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
