"""Per-step overhead (issue 16): an ordinary optimizer step of a real run does the tensor work of the bare
tutorial loop, plus taking its batch from the data, and nothing else.

Tensor ops are counted below autograd (a TorchDispatchMode sees every aten op, forward, backward and the
optimizer's): the per-step count of a run is the difference between a run of 8 steps and one of 4 (start-up,
the end-of-run log, evaluation and export are the same in both), so only what every step does remains.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dist_train.config import load_config
from dist_train.distributed.environment import DistEnv
from dist_train.distributed.groups import ProcessGroups
from dist_train.models.tutorial import CNN
from dist_train.trainer import Trainer
from tests.procs import REPO, worker

# The loader's share of a step: the rank's slice of the epoch order, the micro-batch's slice of that, and one
# row gather each for the inputs and the targets. And the loss kept for the log line, detached (a view: no
# copy, and the step's autograd graph is not kept alive until the log step).
EXPECTED_EXTRA = Counter({"slice": 2, "index_select": 2, "detach": 1})


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def run_ops(tmp_path, steps: int) -> Counter:
    cfg = load_config(REPO / "configs" / "cnn_digits.yaml", [
        "data.source=digits", "optim.name=adam", "optim.schedule=constant",
        "train.global_batch_size=64", "train.micro_batch_size=64",
        f"train.max_steps={steps}", "train.log_interval=1000", "train.eval_interval=1000000",
        "train.progress_bar=true", "checkpoint.save_at_end=false", f"output_dir={tmp_path / str(steps)}",
    ])
    trainer = Trainer.build(cfg, ProcessGroups.start(DistEnv()))
    try:
        with OpCounter() as counter:
            summary = trainer.fit()
    finally:
        trainer.close()
    assert summary["optimizer_steps"] == steps
    return counter.ops


def bare_loop_ops(steps: int) -> Counter:
    """The tutorial's step over a pre-built batch: forward, cross-entropy, backward, Adam, zero_grad."""
    torch.manual_seed(0)
    model = CNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    X, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def step() -> None:
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # Adam's first step creates its state
    with OpCounter() as counter:
        for _ in range(steps):
            step()
    return counter.ops


def test_an_ordinary_step_does_the_bare_loops_tensor_work_and_nothing_else(tmp_path):
    per_four_steps = run_ops(tmp_path, 8) - run_ops(tmp_path, 4)
    bare = bare_loop_ops(4)
    extra = per_four_steps - bare
    missing = bare - per_four_steps
    # Divided by 4: what one step adds. A loss divided by an accumulation count of 1, a running loss sum
    # and its buffer copy, a device copy of the batch or the global norm on non-log steps all show here.
    assert {op: n / 4 for op, n in extra.items()} == {op: float(n) for op, n in EXPECTED_EXTRA.items()}
    assert not missing, f"the run skipped part of the bare step: {dict(missing)}"


@pytest.mark.slow
def test_the_stop_agreement_crosses_the_network_at_its_pace_and_every_rank_stops_at_the_same_boundary():
    # Polling every step cost up to 0.4 ms/step under DDP here; paced to ~0.5 s, a request made at boundary 3
    # on rank 1 travels with the poll at boundary 50 and is read by both ranks at boundary 100.
    result = worker("stop_agreement_pace.py", nproc=2, timeout=120)
    assert "rank 0: every=50 agreed_at=[100, 100]" in result.stdout
    assert "rank 1: every=50 agreed_at=[100, 100]" in result.stdout
