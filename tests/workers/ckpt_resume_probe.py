"""Resume a checkpoint on this world size, record what was restored, then train on to the end.

usage: ckpt_resume_probe.py PROBE_DIR CONFIG [overrides ...]   (set train.resume=PATH in the overrides)

Writes PROBE_DIR/rank-K.pt per rank: the model and optimizer state right after loading, this rank's torch
RNG state, the data position, and this rank's inputs for every remaining step of the epoch (the loader
is rewound afterwards, so fit() trains exactly as a plain resume would).
"""

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from dist_train.config import load_config
from dist_train.distributed.environment import detect_environment
from dist_train.distributed.groups import GroupNeeds, ProcessGroups
from dist_train.trainer import Trainer


def main() -> None:
    probe_dir, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    cfg = load_config(config, overrides)
    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env, GroupNeeds(alone=True, background_checkpoint=True), 120)
    trainer = None
    try:
        trainer = Trainer.build(cfg, groups)
        path, _ = trainer.checkpointer.resume(cfg.train.resume, trainer.stateful())
        rng_after_load = torch.get_rng_state()
        model_state, optim_state = get_state_dict(trainer.strategy.unwrapped_model, trainer.strategy.optimizer)
        loader = trainer.data.train
        position = loader.state_dict()
        loader.set_epoch(trainer.progress.epoch)
        steps = [torch.cat([x for x, _ in step_batches]) for step_batches in loader]
        loader.load_state_dict(position)
        probe_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "checkpoint": str(path),
                # Sharded (FSDP2) values as full tensors: the probe compares whole parameters.
                "model": {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in model_state.items()},
                "optimizer_state": {k: {n: (t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in v.items()} for k, v in optim_state["state"].items()},
                "rng": rng_after_load,
                "epoch": trainer.progress.epoch,
                "optimizer_step": trainer.progress.optimizer_step,
                "position": position,
                "steps": steps,
            },
            probe_dir / f"rank-{dist_env.global_rank}.pt",
        )
        trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        groups.teardown()


if __name__ == "__main__":
    main()
