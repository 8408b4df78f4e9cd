"""Under torchrun: the streaming loader of each rank, with DataLoader workers, over prepared shards.

Writes OUT/rank-R.json with the sample keys of every micro-batch of two epochs, of a rerun, of a run
stopped mid-epoch and resumed with another number of workers, and this rank's eval sums.
Usage: torchrun --nproc_per_node 2 stream_epochs.py SHARD_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dist_train.config import batch_arithmetic, load_config
from dist_train.data.streaming import build_streaming
from dist_train.distributed.environment import detect_environment
from dist_train.models import model_spec


def keys_of(steps) -> list[list[list[str]]]:
    return [[list(keys) for _, _, keys in step] for step in steps]


def main(shard_dir: str, out_dir: str) -> None:
    dist_env = detect_environment()

    def bundle(num_workers: int):
        cfg = load_config(None, [
            "model.name=mlp", "data.source=shards", f"data.path={shard_dir}", "train.seed=3",
            "train.global_batch_size=20", "train.micro_batch_size=5", "data.shuffle_window=16", f"data.num_workers={num_workers}",
        ])
        return build_streaming(cfg, model_spec(cfg.model), batch_arithmetic(cfg.train, dist_env.world_size), dist_env)

    record: dict = {"world_size": dist_env.world_size}
    data = bundle(num_workers=2)
    for epoch in (0, 1):
        data.train.set_epoch(epoch)
        record[f"epoch{epoch}"] = keys_of(data.train.iter_steps())
    rerun = bundle(num_workers=2)
    rerun.train.set_epoch(0)
    record["rerun_epoch0"] = keys_of(rerun.train.iter_steps())

    # Stop after 2 steps of epoch 1, resume from the JSON state (as trainer.json holds it) with 1 worker.
    first = bundle(num_workers=2)
    first.train.set_epoch(1)
    steps = first.train.iter_steps()
    record["resume_before"] = keys_of([next(steps), next(steps)])
    steps.close()
    record["state"] = json.loads(json.dumps(first.train.state_dict()))
    second = bundle(num_workers=1)
    second.train.load_state_dict(record["state"])
    second.train.set_epoch(1)  # same epoch: keeps the position
    record["resume_after"] = keys_of(second.train.iter_steps())

    batches, weight_sum, target_sum, input_sum = 0, 0.0, 0.0, 0.0
    for inputs, targets, weights in data.eval:
        batches += 1
        weight_sum += weights.sum().item()
        target_sum += (targets.double() * weights.double()).sum().item()
        input_sum += (inputs.double().flatten(1).sum(1) * weights.double()).sum().item()
    record["eval"] = {"batches": batches, "weights": weight_sum, "targets": target_sum, "inputs": input_sum}
    Path(out_dir, f"rank-{dist_env.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
