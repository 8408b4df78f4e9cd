"""The training loop: micro-steps inside optimizer steps, evaluation, logging, checkpoints.

`Trainer.build(cfg, dist_env)` assembles the pieces (seeded model, optimizer, schedule, data, strategy,
checkpointer, tracker); the constructor only assigns them. `fit()` runs the loop, which is the same code
for every strategy.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .checkpoint import Checkpointer
from .config import BatchArithmetic, Config, batch_arithmetic
from .data import DataBundle, build_data
from .env import DistEnv
from .models import ModelSpec, build_model, model_spec
from .optim import build_optimizer, build_scheduler
from .strategies import Strategy, build_strategy
from .tracking import ConsoleLog, Tracker, build_tracker


class TrainingInterrupted(RuntimeError):
    """A stop was requested (signal / preemption); a checkpoint was saved first."""


@dataclass
class TrainProgress:
    """Where the loop is; checkpointed so a resume continues at the next sample."""

    epoch: int = 0
    optimizer_step: int = 0
    micro_step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


class RNGState:
    """Python, NumPy and torch (CPU and CUDA) generators of this rank."""

    def state_dict(self) -> dict:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loss_function(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(outputs.float(), targets)
    return F.mse_loss(outputs.float(), targets.float())


class Trainer:
    def __init__(
        self,
        cfg: Config,
        dist_env: DistEnv,
        arithmetic: BatchArithmetic,
        spec: ModelSpec,
        data: DataBundle,
        strategy: Strategy,
        checkpointer: Checkpointer,
        tracker: Tracker,
        console: ConsoleLog,
    ) -> None:
        self.cfg = cfg
        self.dist_env = dist_env
        self.arithmetic = arithmetic
        self.spec = spec
        self.data = data
        self.strategy = strategy
        self.checkpointer = checkpointer
        self.tracker = tracker
        self.console = console
        self.progress = TrainProgress()
        self.rng = RNGState()
        self.stop_requested = False  # set from a signal handler; acted on at a step boundary by all ranks

    # ------------------------------------------------------------ assembly

    @classmethod
    def build(cls, cfg: Config, dist_env: DistEnv) -> "Trainer":
        console = ConsoleLog(dist_env, cfg.train.progress_bar)
        arithmetic = batch_arithmetic(cfg.train, dist_env.world_size)
        spec = model_spec(cfg.model)
        strategy = build_strategy(cfg, dist_env, arithmetic)
        data = build_data(cfg, spec, arithmetic, dist_env)
        if cfg.train.deterministic:
            # Bitwise-repeatable kernels (slower); CUDA also needs a fixed cuBLAS workspace.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        # Same seed on every rank: identical initial replicas (DDP would broadcast anyway; ZeRO does not).
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model)
        optimizer = build_optimizer(cfg.optim, model)
        total_steps = planned_total_steps(cfg, data.train.steps_per_epoch)
        scheduler = build_scheduler(cfg.optim, optimizer, total_steps)
        strategy.setup(model, optimizer, scheduler)
        # From here on each rank draws its own random numbers (dropout, augmentation).
        seed_everything(cfg.train.seed + dist_env.global_rank)
        checkpointer = Checkpointer(cfg, dist_env, strategy)
        tracker = build_tracker(cfg, dist_env)
        return cls(cfg, dist_env, arithmetic, spec, data, strategy, checkpointer, tracker, console)

    def stateful(self) -> dict[str, Any]:
        """Everything besides model/optimizer/scheduler that a checkpoint must hold for an exact resume."""
        return {
            "progress": self.progress,
            "data": self.data.train,
            "rng": self.rng,
            "tracker": self.tracker,
        }

    # ------------------------------------------------------------ the loop

    def fit(self) -> dict:
        cfg, console = self.cfg, self.console
        train_loader = self.data.train
        steps_per_epoch = train_loader.steps_per_epoch
        total_steps = planned_total_steps(cfg, steps_per_epoch)
        console.print(f"dist_train: {self.dist_env.describe()} strategy={self.strategy.name} precision={cfg.train.precision}")
        console.print(f"batch: {self.arithmetic.describe()}")
        console.print(
            f"data: {self.data.num_train_samples} train samples -> {steps_per_epoch} steps/epoch "
            f"({train_loader.dropped_per_epoch} samples/epoch dropped to keep global batches full); "
            f"{self.data.num_eval_samples} eval samples; {total_steps} optimizer steps planned"
        )

        if cfg.train.resume:
            resumed = self.checkpointer.resume(cfg.train.resume, self.stateful())
            if resumed is not None:
                console.print(f"resumed from {resumed} at optimizer step {self.progress.optimizer_step}, epoch {self.progress.epoch}")
        self.tracker.start(cfg, self.progress.optimizer_step)

        start_time = time.perf_counter()
        start_samples = self.progress.samples_seen
        window = _Window(self.strategy.device)
        eval_metrics: dict = {}
        last_eval_step = -1
        bar = console.progress_bar(total=total_steps, initial=self.progress.optimizer_step)
        while self.progress.optimizer_step < total_steps:
            train_loader.set_epoch(self.progress.epoch)
            self.strategy.train_mode(True)
            steps_before = self.progress.optimizer_step
            data_wait_start = time.perf_counter()
            for step_batches in train_loader:
                window.data_wait += time.perf_counter() - data_wait_start
                next_step = self.progress.optimizer_step + 1
                self._optimizer_step(step_batches, window, will_log=next_step % cfg.train.log_interval == 0 or next_step == total_steps)
                bar.update(1)
                step = self.progress.optimizer_step
                epoch_done = step % steps_per_epoch == 0
                if epoch_done:
                    self.progress.epoch += 1
                if step % cfg.train.log_interval == 0 or step == total_steps:
                    self._log(window, bar)
                    window = _Window(self.strategy.device)
                if (cfg.train.eval_interval and step % cfg.train.eval_interval == 0) or (epoch_done and not cfg.train.eval_interval):
                    eval_metrics, last_eval_step = self.evaluate(), step
                    self.strategy.train_mode(True)
                stop = self._stop_agreed()
                self.checkpointer.maybe_save(step, self.stateful(), force=stop)
                if stop:
                    bar.close()
                    self.checkpointer.wait()
                    # Launchers kill the remaining ranks once one exits non-zero: close the main process's
                    # trackers (W&B writes its last step at finish) before any rank may leave.
                    self.tracker.finish()
                    self.strategy.barrier()
                    raise TrainingInterrupted(f"stopped on request at optimizer step {step}; checkpoint saved under {self.checkpointer.directory}")
                if step >= total_steps or epoch_done:
                    break
                data_wait_start = time.perf_counter()
            if self.progress.optimizer_step == steps_before:
                raise RuntimeError(f"the training loader yielded no batch in epoch {self.progress.epoch}; its position is {train_loader.state_dict()}")
        bar.close()

        elapsed = time.perf_counter() - start_time
        if last_eval_step != self.progress.optimizer_step:
            eval_metrics = self.evaluate()
        if cfg.checkpoint.save_at_end:
            self.checkpointer.maybe_save(self.progress.optimizer_step, self.stateful(), force=True)
        self.checkpointer.wait()
        summary = {
            "optimizer_steps": self.progress.optimizer_step,
            "epochs_completed": self.progress.epoch,
            "samples_seen": self.progress.samples_seen,
            "skipped_steps": self.progress.skipped_steps,
            "skipped_samples": self.data.train.skipped_samples,  # bad samples skipped under data.skip_bad_samples, all ranks
            "train_seconds": elapsed,
            "samples_per_second": (self.progress.samples_seen - start_samples) / max(elapsed, 1e-9),
            "world_size": self.dist_env.world_size,
            "grad_accum_steps": self.arithmetic.grad_accum_steps,
            "eval": eval_metrics,
        }
        self._write_outputs(summary)
        return summary

    def _optimizer_step(self, step_batches: list, window: "_Window", will_log: bool = True) -> None:
        strategy, device = self.strategy, self.strategy.device
        last = len(step_batches) - 1
        compute_start = time.perf_counter()
        for i, (inputs, targets) in enumerate(step_batches):
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with strategy.accumulation_context(i == last):
                with strategy.autocast():
                    outputs = strategy.model(inputs)
                loss = loss_function(self.spec.task, outputs, targets)
                strategy.backward(loss, i == last)
            window.loss_sum += loss.detach()
            window.micro_batches += 1
            self.progress.micro_step += 1
        result = strategy.optimizer_step(compute_grad_norm=will_log)
        if not strategy.steps_scheduler:
            strategy.scheduler.step()
        self.progress.optimizer_step += 1
        self.progress.samples_seen += self.arithmetic.global_batch_size
        self.progress.skipped_steps += int(result.skipped)
        window.grad_norm = result.grad_norm
        window.steps += 1
        window.compute += time.perf_counter() - compute_start

    def _stop_agreed(self) -> bool:
        """All ranks must stop at the same step, or the next collective hangs: max-reduce the local flag.

        The reduction costs a collective and a host sync, so it runs only at log steps (where the loop syncs
        anyway); a preemption signal gives minutes of warning. `train.stop_at_step` is in every rank's config
        and needs no agreement.
        """
        step = self.progress.optimizer_step
        if step == self.cfg.train.stop_at_step:
            return True
        if step % self.cfg.train.log_interval:
            return False
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.strategy.device)
        return bool(self.strategy.all_reduce_max(flag).item())

    def _log(self, window: "_Window", bar: Any) -> None:
        if window.steps == 0:
            return
        totals = torch.stack([window.loss_sum.float().reshape(()), torch.tensor(float(window.micro_batches), device=window.loss_sum.device)])
        self.strategy.all_reduce_sum(totals)
        loss = (totals[0] / totals[1]).item()
        if not math.isfinite(loss) and self.cfg.train.precision != "fp16":
            raise FloatingPointError(
                f"training loss became {loss} at optimizer step {self.progress.optimizer_step}; lower optim.lr or set train.grad_clip"
            )
        elapsed = time.perf_counter() - window.start
        metrics = {
            "train/loss": loss,
            "train/lr": self.strategy.optimizer.param_groups[0]["lr"],
            "train/grad_norm": float("nan") if window.grad_norm is None else float(window.grad_norm),
            "train/samples_per_second": window.steps * self.arithmetic.global_batch_size / max(elapsed, 1e-9),
            "train/data_wait_fraction": window.data_wait / max(window.data_wait + window.compute, 1e-9),
            # Fractional progress through the data (1.0 = one full epoch), continuous across epoch ends.
            "train/epoch": self.progress.optimizer_step / self.data.train.steps_per_epoch,
        }
        if self.cfg.data.skip_bad_samples:
            metrics["train/skipped_samples"] = self.data.train.skipped_samples  # bad samples skipped so far, all ranks
        if torch.cuda.is_available() and self.strategy.device.type == "cuda":
            metrics["train/cuda_max_memory_mb"] = torch.cuda.max_memory_allocated(self.strategy.device) / 2**20
        # The epoch this step belonged to (progress.epoch has already moved on after an epoch's last step).
        step_epoch = (self.progress.optimizer_step - 1) // self.data.train.steps_per_epoch
        self.console.log_line(self.progress.optimizer_step, step_epoch, metrics, bar)
        self.tracker.log(metrics, step=self.progress.optimizer_step)

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Exact over the whole eval split: sums are all-reduced, padding (weight 0) is not counted."""
        strategy = self.strategy
        strategy.train_mode(False)
        device = strategy.device
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.float64)
        count = torch.zeros((), device=device, dtype=torch.float64)
        for inputs, targets, weights in self.data.eval:
            inputs, targets, weights = inputs.to(device), targets.to(device), weights.to(device, torch.float64)
            with strategy.autocast():
                outputs = strategy.eval_forward(inputs)
            outputs = outputs.float()
            if self.spec.task == "classification":
                per_sample = F.cross_entropy(outputs, targets, reduction="none")
                correct += ((outputs.argmax(dim=1) == targets).double() * weights).sum()
            else:
                per_sample = F.mse_loss(outputs, targets.float(), reduction="none").flatten(1).mean(dim=1)
            loss_sum += (per_sample.double() * weights).sum()
            count += weights.sum()
        totals = strategy.all_reduce_sum(torch.stack([loss_sum, correct, count]))
        n = max(totals[2].item(), 1.0)
        metrics = {"eval/loss": totals[0].item() / n, "eval/samples": int(totals[2].item())}
        if self.spec.task == "classification":
            metrics["eval/accuracy"] = totals[1].item() / n
        else:
            metrics["eval/mse"] = metrics["eval/loss"]
        self.console.print("eval: " + "  ".join(f"{k.split('/')[1]}={v:.4f}" if isinstance(v, float) else f"{k.split('/')[1]}={v}" for k, v in metrics.items()))
        self.tracker.log(metrics, step=self.progress.optimizer_step)
        return metrics

    # ------------------------------------------------------------ outputs

    def _write_outputs(self, summary: dict) -> None:
        state = self.strategy.full_model_state_dict()  # collective: every rank takes part
        if self.dist_env.is_main:
            out = Path(self.cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            # The tutorial's own format: model.load_state_dict(torch.load("model.pt")).
            torch.save(state, out / "model.pt")
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.strategy.barrier()

    def close(self) -> None:
        self.tracker.finish()
        self.strategy.teardown()


def planned_total_steps(cfg: Config, steps_per_epoch: int) -> int:
    by_epochs = cfg.train.epochs * steps_per_epoch
    return min(by_epochs, cfg.train.max_steps) if cfg.train.max_steps else by_epochs


class _Window:
    """Running sums between two log lines; the loss stays on the device so no step forces a host sync."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.micro_batches = 0
        self.steps = 0
        self.grad_norm: Any = 0.0
        self.data_wait = 0.0
        self.compute = 0.0
        self.start = time.perf_counter()
