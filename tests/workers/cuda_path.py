"""Under torchrun: what each rank's strategy hands back as the full model at the end of training.

usage: cuda_path.py full_model OUT [overrides...]   -> OUT.rankK.json {"full_model_keys": [...]}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dist_train.config import load_config
from dist_train.distributed.environment import detect_environment
from dist_train.distributed.groups import GroupNeeds, ProcessGroups
from dist_train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    mode, out, *overrides = sys.argv[1:]
    if mode != "full_model":
        raise SystemExit(f"unknown mode {mode}")
    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env, GroupNeeds(alone=True, background_checkpoint=True), 120)
    try:
        trainer = Trainer.build(load_config(REPO / "configs" / "mlp_digits.yaml", ["data.source=digits", "train.progress_bar=false", *overrides]), groups)
        trainer.fit()  # writes model.pt from the main process's copy
        keys = sorted(trainer.strategy.full_model_state_dict())
        trainer.close()
    finally:
        groups.teardown()
    Path(f"{out}.rank{dist_env.global_rank}.json").write_text(json.dumps({"full_model_keys": keys}))


if __name__ == "__main__":
    main()
