"""Under torchrun with a gloo process group: what the streaming loader reads, and how ranks stop on bad data.

For each shard folder under ROOT (a clean one, and ones with a bad label, a bad-shape record or a NaN
input), one epoch with 2 DataLoader workers, an all-reduce per step standing in for DDP's gradient
all-reduce. Writes OUT/rank-R.json: per folder, the steps run, the records decoded and bytes read by this
rank, and the error (message, step, seconds from the failing step to the error) if any; and for the bad
folders again with data.skip_bad_samples=true, the steps and the samples skipped.
Usage: torchrun --nproc_per_node 2 stream_reads.py ROOT OUT_DIR NAME[,NAME...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dist_train.config import batch_arithmetic, load_config
from dist_train.data.shards import DataError
from dist_train.data.streaming import build_streaming
from dist_train.distributed.groups import ProcessGroups
from dist_train.distributed.environment import detect_environment
from dist_train.models import model_spec


def one_epoch(root: Path, name: str, groups, skip: bool) -> dict:
    dist_env = groups.dist_env
    # The loader needs only the model's input shape and task: a 6-feature classifier for the vector set.
    model = ["model.name=torch.nn:Identity", "model.input_shape=[6]", "model.task=classification"] if name == "nan" else ["model.name=mlp"]
    cfg = load_config(None, [
        *model, "data.source=shards", f"data.path={root / name}", "train.seed=3", "train.global_batch_size=20",
        "train.micro_batch_size=5", "data.shuffle_window=16", "data.num_workers=2", f"data.skip_bad_samples={str(skip).lower()}",
    ])
    data = build_streaming(cfg, model_spec(cfg.model), batch_arithmetic(cfg.train, dist_env.world_size), dist_env, groups.control)
    result: dict = {"steps": 0, "samples": 0, "kept": []}
    last_step_at = time.monotonic()
    try:
        for step in data.train:
            result["samples"] += sum(len(targets) for _, targets in step)
            result["kept"].append(data.train.step_samples_kept)
            dist.all_reduce(torch.ones(1))  # what DDP's backward does every step: a rank that left would hang it
            result["steps"] += 1
            last_step_at = time.monotonic()
    except DataError as e:
        result["error"] = str(e)
        result["error_seconds"] = time.monotonic() - last_step_at
    result.update(decoded_records=data.train.decoded_records, bytes_read=data.train.bytes_read, skipped=data.train.skipped_samples)
    return result


def main(root: str, out_dir: str, names: str) -> None:
    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env)
    record = {}
    for name in names.split(","):
        record[name] = one_epoch(Path(root), name, groups, skip=False)
        if name != "clean":
            record[f"{name}-skipped"] = one_epoch(Path(root), name, groups, skip=True)
    Path(out_dir, f"rank-{dist_env.global_rank}.json").write_text(json.dumps(record))
    groups.teardown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:4])
