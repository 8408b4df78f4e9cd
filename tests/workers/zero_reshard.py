"""Under torchrun (or plainly for 1 process): the ZeRO-resharding scenarios of tests/test_zero_reshard.py.

usage: zero_reshard.py PHASE OUT_DIR

  save   (2 processes) trains the source runs: ZeRO-1 (SGD with momentum), ZeRO-2, ZeRO-3, ZeRO-2 under bf16,
         DDP and FSDP2 (Adam), 6 steps each with a checkpoint at step 3, recording at step 3 what the
         strategy held (truth.pt: what was saved) and every step's loss (the reference continuation);
         then resumes across strategies on 2 processes: ZeRO-2 -> DDP, ZeRO-3 -> FSDP2, DDP -> ZeRO-3,
         FSDP2 -> ZeRO-1, and ZeRO-2 -> ZeRO-2 (DeepSpeed's own loader)
  one    (1 process) resumes 2 -> 1: each ZeRO stage under itself, ZeRO-2 under DDP (the other path to the
         same state), DDP under ZeRO-2; pins the DeepSpeed behaviours zero_bridge.py works around; trains a
         1-process ZeRO-3 source run (zero3_one) for the 1 -> 2 and 1 -> 3 resumes of the CLI test
  four   (4 processes) resumes 2 -> 4: ZeRO-2 and ZeRO-3 (a micro batch of 6: 48 = 6 x 4 x 2); pins
         ZeRO-3's full setter on a parameter the world size does not divide

Every resume goes through dist_train.verify_resume.record_run, the code `dist-train verify-resume` runs:
OUT/<scenario>/result.json (state report, losses) and loaded_state.pt (what the strategy held before its first
step). The main process writes OUT/<phase>.json with what else the phase observed.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch

from dist_train.checkpoint import read_meta
from dist_train.config import load_config
from dist_train.distributed.environment import detect_environment
from dist_train.distributed.groups import GroupNeeds, ProcessGroups
from dist_train.trainer import Trainer
from dist_train.verify_resume import fitting_micro_batch, record_run, worker_config

REPO = Path(__file__).resolve().parents[2]
# 48 = micro 8 x 2 ranks x 3 accumulation steps (1 rank: x 6; 3 ranks: x 2; 4 ranks: micro 6 x 2); 29 steps/epoch.
# Adam with a warmup + cosine schedule, so moments, step counts and the LR position all matter; no clipping, so
# ZeRO and DDP on one process compute the same step (tests/test_zero_reshard.py relies on it).
COMMON = [
    "data.source=digits", "train.global_batch_size=48", "train.micro_batch_size=8", "optim.name=adam", "optim.lr=0.002",
    "optim.schedule=cosine", "optim.warmup_steps=2", "train.max_steps=6", "train.log_interval=1", "train.progress_bar=false",
    "checkpoint.interval_steps=3", "checkpoint.save_at_end=false",
]  # fmt: skip
SAVED_STEP = 3
STEPS_AFTER = 3


def deepspeed(stage: int) -> list[str]:
    return ["strategy.name=deepspeed", f"strategy.deepspeed.zero_stage={stage}", f"strategy.deepspeed.config={REPO}/configs/deepspeed/zero{stage}.json"]


SOURCES = {
    "zero1": [*deepspeed(1), "optim.name=sgd", "optim.momentum=0.9", "optim.lr=0.05"],
    "zero2": deepspeed(2),
    "zero3": deepspeed(3),
    "zero2_bf16": [*deepspeed(2), "train.precision=bf16"],
    "ddp": ["strategy.name=ddp"],
    "fsdp2": ["strategy.name=fsdp2"],
}


class Recorder:
    """The source run's tracker: each step's loss, and at the saved step what the strategy held (collective)."""

    name = key = "recorder"

    def __init__(self, trainer: Trainer, truth: Path) -> None:
        self.trainer, self.truth, self.losses = trainer, truth, {}

    def start(self, cfg, step):
        pass

    def log(self, metrics, step):
        if "train/loss" in metrics:
            self.losses[step] = metrics["train/loss"]
        if step == SAVED_STEP:  # logged before the checkpoint of this step is written: what it will hold
            model, optimizer = self.trainer.strategy.full_training_state()
            if self.trainer.dist_env.is_main:
                torch.save({"model": model, "optimizer": optimizer}, self.truth)

    def finish(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def train_source(out: Path, name: str, groups, extra: tuple[str, ...] = ()) -> dict:
    start = time.perf_counter()
    run = out / name
    cfg = load_config(REPO / "configs" / "mlp_digits.yaml", [*COMMON, *SOURCES[name.removesuffix("_one")], f"output_dir={run}", *extra])
    trainer = Trainer.build(cfg, groups)
    if groups.dist_env.is_main:
        run.mkdir(parents=True, exist_ok=True)
    trainer.tracker = recorder = Recorder(trainer, run / "truth.pt")
    try:
        trainer.fit()
    finally:
        trainer.close()
    return {"losses": recorder.losses, "seconds": time.perf_counter() - start}


def resume(out: Path, source: str, name: str, groups, overrides: tuple[str, ...] = ()) -> dict:
    checkpoint = out / source / "checkpoints" / f"step-{SAVED_STEP:08d}"
    meta = read_meta(checkpoint)
    start = time.perf_counter()
    cfg = worker_config(checkpoint, meta, list(overrides), STEPS_AFTER, out / name / "run", groups.dist_env.world_size)
    return {**record_run(cfg, groups, checkpoint, meta, out / name, keep_state=True), "seconds": time.perf_counter() - start}


def phase_save(out: Path, groups) -> dict:
    found = {name: train_source(out, name, groups) for name in SOURCES}
    found["zero2_as_ddp_2"] = resume(out, "zero2", "zero2_as_ddp_2", groups, ("strategy.name=ddp",))
    found["zero3_as_fsdp2_2"] = resume(out, "zero3", "zero3_as_fsdp2_2", groups, ("strategy.name=fsdp2",))
    found["ddp_as_zero3_2"] = resume(out, "ddp", "ddp_as_zero3_2", groups, tuple(deepspeed(3)))
    found["fsdp2_as_zero1_2"] = resume(out, "fsdp2", "fsdp2_as_zero1_2", groups, tuple(deepspeed(1)))
    found["zero2_2"] = resume(out, "zero2", "zero2_2", groups)
    return found


def phase_one(out: Path, groups) -> dict:
    found = {f"{stage}_1": resume(out, stage, f"{stage}_1", groups) for stage in ("zero1", "zero2", "zero3", "zero2_bf16")}
    found["zero2_as_ddp_1"] = resume(out, "zero2", "zero2_as_ddp_1", groups, ("strategy.name=ddp",))
    found["ddp_as_zero2_1"] = resume(out, "ddp", "ddp_as_zero2_1", groups, tuple(deepspeed(2)))
    found["pins"] = pin_deepspeed_behaviours(out, groups)
    found["zero3_one"] = train_source(out, "zero3_one", groups)
    return found


def phase_four(out: Path, groups) -> dict:
    found = {f"{stage}_4": resume(out, stage, f"{stage}_4", groups) for stage in ("zero2", "zero3")}
    found["pins_four"] = pin_zero3_full_setter(out, groups)
    return found


# ---------------------------------------------------------------- DeepSpeed behaviours zero_bridge.py relies on


def _fresh_engine(out: Path, name: str, stage: int, groups) -> Trainer:
    micro = f"train.micro_batch_size={fitting_micro_batch(48, 8, groups.dist_env.world_size)}"
    cfg = load_config(REPO / "configs" / "mlp_digits.yaml", [*COMMON, *deepspeed(stage), f"output_dir={out / name}", micro])
    return Trainer.build(cfg, groups)


def _raised(action) -> str:
    try:
        action()
    except Exception as e:  # what DeepSpeed raises is the observation
        return f"{type(e).__name__}: {e}"
    return ""


def pin_deepspeed_behaviours(out: Path, groups) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param, safe_set_full_optimizer_state

    pins = {}
    for stage in (2, 3):
        trainer = _fresh_engine(out, f"pin_fresh{stage}", stage, groups)
        try:
            engine = trainer.strategy.engine
            name, param = next(iter(engine.module.named_parameters()))
            shape = getattr(param, "ds_shape", param.shape)
            # DeepSpeed creates its optimizer state at the first step (#5104): nothing to set before it.
            pins[f"set_state_before_first_step_zero{stage}"] = _raised(lambda: safe_set_full_optimizer_state(param, torch.zeros(shape), "exp_avg"))
            if stage == 2:
                # safe_set_full_fp32_param writes the fp32 master only; the module keeps computing with the old weight.
                before = param.detach().clone()
                new = torch.full(shape, 0.25)
                safe_set_full_fp32_param(param, new)
                pins["set_master_leaves_module_weight"] = bool(torch.equal(param.detach(), before) and torch.equal(safe_get_full_fp32_param(param), new))
                # DeepSpeed's own loader refuses partitions of another data-parallel size (#3810).
                saved_by_two = out / "zero2" / "checkpoints" / f"step-{SAVED_STEP:08d}"
                pins["own_loader_other_world_size"] = _raised(lambda: engine.load_checkpoint(str(saved_by_two), tag="zero"))
        finally:
            trainer.close()
    pins["universal_conversion_of_sgd"] = _universal_conversion(out / "zero1" / "checkpoints" / f"step-{SAVED_STEP:08d}" / "zero", out / "universal")
    return pins


def pin_zero3_full_setter(out: Path, groups) -> dict:
    """ZeRO-3's safe_set_full_fp32_param on a parameter whose size the world size does not divide (the last
    layer's 10 biases over 4 ranks: pieces of 3): what each rank observes."""
    import torch.distributed as dist
    from deepspeed.utils import safe_set_full_fp32_param

    trainer = _fresh_engine(out, "pin_fresh3_4", 3, groups)
    try:
        param = dict(trainer.strategy.engine.module.named_parameters())["linear_relu_stack.4.bias"]
        seen = _raised(lambda: safe_set_full_fp32_param(param, torch.zeros(10)))
    finally:
        trainer.close()
    by_rank = [None] * groups.dist_env.world_size
    dist.all_gather_object(by_rank, seen)
    return {"set_master_zero3_uneven_by_rank": by_rank}


def _universal_conversion(zero_dir: Path, target: Path) -> str:
    """ds_to_universal on a ZeRO checkpoint of SGD with momentum (in this process: one worker each)."""
    from deepspeed.checkpoint import ds_to_universal

    argv = ["ds_to_universal", "--input_folder", str(zero_dir), "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
    saved_argv, sys.argv = sys.argv, argv
    try:
        args = ds_to_universal.parse_arguments()
    finally:
        sys.argv = saved_argv
    with contextlib.redirect_stdout(io.StringIO()):
        return _raised(lambda: ds_to_universal.main(args))


PHASES = {"save": phase_save, "one": phase_one, "four": phase_four}


def main() -> None:
    phase, out = sys.argv[1], Path(sys.argv[2])
    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env, GroupNeeds(alone=True, background_checkpoint=True), 180)
    start = time.perf_counter()
    try:
        found = PHASES[phase](out, groups)
        found[f"{phase}_seconds"] = time.perf_counter() - start  # the scenarios, without the start-up
    finally:
        groups.teardown()
    if dist_env.is_main:
        (out / f"{phase}.json").write_text(json.dumps(found, indent=1, default=str))


if __name__ == "__main__":
    main()
