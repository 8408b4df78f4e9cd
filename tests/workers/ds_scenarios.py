"""Under torchrun: every DeepSpeed scenario of tests/test_deepspeed.py in one process pair.

usage: ds_scenarios.py OUT_DIR

DeepSpeed's import and first engine cost ~20 s per process (it imports torch._inductor), so the runs share
one launch: each builds a fresh Trainer in the same gloo group. Every run leaves its usual outputs
(model.pt, summary.json, checkpoints) under OUT_DIR/<run>; rank 0 writes OUT_DIR/results.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from dist_train.config import load_config
from dist_train.distributed.environment import detect_environment
from dist_train.distributed.groups import GroupNeeds, ProcessGroups
from dist_train.observe.tracking import Tracker
from dist_train.trainer import Trainer, TrainingInterrupted

REPO = Path(__file__).resolve().parents[2]
# The in-memory digits (no prepared shards needed); 8 samples x 2 ranks x 2 accumulation steps; 44 steps per
# epoch, so every stop below is mid-epoch.
COMMON = ["data.source=digits", "train.global_batch_size=32", "train.micro_batch_size=8", "train.progress_bar=false", "train.log_interval=2"]
JSON = {stage: f"strategy.deepspeed.config={REPO}/configs/deepspeed/zero{stage}.json" for stage in (1, 2, 3)}


def deepspeed(stage: int) -> list[str]:
    return ["strategy.name=deepspeed", f"strategy.deepspeed.zero_stage={stage}", JSON[stage]]


class StartRecorder(Tracker):
    """The step the loop starts from (after any resume), the logged train losses and gradient norms."""

    def __init__(self) -> None:
        self.start_step: int = -1
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def start(self, cfg, step):
        self.start_step = step

    def log(self, metrics, step):
        if "train/loss" in metrics:
            self.losses.append(metrics["train/loss"])
            self.grad_norms.append(metrics["train/grad_norm"])


def fit(out: Path, name: str, overrides: list[str], groups, before_eval: bool = False) -> dict:
    cfg = load_config(REPO / "configs" / "mlp_digits.yaml", [*COMMON, f"output_dir={out / name}", *overrides])
    trainer = Trainer.build(cfg, groups)
    trainer.tracker = recorder = StartRecorder()
    result: dict = {}
    try:
        result["initial_eval"] = trainer.evaluate() if before_eval else None
        result["summary"] = trainer.fit()
    except TrainingInterrupted:
        result["interrupted_at"] = trainer.progress.optimizer_step
    finally:
        trainer.close()
    return {**result, "start_step": recorder.start_step, "losses": recorder.losses, "grad_norms": recorder.grad_norms}


def main() -> None:
    out = Path(sys.argv[1])
    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env, GroupNeeds(alone=True, background_checkpoint=True), 120)
    results: dict = {}
    try:
        # ZeRO 1/2/3 against DDP on the same samples (SGD with momentum: optimizer state is partitioned too;
        # the logged gradient norms are ~0.75-1, so clipping at 0.5 acts on every step).
        match = ["train.max_steps=4", "checkpoint.save_at_end=false", "train.grad_clip=0.5"]
        results["ddp"] = fit(out, "ddp", match, groups)
        for stage in (1, 2, 3):
            results[f"zero{stage}"] = fit(out, f"zero{stage}", [*match, *deepspeed(stage)], groups)
        # The optimizer defined by the JSON instead of dist_train's, its lr/momentum "auto"-filled from optim.*.
        json_optimizer = out / "zero2_sgd.json"
        if dist_env.is_main:
            config = json.loads((REPO / "configs/deepspeed/zero2.json").read_text())
            config["optimizer"] = {"type": "SGD", "params": {"lr": "auto", "momentum": "auto"}}
            json_optimizer.write_text(json.dumps(config))
        dist.barrier()  # the file exists before any rank reads it
        results["zero2_json_optimizer"] = fit(
            out, "zero2_json_optimizer", [*match, *deepspeed(2), f"strategy.deepspeed.config={json_optimizer}"], groups
        )

        # bf16 under ZeRO-2 (DeepSpeed's bf16 weights with fp32 masters).
        results["zero2_bf16"] = fit(
            out, "zero2_bf16", ["train.max_steps=12", "checkpoint.save_at_end=false", "train.precision=bf16", *deepspeed(2)], groups, before_eval=True
        )

        # Resume mid-epoch: uninterrupted 6 steps vs stopped at 3 (as a preemption would) + resumed. A cosine
        # schedule with warmup and SGD momentum make the scheduler and optimizer state matter.
        resume = ["train.max_steps=6", "optim.schedule=cosine", "optim.warmup_steps=2"]
        for stage in (2, 3):
            results[f"resume{stage}_full"] = fit(out, f"resume{stage}_full", [*resume, *deepspeed(stage)], groups)
            results[f"resume{stage}_stopped"] = fit(out, f"resume{stage}_split", [*resume, *deepspeed(stage), "train.stop_at_step=3"], groups)
            results[f"resume{stage}_resumed"] = fit(out, f"resume{stage}_split", [*resume, *deepspeed(stage), "train.resume=auto"], groups)
    finally:
        groups.teardown()
    if dist_env.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
