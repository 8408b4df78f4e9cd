"""`dist-train verify-resume CHECKPOINT --nproc-per-node N [--strategy S]`: the proof that a checkpoint resumes.

  dist-train verify-resume runs/x/checkpoints/step-00000006 --nproc-per-node 1
  dist-train verify-resume runs/x --nproc-per-node 4 --strategy deepspeed strategy.deepspeed.zero_stage=3
  dist-train verify-resume runs/x --nproc-per-node 1 --reference-nproc-per-node 1 --reference-strategy ddp

1. The checkpoint is resumed on N processes under strategy S (default: the one that wrote it) exactly as
   `train.resume=PATH` resumes it. Before the first step, what the strategy holds (fp32 weights and buffers,
   every optimizer state tensor, step counts, hyperparameters, the LR schedule) is compared bit for bit with
   what the checkpoint holds, read independently in one process (a DeepSpeed checkpoint from its ZeRO
   partitions, never from its converted view); the first tensor that differs is named.
2. Both that run and a reference continuation (the same checkpoint resumed on --reference-nproc-per-node
   processes under --reference-strategy; by default the world size and strategy that wrote it) train
   --steps K steps, and each step's loss is compared: bit for bit when both runs have the same world size
   and strategy, else within --rtol (README, "What a resume promises", says what to expect where).
3. A table is printed; exit 0 when the state is identical and every loss agrees, 1 when not, 2 when the
   checkpoint cannot be resumed there at all (the run's own one-line error).

The runs write into a temporary directory that is removed; near the checkpoint only the converted view a
DeepSpeed checkpoint gets the first time it is loaded by parameter name appears (as a real resume makes it).
Each run is `python -m dist_train verify-resume CHECKPOINT --worker-out DIR ...` under torchrun (a plain
process for 1), so its errors reach the user as the CLI's one line.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

RESULT_FILE = "result.json"
STATE_FILE = "loaded_state.pt"
DEFAULT_STEPS = 5
DEFAULT_RTOL = 1e-5  # fp32 resumes that reduce in another order stayed within 9e-8 over 3 steps (tests/test_zero_reshard.py)
# Hyperparameters compared after a load; implementation flags (foreach, fused, ...) may differ between backends.
HYPERPARAMETERS = ("lr", "initial_lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov", "amsgrad", "maximize")


# ---------------------------------------------------------------- comparing state


@dataclass
class StateReport:
    """One row per part of the state: how many values were compared, how many were identical, the first that was not."""

    rows: list[dict] = field(default_factory=list)

    def add(self, part: str, pairs: list[tuple[str, Any, Any]]) -> None:
        identical, first = 0, None
        for name, saved, loaded in pairs:
            problem = difference(saved, loaded)
            if problem is None:
                identical += 1
            elif first is None:
                first = f"{name}: {problem}"
        self.rows.append({"part": part, "compared": len(pairs), "identical": identical, "first_difference": first})

    @property
    def identical(self) -> bool:
        return all(row["first_difference"] is None for row in self.rows)


def difference(saved: Any, loaded: Any) -> Optional[str]:
    """None when `loaded` is `saved` bit for bit; else what differs."""
    import torch

    if torch.is_tensor(saved) or torch.is_tensor(loaded):
        if not (torch.is_tensor(saved) and torch.is_tensor(loaded)):
            return f"{_show(saved)} in the checkpoint, {_show(loaded)} loaded"
        if saved.shape != loaded.shape or saved.dtype != loaded.dtype:
            return f"{saved.dtype}{list(saved.shape)} in the checkpoint, {loaded.dtype}{list(loaded.shape)} loaded"
        if torch.equal(saved, loaded):
            return None
        if saved.is_floating_point():
            return f"max |difference| {(saved.double() - loaded.double()).abs().max().item():.3g}"
        return "values differ"
    if isinstance(saved, (list, tuple)) and isinstance(loaded, (list, tuple)):
        saved, loaded = list(saved), list(loaded)
    return None if saved == loaded else f"{_show(saved)} in the checkpoint, {_show(loaded)} loaded"


def _show(value: Any) -> str:
    if value is None:
        return "missing"
    return f"tensor{list(value.shape)}" if hasattr(value, "shape") else repr(value)


def compare_state(saved: dict, loaded_model: dict, loaded_optimizer: dict) -> StateReport:
    """`saved`: the checkpoint in DCP's layout (export.load_full_state); the rest: Strategy.full_training_state()."""
    report = StateReport()
    model = saved["model"]
    report.add("model: fp32 weights, buffers", [(k, model[k], loaded_model.get(k)) for k in model] + [(k, None, loaded_model[k]) for k in loaded_model if k not in model])
    saved_state, loaded_state = saved.get("optimizer", {}).get("state", {}), loaded_optimizer.get("state", {})
    pairs = []
    for name in sorted(set(saved_state) | set(loaded_state)):
        a, b = saved_state.get(name, {}), loaded_state.get(name, {})
        pairs += [(f"{name}.{key}", a.get(key), b.get(key)) for key in list(a) + [k for k in b if k not in a]]
    report.add("optimizer state (moments, step counts)", pairs)
    groups = list(zip(saved.get("optimizer", {}).get("param_groups", []), loaded_optimizer.get("param_groups", [])))
    hyper = [(f"param_groups[{i}].{key}", a.get(key), b.get(key)) for i, (a, b) in enumerate(groups) for key in HYPERPARAMETERS if key in a or key in b]
    schedule_saved, schedule_loaded = saved.get("scheduler") or {}, loaded_optimizer.get("scheduler") or {}
    hyper += [(f"scheduler.{key}", schedule_saved.get(key), schedule_loaded.get(key)) for key in ("last_epoch", "_step_count", "base_lrs", "_last_lr") if key in schedule_saved]
    report.add("hyperparameters, LR schedule", hyper)
    return report


