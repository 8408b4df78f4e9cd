"""Under torchrun: the streaming loader over an index of webdataset shards that dist_train did not write,
then a real training run on them, in one launch.

Writes OUT/rank-R.json: for 1 and for 2 DataLoader workers, per step of epochs 0 and 1, each micro-batch's
sample keys and the sha256 of its input and target tensors; the records decoded and bytes read per epoch;
a pass stopped after 2 steps of epoch 1 (its state as trainer.json holds it) and the rest of that epoch
resumed from it with the other worker count. Then trains configs/cnn_digits.yaml on the index
(dist_train.run.train, as `dist-train train` does) into OUT/run.
Usage: torchrun --nproc_per_node 2 foreign_scenarios.py INDEX OUT [train overrides ...]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from dist_train.config import batch_arithmetic, load_config
from dist_train.data.streaming import build_streaming
from dist_train.distributed.environment import detect_environment
from dist_train.models import model_spec

LOADER = ["model.name=cnn", "data.source=shards", "train.seed=5", "train.global_batch_size=64", "train.micro_batch_size=16", "data.shuffle_window=300"]


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


def steps_of(steps) -> list[list[dict]]:
    return [[{"keys": list(keys), "inputs": digest(x), "targets": digest(y)} for x, y, keys in step] for step in steps]


def main(index: str, out: str, *train_overrides: str) -> None:
    dist_env = detect_environment()

    def loader(num_workers: int):
        cfg = load_config(None, [*LOADER, f"data.path={index}", f"data.num_workers={num_workers}"])
        return build_streaming(cfg, model_spec(cfg.model), batch_arithmetic(cfg.train, dist_env.world_size), dist_env).train

    record: dict = {}
    for workers in (1, 2):
        train = loader(workers)
        for epoch in (0, 1):
            before = (train.decoded_records, train.bytes_read)
            train.set_epoch(epoch)
            record[f"w{workers}-epoch{epoch}"] = steps_of(train.iter_steps())
            record[f"w{workers}-epoch{epoch}-reads"] = [train.decoded_records - before[0], train.bytes_read - before[1]]

    first = loader(2)
    first.set_epoch(1)
    steps = first.iter_steps()
    record["resume_before"] = steps_of([next(steps), next(steps)])
    steps.close()
    record["state"] = json.loads(json.dumps(first.state_dict()))
    second = loader(1)
    second.load_state_dict(record["state"])
    second.set_epoch(1)
    record["resume_after"] = steps_of(second.iter_steps())
    Path(out, f"rank-{dist_env.global_rank}.json").write_text(json.dumps(record))

    from dist_train.run import train

    code = train("configs/cnn_digits.yaml", [f"data.path={index}", f"output_dir={Path(out) / 'run'}", "train.progress_bar=false", *train_overrides])
    sys.exit(code)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
