"""One process on one GPU: DeepSpeed ZeRO-2 and ZeRO-3 with fp16 and bf16, and ResNet-18 (BatchNorm) under
ZeRO-2 bf16, each a fresh Trainer in this process (DeepSpeed's import costs ~20 s, paid once).

usage: gpu_deepspeed.py OUT_DIR [overrides...]  -> OUT_DIR/results.json {scenario: {initial_eval, summary, losses} | {error}}

The process joins one world-size-1 group (NCCL on the GPU) that every engine then shares: DeepSpeed caches
its groups, so an engine that started and destroyed its own would leave the next one a dead group. A
scenario that raises is recorded as its error and the next one still runs.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from dist_train.config import load_config
from dist_train.distributed.environment import detect_environment
from dist_train.distributed.groups import GroupNeeds, ProcessGroups
from dist_train.observe.tracking import Tracker
from dist_train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
# 8 samples x 1 rank x 4 accumulation steps per optimizer step, in memory.
COMMON = ["data.source=digits", "train.global_batch_size=32", "train.micro_batch_size=8", "train.progress_bar=false",
          "train.log_interval=5", "checkpoint.save_at_end=false", "strategy.name=deepspeed"]
SCENARIOS = {
    **{
        f"zero{stage}_{precision}": ("mlp_digits.yaml", [f"strategy.deepspeed.zero_stage={stage}", f"strategy.deepspeed.config={REPO}/configs/deepspeed/zero{stage}.json",
                                                         f"train.precision={precision}", "train.max_steps=30"])
        for stage in (2, 3)
        for precision in ("fp16", "bf16")
    },
    "zero2_bf16_resnet18": ("resnet18_digits.yaml", ["strategy.deepspeed.zero_stage=2", "train.precision=bf16", "train.max_steps=10"]),
}


class LossRecorder(Tracker):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def log(self, metrics, step):
        if "train/loss" in metrics:
            self.losses.append(metrics["train/loss"])


def run(out: Path, name: str, preset: str, overrides: list[str], groups) -> dict:
    cfg = load_config(REPO / "configs" / preset, [*COMMON, f"output_dir={out / name}", *overrides])
    trainer = Trainer.build(cfg, groups)
    trainer.tracker = recorder = LossRecorder()
    try:
        initial = trainer.evaluate()
        summary = trainer.fit()
    finally:
        trainer.close()
    return {"initial_eval": initial, "summary": summary, "losses": recorder.losses}


def main() -> None:
    out = Path(sys.argv[1])
    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env, GroupNeeds(alone=True))
    results: dict = {}
    for name, (preset, overrides) in SCENARIOS.items():
        try:
            results[name] = run(out, name, preset, [*overrides, *sys.argv[2:]], groups)
        except Exception as e:  # recorded; the test names the scenario and shows this
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        print(f"{name}: {'error' if 'error' in results[name] else 'done'}", flush=True)
    groups.teardown()
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