def saved_state(checkpoint: Path, meta: dict) -> dict:
    """What the checkpoint holds, read in this process from the files its strategy wrote (a DeepSpeed
    checkpoint from its ZeRO partitions, not from the view a load by name converted them into)."""
    from .export import load_full_state

    return load_full_state(checkpoint, meta, use_view=False)


# ---------------------------------------------------------------- comparing losses


def compare_losses(reference: dict[int, float], resumed: dict[int, float], rtol: float) -> tuple[list[dict], bool]:
    """Rows (step, reference, resumed, |difference|, relative) over the steps both ran; ok when every step
    agrees within `rtol` (0: bit for bit) and the resumed run ran every step the reference did."""
    rows, ok = [], bool(reference) and set(reference) <= set(resumed)
    for step in sorted(set(reference) | set(resumed)):
        a, b = reference.get(step), resumed.get(step)
        if a is None or b is None:
            rows.append({"step": step, "reference": a, "resumed": b, "abs": None, "rel": None})
            ok = ok and a is None  # a step the reference lacks is shown, not judged
            continue
        diff = abs(a - b)
        rel = diff / abs(a) if a else (0.0 if diff == 0 else math.inf)
        ok = ok and (a == b if rtol == 0 else rel <= rtol)
        rows.append({"step": step, "reference": a, "resumed": b, "abs": diff, "rel": rel})
    return rows, ok


# ---------------------------------------------------------------- one run (the worker, under torchrun)


def run_overrides(checkpoint: Path, step: int, steps: int, output_dir: Path) -> list[str]:
    """What makes a resume a verification: log every step, stop K steps on, save and track nothing else.
    The planned number of steps stays the checkpoint's (train.max_steps would re-plan the LR curve)."""
    return [
        f"train.resume={checkpoint}", f"train.stop_at_step={step + steps}", "train.log_interval=1", "train.progress_bar=false",
        "checkpoint.interval_steps=0", "checkpoint.interval_seconds=0", "checkpoint.async_save=false",
        "tracking.wandb.enabled=false", "tracking.tensorboard.enabled=false", f"output_dir={output_dir}",
    ]  # fmt: skip


def worker_config(checkpoint: Path, meta: dict, overrides: Sequence[str], steps: int, output_dir: Path, world_size: int) -> Any:
    """The checkpoint's own config with the user's overrides, a micro batch that divides over this world
    size (the largest not above the checkpoint's, when the user set none), and the verification's settings."""
    from .config import config_from_dict, raw_config, upgrade_saved_config
    from .run import _merge

    raw = _merge(upgrade_saved_config(json.loads(json.dumps(meta.get("config") or {}))), raw_config(None, list(overrides)))
    train = raw.setdefault("train", {})
    if not any(o.startswith("train.micro_batch_size=") for o in overrides):
        train["micro_batch_size"] = fitting_micro_batch(int(train["global_batch_size"]), int(train["micro_batch_size"]), world_size)
    raw = _merge(raw, raw_config(None, run_overrides(checkpoint, int(meta["step"]), steps, output_dir)))
    return config_from_dict(raw)


