"""Counts the calls that force a host-device synchronisation on a GPU, per optimizer step, in a real run.

On CPU nothing actually waits, but the same calls would: reading a tensor's value on the host (`.item()`,
`.tolist()`, `float()` / `int()` / `bool()`, `.numpy()`, `.cpu()`), `GradScaler.get_scale()` and
`torch.cuda.synchronize()`. Two places are left out because their tensors live on the host on a GPU too,
so reading them costs no sync there: the training data loader (it builds batches on the CPU before the
loop copies them to the device) and torch.optim's own step counters (CPU tensors unless the optimizer is
fused or capturable).
"""

from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch

TENSOR_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")
OPTIMIZER_DIR = str(Path(torch.optim.__file__).parent)


class _LoaderProxy:
    """The trainer's train loader, marking the time spent inside it (host-side batch building)."""

    def __init__(self, loader: Any, counter: "SyncCounter") -> None:
        self._loader = loader
        self._counter = counter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def __iter__(self) -> Iterator:
        iterator = iter(self._loader)
        while True:
            self._counter.in_loader += 1
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self._counter.in_loader -= 1
            yield batch


class SyncCounter:
    """`with SyncCounter().attach(trainer) as counter: trainer.fit()`; then `counter.per_step[step]` lists the
    synchronising calls made while step `step` ran (from its first micro-batch to the next step's)."""

    def __init__(self) -> None:
        self.per_step: dict[int, list[str]] = defaultdict(list)
        self.current_step = 0
        self.in_loader = 0
        self._busy = False

    def _record(self, what: str) -> None:
        if self.in_loader or self._busy:
            return
        self._busy = True  # nothing below reads a tensor, but never count our own calls
        try:
            where = "?"
            frame = sys._getframe(2)  # the caller of the patched method
            while frame is not None:
                filename = frame.f_code.co_filename
                if filename.startswith(OPTIMIZER_DIR):
                    return
                if where == "?" and "dist_train" in filename:
                    where = f"{Path(filename).name}:{frame.f_lineno}"
                frame = frame.f_back
            self.per_step[self.current_step].append(f"{what} at {where}")
        finally:
            self._busy = False

    @contextlib.contextmanager
    def attach(self, trainer: Any) -> Iterator["SyncCounter"]:
        patches: list[tuple[Any, str, Any]] = []

        def patch(owner: Any, name: str, label: str) -> None:
            original = getattr(owner, name)

            def counted(*args: Any, **kwargs: Any) -> Any:
                self._record(label)
                return original(*args, **kwargs)

            patches.append((owner, name, original))
            setattr(owner, name, counted)

        for name in TENSOR_READS:
            patch(torch.Tensor, name, f"Tensor.{name}")
        patch(torch.amp.GradScaler, "get_scale", "GradScaler.get_scale")
        patch(torch.cuda, "synchronize", "torch.cuda.synchronize")
        original_step = trainer._optimizer_step

        def step_marker(*args: Any, **kwargs: Any) -> Any:
            self.current_step = trainer.progress.optimizer_step + 1
            return original_step(*args, **kwargs)

        trainer._optimizer_step = step_marker
        trainer.data.train = _LoaderProxy(trainer.data.train, self)
        try:
            yield self
        finally:
            trainer.data.train = trainer.data.train._loader
            del trainer._optimizer_step
            for owner, name, original in reversed(patches):
                setattr(owner, name, original)


def syncs_per_step(overrides: list[str], dist_env: Any) -> tuple[dict[int, list[str]], set[int], dict]:
    """Train configs/cnn_digits.yaml in this process with `overrides`; returns (synchronising calls per
    optimizer step, the steps that logged, the run's summary)."""
    from dist_train.config import load_config
    from dist_train.run import start_process_groups
    from dist_train.trainer import Trainer, planned_total_steps

    from .procs import REPO

    cfg = load_config(REPO / "configs" / "cnn_digits.yaml", ["data.source=digits", "train.progress_bar=false", "checkpoint.save_at_end=false", *overrides])
    trainer = Trainer.build(cfg, start_process_groups(cfg, dist_env))
    try:
        total = planned_total_steps(cfg, trainer.data.train.steps_per_epoch)
        log_steps = {s for s in range(1, total + 1) if s % cfg.train.log_interval == 0 or s == total}
        with SyncCounter().attach(trainer) as counter:
            summary = trainer.fit()
    finally:
        trainer.close()
    return dict(counter.per_step), log_steps, summary
