"""The training loop: micro-steps inside optimizer steps, evaluation, logging, checkpoints.

`Trainer.build(cfg, groups)` assembles the pieces (seeded model, optimizer, schedule, data, strategy,
checkpointer, tracker); the constructor only assigns them. `fit()` runs the loop, which is the same code
for every strategy.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.nn import functional as F

from .batches import batch_size, model_input, resolve_loss, select, task_loss, to_device
from .checkpoint import Checkpointer
from .config import BatchArithmetic, Config, ConfigError, batch_arithmetic
from .data import DataBundle, build_data
from .determinism import use_deterministic_algorithms
from .distributed.groups import ProcessGroups
from .errors import storage_error
from .files import atomic_write
from .supervise.guard import SkipCounter, StepWindow, TrainingDiverged, divergence_message, parameters_finite
from .checkpoint.lineage import RunInfo
from .models import ModelSpec, build_model, describe_weights, model_spec
from .optim import apply_hyperparameters, build_optimizer, build_scheduler
from .strategies import Strategy, build_strategy
from .observe.runlog import model_summary
from .observe.tracking import ConsoleLog, Tracker, build_tracker
from .user import UserParts
from .supervise.watchdog import NullWatchdog, Watchdog


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
    """Python, NumPy and torch generators of this rank, and the CUDA generator of this rank's own device.

    Only this rank's device: the other GPUs a process can see belong to other ranks, and a resume may see
    fewer of them (one GPU per task under Slurm)."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        self.device = device

    def state_dict(self) -> dict:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda")
        if cuda is not None and self.device.type == "cuda":
            if isinstance(cuda, (list, tuple)):  # an older checkpoint held every visible GPU's generator
                index = self.device.index or 0
                cuda = cuda[index] if index < len(cuda) else None
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        groups: ProcessGroups,
        arithmetic: BatchArithmetic,
        spec: ModelSpec,
        data: DataBundle,
        strategy: Strategy,
        checkpointer: Checkpointer,
        tracker: Tracker,
        console: ConsoleLog,
        loss: Optional[Any] = None,
    ) -> None:
        self.cfg = cfg
        self.groups = groups
        self.dist_env = groups.dist_env
        self.arithmetic = arithmetic
        self.spec = spec
        self.data = data
        self.strategy = strategy
        self.checkpointer = checkpointer
        self.tracker = tracker
        self.console = console
        self.custom_loss = loss  # the model's own loss(outputs, batch); None: the tutorial loss for spec.task
        self.progress = TrainProgress()
        self.rng = RNGState(strategy.device)
        self.stop_requested = False  # set from a signal handler; acted on at a step boundary by all ranks
        self.skips = SkipCounter(strategy.device) if cfg.train.precision == "fp16" else None
        self._skipped_before = 0  # skipped steps restored from the checkpoint; self.skips counts this process's
        self.model_summary = ""
        # name -> fn(outputs, targets) giving one value per sample; averaged exactly over the eval split
        self.metrics: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
        self.watchdog: Watchdog | NullWatchdog = NullWatchdog()  # run.py starts a real one for multi-process jobs
        self.stop_agreement: Any = None  # signals.StopAgreement, made collectively in fit()
        self.save_seconds = 0.0  # how long the newest checkpoint save took (told against the grace period)
        self._straggler_streak: tuple[int, int] = (-1, 0)  # (rank, log steps in a row it was the slow one)

    # ------------------------------------------------------------ assembly

    @classmethod
    def build(cls, cfg: Config, groups: ProcessGroups, run: Optional[RunInfo] = None, parts: Optional[UserParts] = None) -> "Trainer":
        """`run`: the identity and resume plan `RunDirectory.open` decided (None: detached, see RunInfo).
        `parts`: a user's own model, datasets and metrics (the Python API) in place of the config's."""
        parts = parts or UserParts()
        dist_env = groups.dist_env
        console = ConsoleLog(dist_env, cfg.train.progress_bar)
        arithmetic = batch_arithmetic(cfg.train, dist_env.world_size)
        spec = parts.model_spec(cfg.model) if parts.model is not None else model_spec(cfg.model)
        strategy = build_strategy(cfg, groups, arithmetic)
        data = parts.data(cfg, arithmetic, dist_env, groups.control) if parts.train_dataset is not None else build_data(cfg, spec, arithmetic, dist_env, groups.control)
        if cfg.train.deterministic:
            note = use_deterministic_algorithms(dist_env.torch_device)
            if note:
                console.print(note)
        # Same seed on every rank: identical initial replicas (DDP would broadcast anyway; ZeRO does not).
        seed_everything(cfg.train.seed)
        # Wrap or shard first, then build the optimizer over the parameters the module now has (FSDP2 swaps
        # in sharded DTensor parameters).
        model = parts.build_model() if parts.model is not None else build_model(cfg.model)
        summary = model_summary(model) + (f"; {describe_weights(cfg.model.weights)}" if cfg.model.weights else "")
        loss = resolve_loss(cfg.model, model)
        strategy.setup_module(model)
        optimizer = build_optimizer(cfg.optim, strategy.unwrapped_model, fused=strategy.wants_fused_optimizer)
        total_steps = planned_total_steps(cfg, data.train.steps_per_epoch)
        strategy.setup_optimizer(optimizer, build_scheduler(cfg.optim, optimizer, total_steps))
        # From here on each rank draws its own random numbers (dropout, augmentation).
        seed_everything(cfg.train.seed + dist_env.global_rank)
        checkpointer = Checkpointer(cfg, dist_env, strategy, run)
        tracker = build_tracker(cfg, dist_env)
        trainer = cls(cfg, groups, arithmetic, spec, data, strategy, checkpointer, tracker, console, loss)
        trainer.model_summary = summary
        trainer.metrics = dict(parts.metrics)
        return trainer

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
        """Train to the planned step (or a stop); returns the summary. Every rank runs it in lockstep."""
        total_steps = planned_total_steps(self.cfg, self.data.train.steps_per_epoch)
        self._announce(total_steps)
        from .supervise.signals import StopAgreement

        self.stop_agreement = StopAgreement(self.groups.control)
        self._resume()
        rng_state = self.rng.state_dict()
        self.tracker.start(self.cfg, self.progress.optimizer_step)
        # A tracker may draw random numbers at start (W&B does for ids); a resumed run must continue from
        # exactly the restored state, as the straight run did.
        self.rng.load_state_dict(rng_state)

        start_time, start_samples = time.perf_counter(), self.progress.samples_seen
        cadence = _Cadence(self._new_window())
        bar = self.console.progress_bar(total=total_steps, initial=self.progress.optimizer_step)
        while self.progress.optimizer_step < total_steps:
            self._train_epoch(total_steps, cadence, bar)
        bar.close()
        self.watchdog.mark(self.progress.optimizer_step, "finish")
        self.stop_agreement.close()
        return self._finish(cadence, time.perf_counter() - start_time, start_samples)

    def _announce(self, total_steps: int) -> None:
        cfg, console, train_loader = self.cfg, self.console, self.data.train
        console.print(f"dist_train: {self.dist_env.describe()} strategy={self.strategy.name} precision={cfg.train.precision}")
        console.print(f"batch: {self.arithmetic.describe()}")
        if self.model_summary:
            console.print(f"model: {self.model_summary}")
        console.print(
            f"data: {self.data.num_train_samples} train samples -> {train_loader.steps_per_epoch} steps/epoch "
            f"({train_loader.dropped_per_epoch} samples/epoch dropped to keep global batches full); "
            f"{self.data.num_eval_samples} eval samples; {total_steps} optimizer steps planned"
        )
        for note in self.data.notes:
            console.print(f"data: {note}")

    def _train_epoch(self, total_steps: int, cadence: "_Cadence", bar: Any) -> None:
        """One pass of the train loader from its position: optimizer steps, each followed by its boundary."""
        train_loader = self.data.train
        train_loader.set_epoch(self.progress.epoch)
        self.strategy.train_mode(True)
        steps_before = self.progress.optimizer_step
        data_wait_start = time.perf_counter()
        self.watchdog.mark(self.progress.optimizer_step + 1, "data")
        for step_batches in train_loader:
            cadence.window.data_wait += time.perf_counter() - data_wait_start
            next_step = self.progress.optimizer_step + 1
            self._optimizer_step(step_batches, cadence.window, will_log=next_step % self.cfg.train.log_interval == 0 or next_step == total_steps)
            bar.update(1)
            epoch_done = self.progress.optimizer_step % train_loader.steps_per_epoch == 0
            if epoch_done:
                self.progress.epoch += 1
            if self._step_boundary(total_steps, epoch_done, cadence, bar):
                self._stop_here(bar)
            if self.progress.optimizer_step >= total_steps or epoch_done:
                break
            data_wait_start = time.perf_counter()
            self.watchdog.mark(self.progress.optimizer_step + 1, "data")
        if self.progress.optimizer_step == steps_before:
            raise RuntimeError(f"the training loader yielded no batch in epoch {self.progress.epoch}; its position is {train_loader.state_dict()}")

    def _step_boundary(self, total_steps: int, epoch_done: bool, cadence: "_Cadence", bar: Any) -> bool:
        """The cadence after an optimizer step: stop agreement, log, evaluation, checkpoint. Returns whether
        the run stops here (the same answer on every rank)."""
        cfg, step = self.cfg, self.progress.optimizer_step
        self.watchdog.steady = True
        # Every rank calls the agreement at every boundary (no short-circuit): it is a collective.
        agreed = self.stop_agreement.step(self.stop_requested)
        # A planned stop at the last step is the run's natural end (outputs written), not an interruption.
        stop = (step == cfg.train.stop_at_step and step < total_steps) or agreed
        save_for_time = False
        if step % cfg.train.log_interval == 0 or step == total_steps:
            self.watchdog.mark(step, "log")
            requested, save_for_time = self._log(cadence.window, bar)
            stop = stop or requested
            cadence.window = self._new_window()
        if (cfg.train.eval_interval and step % cfg.train.eval_interval == 0) or (epoch_done and not cfg.train.eval_interval):
            # The end of the run saves before its evaluation (see _finish): bad test data must not cost the training.
            if step < total_steps:
                cadence.eval_metrics, cadence.last_eval_step = self.evaluate(), step
                self.strategy.train_mode(True)
        if self.checkpointer.due(step, force=stop or save_for_time):
            self._save(cadence.window)
        self.checkpointer.poll()
        return stop

    def _stop_here(self, bar: Any) -> None:
        """The stop path: every rank has agreed to stop at this step and its checkpoint is written."""
        step = self.progress.optimizer_step
        bar.close()
        self.watchdog.mark(step, "finish")
        self.stop_agreement.close()
        self.checkpointer.wait()
        # Launchers kill the remaining ranks once one exits non-zero: close the main process's trackers
        # (W&B writes its last step at finish) before any rank may leave.
        self.tracker.finish()
        self.strategy.barrier()
        planned = step == self.cfg.train.stop_at_step and not self.stop_requested
        why = " (train.stop_at_step, a planned stop)" if planned else ""
        interrupted = TrainingInterrupted(f"stopped on request at optimizer step {step}{why}; checkpoint saved under {self.checkpointer.directory}")
        interrupted.save_seconds = self.save_seconds
        raise interrupted

    def _finish(self, cadence: "_Cadence", elapsed: float, start_samples: int) -> dict:
        """The end of the run: its checkpoint before the final evaluation (an error in evaluation, a bad label
        in the test split, must not lose the run), then model.pt and summary.json."""
        cfg = self.cfg
        if cfg.checkpoint.save_at_end and self.checkpointer.due(self.progress.optimizer_step, force=True):
            self._save(cadence.window)
        else:
            self._check_finite(cadence.window)
        self.checkpointer.wait()
        if cadence.last_eval_step != self.progress.optimizer_step:
            cadence.eval_metrics = self.evaluate()
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
            "eval": cadence.eval_metrics,
        }
        self._write_outputs(summary)
        return summary

    def _resume(self) -> None:
        plan = self.checkpointer.run.resume
        resumed = self.checkpointer.resume(plan, self.stateful())
        if resumed is None:
            if plan.kind == "auto":  # a run whose first attempt ended before its first checkpoint
                self.console.print(f"train.resume=auto: no checkpoint of run {self.checkpointer.run.run_id} yet; starting at optimizer step 0")
            return
        path, changes = resumed
        self._skipped_before = self.progress.skipped_steps
        self.console.print(f"resumed from {path} at optimizer step {self.progress.optimizer_step}, epoch {self.progress.epoch}")
        for line in changes:
            self.console.print(f"resume: {line}")
        if any(line.startswith(("optim.", "train.epochs", "train.max_steps")) for line in changes):
            # The checkpoint's optimizer and scheduler carry the old values (a LambdaLR restores its base LR).
            apply_hyperparameters(self.cfg.optim, self.strategy.optimizer, self.strategy.scheduler)
            self.console.print(f"resume: from optimizer step {self.progress.optimizer_step + 1} the LR is {self.strategy.optimizer.param_groups[0]['lr']:.6g}")

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        """The micro-batch's mean loss."""
        if self.custom_loss is not None:
            return self.custom_loss(outputs, batch)
        if isinstance(batch, dict):
            raise ConfigError("the data yields dict batches, which the tutorial losses cannot read; set model.loss or give the model a loss(outputs, batch) method")
        return task_loss(self.spec.task, outputs, batch[1])

    def _new_window(self) -> StepWindow:
        return StepWindow(self.strategy.device, self.progress.optimizer_step + 1)

    def _optimizer_step(self, step_batches: list, window: StepWindow, will_log: bool = True) -> None:
        strategy, device = self.strategy, self.strategy.device
        last = len(step_batches) - 1
        compute_start = time.perf_counter()
        sample_weight = self._sample_weight()
        step_loss: Any = None
        first_micro_batch = self.dist_env.global_rank * len(step_batches)
        self.watchdog.mark(self.progress.optimizer_step + 1, "forward/backward")
        for i, batch in enumerate(step_batches):
            batch = to_device(batch, device)
            self._seed_micro_batch(first_micro_batch + i)
            with strategy.accumulation_context(i == last):
                forward_start = time.perf_counter()
                with strategy.autocast():
                    outputs = self._forward(model_input(batch))
                loss = self.loss(outputs, batch)
                # Before the first collective of the step (DDP reduces in backward): a rank's own pace.
                window.forward += time.perf_counter() - forward_start
                strategy.backward(loss if sample_weight is None else loss * (batch_size(batch) * sample_weight), i == last)
            step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            self.progress.micro_step += 1
        self.watchdog.mark(self.progress.optimizer_step + 1, "optimizer")
        result = strategy.optimizer_step(compute_grad_norm=will_log)
        if not strategy.steps_scheduler:
            strategy.scheduler.step()
        self.progress.optimizer_step += 1
        self.progress.samples_seen += self.arithmetic.global_batch_size
        if self.skips is not None:
            self.skips.add(result.skipped)
        window.add_step(step_loss, len(step_batches), result.grad_norm, result.skipped if self.skips is not None else False)
        window.compute += time.perf_counter() - compute_start

    def _forward(self, inputs: Any) -> torch.Tensor:
        try:
            return self.strategy.model(inputs)
        except RuntimeError as e:
            if any(text in str(e) for text in ("shapes cannot be multiplied", "size mismatch", "Expected input", "expected input")):
                from .config import ConfigError

                shape = tuple(inputs.shape[1:]) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
                raise ConfigError(
                    f"model.name={self.cfg.model.name} does not fit the data: the data gives inputs of shape "
                    f"{shape} per sample and the model's forward failed with: {str(e).splitlines()[0]}; "
                    "set model.input_shape / model.kwargs to match the data (or another data.source)"
                ) from None
            raise

    def _seed_micro_batch(self, index: int) -> None:
        """Dropout (and any other draw in forward/backward) from a stream of its own for each micro-batch:
        a function of (seed, optimizer step, the micro-batch's place in the global batch). So a resumed run
        draws exactly what the straight run drew, and N ranks x k micro-batches draw the same masks as one
        process with N*k micro-batches of the same size."""
        seed = ((self.cfg.train.seed * 1_000_003 + self.progress.optimizer_step) * 65_537 + index) % (2**63)
        torch.default_generator.manual_seed(seed)
        if self.strategy.device.type == "cuda":
            torch.cuda.manual_seed(seed)  # this rank's device only

    def _sample_weight(self) -> Optional[float]:
        """With data.skip_bad_samples a micro-batch may be short. Its mean loss then weighs by the samples it
        kept, so the step's gradient is the mean over the samples actually used on all ranks: the loader's
        count of them, agreed over the ranks with its bad-sample verdict (no collective here). None means
        every micro-batch is full."""
        if not self.cfg.data.skip_bad_samples:
            return None
        # The strategy divides by the accumulation steps and DDP averages over ranks: undo both.
        return self.dist_env.world_size * self.arithmetic.grad_accum_steps / self.data.train.step_samples_kept

    def _agree(self, values: list[torch.Tensor]) -> list[list[float]]:
        """One all-gather of per-rank scalars (one host sync): row r holds rank r's values."""
        local = torch.stack([v.to(self.strategy.device, torch.float32).reshape(()) for v in values])
        return self.strategy.all_gather_rows(local).tolist()

    def _divergence(self, rows: list[list[float]], first_bad_col: int, skip_run_col: int) -> None:
        """Raise TrainingDiverged on every rank alike when any rank saw a non-finite value."""
        bad_steps = [int(r[first_bad_col]) for r in rows if r[first_bad_col] >= 0]
        longest_skip_run = int(max(r[skip_run_col] for r in rows))
        limit = self.cfg.train.max_consecutive_skipped_steps
        if bad_steps or longest_skip_run > limit:
            first = min(bad_steps) if bad_steps else -1
            self.tracker.log({"train/diverged_at_step": float(first if first >= 0 else self.progress.optimizer_step)}, step=self.progress.optimizer_step)
            message = divergence_message(first, longest_skip_run, limit, self.checkpointer.last_saved_step, str(self.checkpointer.directory))
            raise TrainingDiverged(message, first if first >= 0 else self.progress.optimizer_step)

    def _skip_values(self) -> list[torch.Tensor]:
        zero = torch.zeros((), device=self.strategy.device)
        return [self.skips.longest_run, self.skips.total] if self.skips is not None else [zero, zero]

    def _check_finite(self, window: StepWindow) -> None:
        """Collective, before anything is saved: no rank saw a non-finite loss or gradient norm, and every
        rank's parameters are finite. Raises TrainingDiverged everywhere otherwise."""
        not_finite = ~parameters_finite(self.strategy.local_parameters())
        rows = self._agree([window.first_bad_step(), *self._skip_values(), not_finite])
        self._count_skips(rows)
        if any(r[3] for r in rows) and all(r[0] < 0 for r in rows):
            rows = [[float(self.progress.optimizer_step), *r[1:]] for r in rows]  # the weights went bad in this step
        self._divergence(rows, first_bad_col=0, skip_run_col=1)

    def _count_skips(self, rows: list[list[float]]) -> None:
        if self.skips is not None:
            self.progress.skipped_steps = self._skipped_before + int(rows[0][2])  # the scaler decides alike on every rank

    def _save(self, window: StepWindow) -> None:
        """Collective: check, make every rank hold the same buffers, save."""
        self.watchdog.mark(self.progress.optimizer_step, "checkpoint")
        started = time.perf_counter()
        self._check_finite(window)
        self.strategy.sync_buffers()
        try:
            path = self.checkpointer.save(self.progress.optimizer_step, self.stateful())
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            storage = storage_error(e)
            if storage is None:
                raise
            # torch.save and DCP's writer threads lose the path: name the checkpoint directory instead.
            raise OSError(storage.errno, storage.strerror or "No space left on device", storage.filename or str(self.checkpointer.directory)) from None
        self.save_seconds = time.perf_counter() - started
        self.watchdog.last_checkpoint_step = self.progress.optimizer_step
        how = "writing in the background" if self.checkpointer.writing else "saved"
        self.console.print(f"checkpoint: {how} {path} ({self.save_seconds:.1f}s)")

    def _log(self, window: StepWindow, bar: Any) -> tuple[bool, bool]:
        """Collective at log steps: one all-gather carries every rank's loss totals, first non-finite step,
        fp16 skip counts, stop request and checkpoint clock. Returns (stop requested, time to save)."""
        rows = self._agree([
            window.loss_sum,
            torch.as_tensor(window.counted, dtype=torch.float32),
            window.first_bad_step(),
            *self._skip_values(),
            torch.tensor(float(self.stop_requested)),
            torch.tensor(float(self.checkpointer.seconds_due())),
            torch.tensor(window.data_wait + window.forward),  # this rank's own pace (straggler columns)
            torch.tensor(window.data_wait),
            torch.tensor(time.perf_counter() - window.start_time),
        ])
        self._count_skips([r[2:] for r in rows])
        self._divergence(rows, first_bad_col=2, skip_run_col=3)
        stop = any(r[5] for r in rows)
        save_for_time = any(r[6] for r in rows)
        if window.steps == 0:
            return stop, save_for_time
        self.stop_agreement.pace(max(r[9] for r in rows) / window.steps)  # the same value on every rank
        counted = sum(r[1] for r in rows)
        loss = sum(r[0] for r in rows) / counted if counted else float("nan")
        elapsed = time.perf_counter() - window.start_time
        metrics = {
            "train/loss": loss,
            "train/lr": self.strategy.optimizer.param_groups[0]["lr"],
            "train/grad_norm": float("nan") if window.grad_norm is None else float(window.grad_norm),
            "train/samples_per_second": window.steps * self.arithmetic.global_batch_size / max(elapsed, 1e-9),
            "train/data_wait_fraction": window.data_wait / max(window.data_wait + window.compute, 1e-9),
            # Fractional progress through the data (1.0 = one full epoch), continuous across epoch ends.
            "train/epoch": self.progress.optimizer_step / self.data.train.steps_per_epoch,
        }
        metrics.update(self._stragglers([r[7] for r in rows], [r[8] for r in rows], window.steps))
        if self.skips is not None:
            metrics["train/skipped_steps"] = float(self.progress.skipped_steps)
        if self.cfg.data.skip_bad_samples:
            metrics["train/skipped_samples"] = self.data.train.skipped_samples  # bad samples skipped so far, all ranks
        if torch.cuda.is_available() and self.strategy.device.type == "cuda":
            metrics["train/cuda_max_memory_mb"] = torch.cuda.max_memory_allocated(self.strategy.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.strategy.device)  # each log line reports its own window's peak
        # The epoch this step belonged to (progress.epoch has already moved on after an epoch's last step).
        step_epoch = (self.progress.optimizer_step - 1) // self.data.train.steps_per_epoch
        self.console.log_line(self.progress.optimizer_step, step_epoch, metrics, bar)
        self.tracker.log(metrics, step=self.progress.optimizer_step)
        return stop, save_for_time

    def _stragglers(self, paces: list[float], data_waits: list[float], steps: int) -> dict[str, float]:
        """The slowest rank by its own data + forward time this window, its skew against the median rank,
        and a warning once the same rank stays over train.straggler_warn_skew for 3 log steps in a row."""
        if len(paces) < 2:
            return {}
        slowest = max(range(len(paces)), key=lambda r: paces[r])
        median = sorted(paces)[len(paces) // 2 - (1 if len(paces) % 2 == 0 else 0)]
        skew = paces[slowest] / max(median, 1e-9)
        threshold = self.cfg.train.straggler_warn_skew
        rank, streak = self._straggler_streak
        streak = streak + 1 if (threshold and skew >= threshold and rank == slowest) else (1 if threshold and skew >= threshold else 0)
        self._straggler_streak = (slowest, streak)
        if streak == 3:
            self.console.print(
                f"warning: rank {slowest} is a straggler: its data + forward time is {skew:.1f}x the median rank's "
                f"for 3 log steps in a row ({paces[slowest] / max(steps, 1) * 1000:.0f} ms/step vs {median / max(steps, 1) * 1000:.0f}; "
                f"data wait {data_waits[slowest] / max(steps, 1) * 1000:.0f} ms/step): every rank waits for it at each step "
                "(train.straggler_warn_skew)"
            )
        return {
            "train/slowest_rank": float(slowest),
            "train/rank_skew": skew,
            "train/slowest_rank_ms_per_step": paces[slowest] / max(steps, 1) * 1000,
            "train/max_data_wait_ms_per_step": max(data_waits) / max(steps, 1) * 1000,
        }

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Exact over the whole eval split: sums are all-reduced, padding (weight 0) is not counted."""
        strategy = self.strategy
        strategy.sync_buffers()  # BatchNorm statistics: every rank evaluates rank 0's model, the one saved and exported
        strategy.train_mode(False)
        device = strategy.device
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.float64)
        count = torch.zeros((), device=device, dtype=torch.float64)
        extra = torch.zeros(len(self.metrics), device=device, dtype=torch.float64)
        for *batch, weights in self.data.eval:
            self.watchdog.mark(self.progress.optimizer_step, "eval")
            batch = to_device(batch[0] if len(batch) == 1 else tuple(batch), device)
            weights = weights.to(device, torch.float64)
            with strategy.autocast():
                outputs = strategy.eval_forward(model_input(batch))
            if self.custom_loss is not None or isinstance(batch, dict):
                # A loss of the model's own is a mean over the batch: take it over the real samples' outputs only
                # (the padding sits at the end of a rank's share), times their count. One forward per batch on
                # every rank, padded or not: sharded models gather their weights in it collectively.
                real = int(weights.sum().item())
                if real:
                    loss_sum += self.loss(select(outputs, real), select(batch, real)).double() * real
                    count += real
                continue
            outputs, targets = outputs.float(), batch[1]
            if self.spec.task == "classification":
                per_sample = F.cross_entropy(outputs, targets, reduction="none")
                correct += ((outputs.argmax(dim=1) == targets).double() * weights).sum()
            else:
                per_sample = F.mse_loss(outputs, targets.float(), reduction="none").flatten(1).mean(dim=1)
            loss_sum += (per_sample.double() * weights).sum()
            count += weights.sum()
            for i, metric in enumerate(self.metrics.values()):
                extra[i] += (metric(outputs, targets).detach().reshape(-1).double() * weights).sum()
        totals = strategy.all_reduce_sum(torch.cat([torch.stack([loss_sum, correct, count]), extra]))
        n = max(totals[2].item(), 1.0)
        metrics = {"eval/loss": totals[0].item() / n, "eval/samples": int(totals[2].item())}
        if self.custom_loss is None and self.spec.task == "classification":
            metrics["eval/accuracy"] = totals[1].item() / n
        elif self.custom_loss is None:
            metrics["eval/mse"] = metrics["eval/loss"]
        for i, name in enumerate(self.metrics):
            metrics[f"eval/{name}"] = totals[3 + i].item() / n
        self.console.print(f"eval at step {self.progress.optimizer_step}: " + "  ".join(f"{k.split('/')[1]}={v:.4f}" if isinstance(v, float) else f"{k.split('/')[1]}={v}" for k, v in metrics.items()))
        self.tracker.log(metrics, step=self.progress.optimizer_step)
        return metrics

    # ------------------------------------------------------------ outputs

    def _write_outputs(self, summary: dict) -> None:
        self.strategy.sync_buffers()
        state = self.strategy.full_model_state_dict()  # collective: every rank takes part; complete on the main process
        if self.dist_env.is_main:
            out = Path(self.cfg.output_dir)
            # The tutorial's own format: model.load_state_dict(torch.load("model.pt")). Atomic: a full disk
            # leaves the previous file (or none), never a truncated one.
            atomic_write(out / "model.pt", lambda f: torch.save(state, f))
            atomic_write(out / "summary.json", json.dumps(summary, indent=2))
        self.strategy.barrier()

    def close(self) -> None:
        self.watchdog.mark(self.progress.optimizer_step, "finish")
        self.tracker.finish()
        self.strategy.teardown()


@dataclass
class _Cadence:
    """What the step boundaries carry from one to the next: the open log window and the latest evaluation."""

    window: StepWindow
    eval_metrics: dict = field(default_factory=dict)
    last_eval_step: int = -1


def planned_total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """train.epochs x steps per epoch, cut at train.max_steps; train.epochs=0 means max_steps alone decides."""
    by_epochs = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is None:
        return by_epochs
    if cfg.train.epochs <= 0:
        return cfg.train.max_steps
    return min(by_epochs, cfg.train.max_steps)