def fitting_micro_batch(global_batch: int, micro_batch: int, world_size: int) -> int:
    """The largest micro batch <= `micro_batch` such that micro x world_size divides the global batch
    (the global batch is fixed across a resume: the data position and the LR schedule count it)."""
    for candidate in range(min(micro_batch, global_batch // max(world_size, 1)), 0, -1):
        if global_batch % (candidate * world_size) == 0:
            return candidate
    return micro_batch  # batch_arithmetic refuses it with its own message


def record_run(cfg: Any, groups: Any, checkpoint: Path, meta: dict, out: Path, keep_state: bool = False) -> dict:
    """Collective: resume `cfg` (train.resume names the checkpoint), compare the loaded state with the saved
    one before the first step, train to train.stop_at_step logging every step. The main process writes
    OUT/result.json (and with `keep_state` OUT/loaded_state.pt) and returns the result."""
    from .trainer import Trainer, TrainingInterrupted

    trainer = Trainer.build(cfg, groups)
    recorder = _ResumeRecorder(trainer, checkpoint, meta, out, keep_state)
    trainer.tracker = recorder
    try:
        trainer.fit()
    except TrainingInterrupted:
        pass  # train.stop_at_step: the planned end of a verification
    finally:
        trainer.close()
    result = {
        "checkpoint": str(checkpoint),
        "start_step": recorder.start_step,
        "world_size": groups.dist_env.world_size,
        "strategy": cfg.strategy.name,
        "zero_stage": cfg.strategy.deepspeed.zero_stage if cfg.strategy.name == "deepspeed" else None,
        "micro_batch_size": cfg.train.micro_batch_size,
        "state": recorder.report.rows if recorder.report else None,
        "losses": {str(step): loss for step, loss in recorder.losses.items()},
    }
    if groups.dist_env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULT_FILE).write_text(json.dumps(result, indent=1))
    return result


class _ResumeRecorder:
    """The trainer's tracker during a verification (observe/tracking.py's interface). fit() calls `start`
    after the resume and before the first step: the one point where the loaded state can be seen untouched
    (the RNG is restored after it)."""

    name = key = "verify-resume"

    def __init__(self, trainer: Any, checkpoint: Path, meta: dict, out: Path, keep_state: bool) -> None:
        self.trainer, self.checkpoint, self.meta, self.out, self.keep_state = trainer, checkpoint, meta, out, keep_state
        self.start_step = -1
        self.losses: dict[int, float] = {}
        self.report: Optional[StateReport] = None

    def start(self, cfg: Any, step: int) -> None:
        self.start_step = step
        model, optimizer = self.trainer.strategy.full_training_state()  # collective
        if not self.trainer.dist_env.is_main:
            return
        self.report = compare_state(saved_state(self.checkpoint, self.meta), model, optimizer)
        if self.keep_state:
            import torch

            self.out.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model, "optimizer": optimizer, "step": step}, self.out / STATE_FILE)

    def log(self, metrics: dict, step: int) -> None:
        if "train/loss" in metrics:
            self.losses[step] = float(metrics["train/loss"])

    def finish(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def worker_main(out: Path, checkpoint: Path, steps: int, overrides: Sequence[str], keep_state: bool) -> int:
    """One side, on every rank of its job (`dist-train verify-resume CHECKPOINT --worker-out OUT ...`)."""
    from .checkpoint import read_meta
    from .distributed.environment import detect_environment
    from .observe.runlog import filter_known_warnings
    from .run import start_process_groups

    filter_known_warnings()
    meta = read_meta(checkpoint)
    dist_env = detect_environment()
    cfg = worker_config(checkpoint, meta, overrides, steps, out / "run", dist_env.world_size)
    groups = start_process_groups(cfg, dist_env)
    try:
        record_run(cfg, groups, checkpoint, meta, out, keep_state)
    finally:
        groups.teardown()
    return 0


# ---------------------------------------------------------------- the command


@dataclass
class Side:
    """One of the two runs: where and how the checkpoint is resumed."""

    label: str
    nproc: int
    strategy: str
    overrides: list[str]


def verify_resume_command(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, find_checkpoint, read_meta

    if args.worker_out:
        return worker_main(Path(args.worker_out), Path(args.checkpoint), args.steps, args.overrides, args.keep_state)
    checkpoint = find_checkpoint(args.checkpoint, Path(args.checkpoint), key="checkpoint")
    if checkpoint is None:
        raise CheckpointError(f"{args.checkpoint}: no complete checkpoint found")
    meta = read_meta(checkpoint)
    strategy = args.strategy or meta.get("strategy", "ddp")
    target = Side("resumed", args.nproc_per_node, strategy, [f"strategy.name={strategy}", *args.overrides])
    sides = [target]
    if not args.no_reference:
        reference_strategy = args.reference_strategy or meta.get("strategy", "ddp")
        reference_overrides = [f"strategy.name={reference_strategy}", *args.reference_overrides]
        sides.append(Side("reference", args.reference_nproc_per_node or int(meta["world_size"]), reference_strategy, reference_overrides))
    logs = Path(tempfile.mkdtemp(prefix="dist-train-verify-"))  # keeps a failed run's output, else removed
    work = logs / "runs"
    try:
        results = {}
        for side in sides:
            results[side.label] = _launch(side, checkpoint, args.steps, work / side.label, args.keep_state_in)
            if isinstance(results[side.label], int):
                return results[side.label]
        shutil.rmtree(logs, ignore_errors=True)
        return report(checkpoint, meta, sides, results, args.rtol)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _launch(side: Side, checkpoint: Path, steps: int, out: Path, keep_state_in: Optional[str]) -> Any:
    """Run one side as its own job; its result, or its exit status when it failed (its output is shown)."""
    worker = ["-m", "dist_train", "verify-resume", str(checkpoint), "--steps", str(steps), "--worker-out", str(out), *side.overrides]
    if keep_state_in:
        worker.append("--keep-state")
    if side.nproc == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(side.nproc), *worker]
    out.mkdir(parents=True, exist_ok=True)
    print(f"verify-resume: {side.label} run on {side.nproc} process(es), strategy.name={side.strategy} ...", flush=True)
    with open(out / "output.log", "w") as log:
        status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    output = (out / "output.log").read_text(errors="replace")
    if status != 0 or not (out / RESULT_FILE).is_file():
        said = [line for line in output.splitlines() if line.startswith("dist-train:")]
        raised = [line for line in output.splitlines() if re.search(r"\b\w+(Error|Exception): ", line)][-1:]
        kept = out.parent.parent / f"{side.label}-output.log"
        shutil.copy(out / "output.log", kept)  # the work directory is removed
        print("\n".join([*(said or raised), f"verify-resume: the {side.label} run failed (exit {status}); its output: {kept}"]), file=sys.stderr, flush=True)
        return status or 1
    for line in output.splitlines():
        if line.startswith("checkpoint: converted") or line.startswith("checkpoint: reading"):
            print(f"  {line}", flush=True)
    if keep_state_in:
        Path(keep_state_in).mkdir(parents=True, exist_ok=True)
        if (out / STATE_FILE).is_file():
            shutil.copy(out / STATE_FILE, Path(keep_state_in) / f"{side.label}-{STATE_FILE}")
        shutil.copy(out / RESULT_FILE, Path(keep_state_in) / f"{side.label}-{RESULT_FILE}")
    return json.loads((out / RESULT_FILE).read_text())


def _describe(result: dict) -> str:
    stage = f" ZeRO-{result['zero_stage']}" if result.get("zero_stage") else ""
    return f"{result['world_size']} process(es), strategy.name={result['strategy']}{stage}, micro batch {result['micro_batch_size']}"


def report(checkpoint: Path, meta: dict, sides: list[Side], results: dict, rtol: Optional[float]) -> int:
    """Print the table; 0 when everything agrees, 1 when not."""
    resumed = results["resumed"]
    stage = (meta.get("config") or {}).get("strategy", {}).get("deepspeed", {}).get("zero_stage") if meta.get("strategy") == "deepspeed" else None
    print(f"verify-resume: {checkpoint} (step {meta['step']}, written by {meta['world_size']} process(es), strategy.name={meta.get('strategy')}{f' ZeRO-{stage}' if stage else ''})")
    print(f"  resumed on {_describe(resumed)}")
    print(f"\n  {'state before the first step':<40} {'compared':>8} {'identical':>9}  first difference")
    for row in resumed["state"]:
        print(f"  {row['part']:<40} {row['compared']:>8} {row['identical']:>9}  {row['first_difference'] or '-'}")
    state_ok = all(row["first_difference"] is None for row in resumed["state"])
    losses_ok, summary = True, "no reference run"
    if "reference" in results:
        reference = results["reference"]
        same_run = (reference["world_size"], reference["strategy"], reference["zero_stage"]) == (resumed["world_size"], resumed["strategy"], resumed["zero_stage"])
        tolerance = 0.0 if same_run and rtol is None else (DEFAULT_RTOL if rtol is None else rtol)
        rows, losses_ok = compare_losses(_losses(reference), _losses(resumed), tolerance)
        print(f"\n  losses: resumed vs reference ({_describe(reference)}); {'bit for bit' if tolerance == 0 else f'rtol {tolerance:g}'}")
        print(f"  {'step':>6} {'reference':>20} {'resumed':>20} {'|difference|':>13} {'relative':>10}")
        for row in rows:
            cells = [f"{row[k]:>20.12g}" if row[k] is not None else f"{'-':>20}" for k in ("reference", "resumed")]
            diffs = [f"{row['abs']:>13.3g}" if row["abs"] is not None else f"{'-':>13}", f"{row['rel']:>10.3g}" if row["rel"] is not None else f"{'-':>10}"]
            print(f"  {row['step']:>6} {cells[0]} {cells[1]} {diffs[0]} {diffs[1]}")
        largest = max((r["rel"] for r in rows if r["rel"] is not None), default=0.0)
        summary = f"losses {'bit-identical' if largest == 0 else f'within {largest:.3g} relative'} over {len(rows)} steps"
    verdict = "OK" if state_ok and losses_ok else "MISMATCH"
    print(f"\nverify-resume: {verdict}: state {'bit-identical' if state_ok else 'differs'}; {summary}", flush=True)
    return 0 if state_ok and losses_ok else 1


def _losses(result: dict) -> dict[int, float]:
    return {int(step): loss for step, loss in result["losses"].items()}


def add_parser(sub: Any) -> None:
    verify = sub.add_parser(
        "verify-resume",
        help="prove that a checkpoint resumes on N processes under a strategy",
        description=__doc__.split("\n\n")[0] + " Loads it there, compares the loaded state with the saved one bit for bit, trains --steps "
        "steps and compares each loss with a reference continuation; prints a table. Exit 0: all agree; 1: they do not.",
    )
    verify.add_argument("checkpoint", help="a step-N checkpoint directory, or an output_dir (its newest checkpoint)")
    verify.add_argument("--nproc-per-node", type=int, default=1, help="processes to resume on (one node)")
    verify.add_argument("--strategy", choices=("ddp", "fsdp2", "deepspeed"), help="strategy to resume under (default: the checkpoint's)")
    verify.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps to train after the load")
    verify.add_argument("--reference-nproc-per-node", type=int, help="processes of the reference continuation (default: the checkpoint's world size)")
    verify.add_argument("--reference-strategy", choices=("ddp", "fsdp2", "deepspeed"), help="strategy of the reference continuation (default: the checkpoint's)")
    verify.add_argument("--reference-override", dest="reference_overrides", action="append", default=[], metavar="KEY=VALUE", help="an override for the reference run only (with --reference-strategy)")
    verify.add_argument("--no-reference", action="store_true", help="compare the state only; run no reference continuation")
    verify.add_argument("--rtol", type=float, help=f"relative loss tolerance (default: 0, bit for bit, when both runs have the same world size and strategy, else {DEFAULT_RTOL:g})")
    verify.add_argument("--keep-state-in", metavar="DIR", help=argparse.SUPPRESS)  # tests: the loaded state and results
    verify.add_argument("--worker-out", metavar="DIR", help=argparse.SUPPRESS)  # one side's job, started by the command
    verify.add_argument("--keep-state", action="store_true", help=argparse.SUPPRESS)
    verify.add_argument("overrides", nargs="*", help="section.key=value overrides for the resumed run, e.g. strategy.deepspeed.zero_stage=3")
