"""Two ranks whose asynchronous save finished at different moments: rank 0 has already finalized it (its
own poll saw the future done), rank 1 still holds it pending. Both then call Checkpointer.wait() and an
all-reduce; the sum must be right and nothing may hang.

usage: async_wait_mismatch.py OUTPUT_DIR
"""

import sys
import time

import torch
import torch.distributed as dist

from dist_train.config import load_config
from dist_train.distributed.environment import detect_environment
from dist_train.distributed.groups import GroupNeeds, ProcessGroups
from dist_train.trainer import Trainer

SMALL = ["model.name=two_layer_net", "data.source=random", "data.num_samples=64", "train.global_batch_size=16",
         "train.micro_batch_size=8", "train.progress_bar=false", "checkpoint.async_save=true", "strategy.timeout_seconds=20"]


def main() -> None:
    cfg = load_config(None, [*SMALL, f"output_dir={sys.argv[1]}"])
    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env, GroupNeeds(alone=True, background_checkpoint=True), 20)
    trainer = Trainer.build(cfg, groups)
    try:
        checkpointer = trainer.checkpointer
        checkpointer.save(1, trainer.stateful())
        if dist_env.global_rank == 0:
            while not checkpointer._pending.future.done():
                time.sleep(0.01)
            checkpointer.poll()  # finalized here; rank 1 never polls
            assert checkpointer._pending is None
        checkpointer.wait()
        total = torch.tensor([float(dist_env.global_rank + 1)])
        dist.all_reduce(total)
        assert total.item() == 3.0, total
        print(f"rank {dist_env.global_rank}: wait and all_reduce agree", flush=True)
    finally:
        trainer.close()
        groups.teardown()


if __name__ == "__main__":
    main()
