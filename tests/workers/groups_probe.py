"""Under torchrun (or alone): start the process groups a config asks for and report what exists.

usage: groups_probe.py OUT_JSON [overrides...]  -> OUT_JSON.rank{R}.json
  {"backend", "active", "control": backend or null, "checkpoint": backend or null, "groups_before_teardown",
   "initialized_after_teardown"}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from dist_train.config import load_config
from dist_train.distributed.environment import detect_environment
from dist_train.run import start_process_groups


def backend_of(group) -> str | None:
    return None if group is None else str(dist.get_backend(group))


def main() -> None:
    out, *overrides = sys.argv[1:]
    dist_env = detect_environment()
    cfg = load_config(None, overrides)
    groups = start_process_groups(cfg, dist_env)
    report = {
        "backend": groups.backend,
        "active": groups.active,
        "control": backend_of(groups.control),
        "checkpoint": backend_of(groups.checkpoint),
        "default": str(dist.get_backend()) if dist.is_initialized() else None,
    }
    groups.teardown()
    report["initialized_after_teardown"] = dist.is_initialized()
    Path(f"{out}.rank{dist_env.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
