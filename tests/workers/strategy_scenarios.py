"""Under torchrun: for each strategy, train straight through, and stopped + resumed in-process, writing each
run's outputs under OUT/<strategy>-straight and OUT/<strategy>-resumed (model.pt, checkpoints).

usage: strategy_scenarios.py OUT PRESET STOP_STEP STRATEGY[,STRATEGY...] [overrides ...]
STOP_STEP "none": the straight runs only.
One launch serves every strategy (process start-up and rendezvous dominate these short runs).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dist_train.config import load_config
from dist_train.distributed.environment import detect_environment
from dist_train.distributed.groups import GroupNeeds, ProcessGroups
from dist_train.trainer import Trainer, TrainingInterrupted

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # models and data given by import path from tests/ (tests.nets:...)


def run(preset: str, overrides: list[str], groups) -> None:
    trainer = Trainer.build(load_config(REPO / "configs" / preset, overrides), groups)
    try:
        trainer.fit()
    except TrainingInterrupted:
        pass
    finally:
        trainer.close()


def main() -> None:
    out, preset, stop_step, strategies, *overrides = sys.argv[1:]
    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env, GroupNeeds(alone=True, background_checkpoint=True), 120)
    try:
        for name in strategies.split(","):
            common = [*overrides, f"strategy.name={name}", "train.progress_bar=false"]
            run(preset, [*common, f"output_dir={out}/{name}-straight"], groups)
            if stop_step == "none":
                continue
            resumed = [*common, f"output_dir={out}/{name}-resumed", "train.resume=auto"]
            run(preset, [*resumed, f"train.stop_at_step={stop_step}"], groups)
            run(preset, resumed, groups)
    finally:
        groups.teardown()


if __name__ == "__main__":
    main()
