"""Under torchrun: build Trainers in-process for the core tests and write what they observed as JSON.

usage: core_train.py MODE OUT_JSON [overrides...]
  MODE=nosync   record, for every DDP gradient all-reduce, the micro-step it happened in
  MODE=models   train every tutorial preset briefly; record its logged train losses
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dist_train.config import load_config
from dist_train.distributed.environment import detect_environment
from dist_train.distributed.groups import GroupNeeds, ProcessGroups
from dist_train.observe.tracking import Tracker
from dist_train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


class RecordingTracker(Tracker):
    def __init__(self) -> None:
        self.history: list[tuple[int, dict]] = []

    def log(self, metrics, step):
        self.history.append((step, dict(metrics)))


def build(preset: str, overrides: list[str], groups) -> Trainer:
    cfg = load_config(REPO / "configs" / preset, overrides)
    return Trainer.build(cfg, groups)


def main() -> None:
    mode, out, *overrides = sys.argv[1:]
    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env, GroupNeeds(alone=True, background_checkpoint=True), 120)
    result: dict = {"rank": dist_env.global_rank}
    try:
        if mode == "nosync":
            trainer = build("mlp_digits.yaml", overrides, groups)
            calls: list[int] = []

            def counting_hook(state, bucket):
                calls.append(trainer.progress.micro_step)
                return default_hooks.allreduce_hook(state, bucket)

            trainer.strategy.model.register_comm_hook(None, counting_hook)
            trainer.fit()
            result.update(calls=calls, grad_accum_steps=trainer.arithmetic.grad_accum_steps, steps=trainer.progress.optimizer_step)
        elif mode == "models":
            presets = ["linear_regression.yaml", "two_layer_net.yaml", "mlp_digits.yaml", "cnn_digits.yaml", "lenet_digits.yaml", "resnet18_digits.yaml"]
            for preset in presets:
                trainer = build(preset, [f"output_dir={out}.{preset}", *overrides], groups)
                tracker = RecordingTracker()
                trainer.tracker = tracker
                summary = trainer.fit()
                losses = [m["train/loss"] for _, m in tracker.history if "train/loss" in m]
                result[preset] = {"losses": losses, "eval": summary["eval"], "steps": summary["optimizer_steps"]}
        else:
            raise SystemExit(f"unknown mode {mode}")
    finally:
        groups.teardown()
    Path(f"{out}.rank{dist_env.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
