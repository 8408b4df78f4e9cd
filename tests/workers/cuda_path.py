"""Under torchrun: what each rank's strategy hands back as the full model at the end of training.

usage: cuda_path.py full_model OUT [overrides...]   -> OUT.rankK.json {"full_model_keys": [...]}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dist_train.config import load_config
from dist_train.env import backend_for, destroy_process_group, detect_environment, init_process_group
from dist_train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    mode, out, *overrides = sys.argv[1:]
    if mode != "full_model":
        raise SystemExit(f"unknown mode {mode}")
    dist_env = detect_environment()
    init_process_group(dist_env, backend_for(dist_env), 120)
    try:
        trainer = Trainer.build(load_config(REPO / "configs" / "mlp_digits.yaml", ["data.source=digits", "train.progress_bar=false", *overrides]), dist_env)
        trainer.fit()  # writes model.pt from the main process's copy
        keys = sorted(trainer.strategy.full_model_state_dict())
        trainer.close()
    finally:
        destroy_process_group()
    Path(f"{out}.rank{dist_env.global_rank}.json").write_text(json.dumps({"full_model_keys": keys}))


if __name__ == "__main__":
    main()
