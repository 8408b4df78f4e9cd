"""Ranks agree, group of steps by group of steps, that their data is fit to train on, without waiting on each other.

A bad sample (a label outside the classes, a NaN input) lands in one rank's micro-batch. If that rank
simply raised, the others would wait in the next gradient all-reduce until the collective timeout (or die
on a closed connection). So each rank's loader all-reduces, on the control group (gloo, distributed/groups.py), a small verdict per
group of steps (the loader groups the steps of a few megabytes of data): any problem, and the samples
skipped at each step. The reduction for a group starts when the group is assembled and is waited for only
when the group is handed out, after the next group was assembled: by then it has long completed, so the
happy path costs one tiny CPU all-reduce per group in gloo's background thread and no host sync with the
accelerator. When any rank reports a problem, every rank gathers the messages (rare, blocking) and raises
the same one-line error before the same step: the first step of the group that holds the bad sample.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .shards import DataError


class StepAgreement:
    """Started in step order on every rank (the same number of times: every rank runs the same steps)."""

    def __init__(self, group: Optional[object]) -> None:
        self.group = group  # None: a single process (or ranks without a process group): local verdicts
        self.in_flight: list = []  # started, not yet finished: a pass that ends early leaves one behind

    @property
    def collective(self) -> bool:
        return self.group is not None

    def start(self, problem: Optional[str], skipped: list[int]) -> tuple:
        """Start agreeing on a group of steps: this rank's problem (if any) and its samples skipped per step."""
        verdict = torch.tensor([int(problem is not None), *skipped], dtype=torch.int64)
        work = dist.all_reduce(verdict, group=self.group, async_op=True) if self.group is not None else None
        if work is not None:
            self.in_flight.append(work)
        return verdict, work, problem

    def settle(self) -> None:
        """Wait for the reductions a pass started but never finished (every rank started them), so none is
        still in flight when the pass, or the process group, goes away."""
        while self.in_flight:
            work = self.in_flight.pop()
            try:
                work.wait()
            except RuntimeError:
                pass  # a rank is gone; its own error is the one that matters

    def finish(self, pending: tuple) -> list[int]:
        """Samples skipped per step of the group over all ranks; raises the first rank's problem on every rank."""
        verdict, work, problem = pending
        if work is not None:
            work.wait()
            self.in_flight.remove(work)
        if int(verdict[0]) == 0:
            return verdict[1:].tolist()
        if self.group is None:
            raise DataError(problem)
        problems: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(problems, problem, group=self.group)
        rank, first = next((r, p) for r, p in enumerate(problems) if p is not None)
        raise DataError(f"rank {rank}: {first}")
