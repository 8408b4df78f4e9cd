"""The tutorial's linear regression, paced: each training forward sleeps, so a run lasts long enough for a
test to signal or kill it mid-run on any machine speed. The arithmetic is the plain model's.

  model.name=tests.workers.paced_model:PacedLinear model.input_shape=[1] model.task=regression
  model.kwargs={delay_seconds: 0.02}
  model.kwargs={delay_seconds: 0.02, slow_rank: 1, slow_delay_seconds: 0.1}   rank 1 a straggler (same arithmetic)
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class PacedLinear(nn.Module):
    def __init__(self, delay_seconds: float = 0.02, slow_rank: int = -1, slow_delay_seconds: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)
        # The test's stand-in for a slow node: only the pace differs, never the numbers.
        self.delay_seconds = slow_delay_seconds if os.environ.get("RANK") == str(slow_rank) else delay_seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.delay_seconds)
        return self.linear(x)


# The CLI arguments of a paced run: linear regression, 4 epochs x 25 steps (819 samples, global batch 32).
TRAIN_ARGS = [
    "configs/linear_regression.yaml",
    "model.name=tests.workers.paced_model:PacedLinear",
    "model.input_shape=[1]",
    "model.task=regression",
    "model.kwargs={delay_seconds: 0.03}",
    "train.epochs=4",
    "train.log_interval=5",
    "train.progress_bar=false",
]
TOTAL_STEPS = 100
