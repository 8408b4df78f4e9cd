"""Under torchrun: Hugging Face's published DeepSpeed JSONs trained by tests/test_deepspeed_json.py, in one
process pair (each DeepSpeed process spends ~20 s importing before its first step).

usage: ds_json_runs.py OUT_DIR ZERO2_JSON ZERO3_JSON

Each config goes through what `dist-train train` does with it first (reconcile_deepspeed_json: the JSON's
optimizer and schedule folded into the config), then a fresh Trainer in the same gloo group:
  zero2   ZeRO-2, stopped at step 6 (as a preemption would) and resumed with train.resume=auto to 12
  zero3   ZeRO-3, 12 steps straight
Each leaves its usual outputs (model.pt, summary.json, metrics.jsonl, checkpoints) under OUT_DIR/<run>; rank 0
writes OUT_DIR/results.json (the lines each reconciliation printed, where each fit started and stopped).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dist_train.config import config_from_dict, explicit_keys, raw_config
from dist_train.config.deepspeed_json import reconcile_deepspeed_json
from dist_train.distributed.environment import detect_environment
from dist_train.distributed.groups import GroupNeeds, ProcessGroups
from dist_train.trainer import Trainer, TrainingInterrupted

REPO = Path(__file__).resolve().parents[2]
# The preset's own optimizer (sgd) is made to agree; the schedule is left to the JSON.
COMMON = ["data.source=digits", "strategy.name=deepspeed", "optim.name=adamw", "optim.lr=0.002", "optim.warmup_steps=5",
          "train.global_batch_size=64", "train.micro_batch_size=16", "train.max_steps=12", "train.log_interval=1", "train.progress_bar=false"]  # fmt: skip


def fit(out: Path, name: str, overrides: list[str], groups: ProcessGroups) -> dict:
    raw = raw_config(REPO / "configs" / "mlp_digits.yaml", [*COMMON, f"output_dir={out / name}", *overrides])
    cfg = config_from_dict(raw)
    lines = reconcile_deepspeed_json(cfg, explicit_keys(raw), groups.dist_env.world_size)
    trainer = Trainer.build(cfg, groups)
    result: dict = {"lines": lines, "optim": cfg.to_dict()["optim"]}
    try:
        result["summary"] = trainer.fit()
    except TrainingInterrupted:
        result["interrupted_at"] = trainer.progress.optimizer_step
    finally:
        trainer.close()
    return result


def main() -> None:
    out, zero2, zero3 = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    groups = ProcessGroups.start(detect_environment(), GroupNeeds(alone=True, background_checkpoint=True), 120)
    results: dict = {}
    try:
        results["zero2_stopped"] = fit(out, "zero2", [f"strategy.deepspeed.config={zero2}", "train.stop_at_step=6"], groups)
        results["zero2_resumed"] = fit(out, "zero2", [f"strategy.deepspeed.config={zero2}", "train.resume=auto"], groups)
        results["zero3"] = fit(out, "zero3", [f"strategy.deepspeed.config={zero3}"], groups)
    finally:
        groups.teardown()
    if groups.dist_env.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
