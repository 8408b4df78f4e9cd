"""What `dist-train train` and `dist-train eval` do: config -> env -> trainer, torn down in `finally`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .config import Config, config_from_dict, explicit_keys, raw_config, validate
from .files import atomic_write
from .env import backend_for, destroy_process_group, detect_environment, init_process_group, reconcile_launcher_settings
from .signals import finish_interrupted, resolve_signal, stop_on_signals


def _start(config_path: str, overrides: Sequence[str]) -> tuple[Config, object]:
    raw = raw_config(config_path, overrides)
    cfg = config_from_dict(raw)
    resolve_signal(cfg.train.preemption_signal)
    dist_env = detect_environment()
    # accelerate launch exports its config's settings; explicit dist_train keys must agree with them.
    for line in reconcile_launcher_settings(cfg, dist_env, explicit_keys(raw)):
        if dist_env.is_main:
            print(f"dist-train: {line}", flush=True)
    validate(cfg)
    if dist_env.restarted and dist_env.is_main:
        print(f"dist-train: restart {dist_env.restart_count} of this job ({dist_env.launcher}): continuing from the newest checkpoint of its run", flush=True)
    backend = backend_for(dist_env, cfg.strategy.backend)
    init_process_group(dist_env, backend, cfg.strategy.timeout_seconds)
    if not dist_env.is_main:  # rank 0's line comes from the trainer; one per other rank shows the group as launched
        print(f"dist_train: {dist_env.describe()}", flush=True)
    return cfg, dist_env


def train(config_path: str, overrides: Sequence[str]) -> int:
    from .guard import EXIT_DIVERGED, TrainingDiverged
    from .lineage import RunDirectory
    from .trainer import Trainer, TrainingInterrupted

    cfg, dist_env = _start(config_path, overrides)
    trainer = None
    run_dir = None
    try:
        # Before anything is written: lock output_dir and decide whose run this is (collective).
        run_dir = RunDirectory.open(cfg, dist_env)
        if dist_env.is_main:
            for note in run_dir.info.notes:
                print(f"dist-train: {note}", flush=True)
            atomic_write(Path(cfg.output_dir) / "config.yaml", cfg.to_yaml())
            print("resolved config:\n" + cfg.to_yaml(), flush=True)
        trainer = Trainer.build(cfg, dist_env, run_dir.info)
        with stop_on_signals(trainer, cfg.train.preemption_signal, announce=dist_env.is_main) as stop_signals:
            summary = trainer.fit()
        if dist_env.is_main:
            accuracy = summary["eval"].get("eval/accuracy")
            final = f"test accuracy {accuracy:.4f}" if accuracy is not None else f"test loss {summary['eval']['eval/loss']:.6f}"
            print(f"done: {summary['optimizer_steps']} optimizer steps, {final}; outputs in {cfg.output_dir}", flush=True)
        return 0
    except TrainingInterrupted as e:
        # Close the tracker before a Slurm requeue, which ends this job's processes.
        trainer.close()
        trainer = None
        return finish_interrupted(e, dist_env, preempted=stop_signals.preempted)
    except TrainingDiverged as e:
        # Every rank raised it at the same step (the check is collective); a restart must not loop into it.
        if dist_env.is_main:
            run_dir.record_divergence(e.step)
            print(f"dist-train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    finally:
        if trainer is not None:
            trainer.close()
        if run_dir is not None:
            run_dir.close()
        destroy_process_group()


def evaluate(config_path: str, overrides: Sequence[str]) -> int:
    from .trainer import Trainer

    checkpoint = [o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint=")]
    rest = [o for o in overrides if not o.startswith("checkpoint=")]
    if not checkpoint:
        from .config import ConfigError

        raise ConfigError("dist-train eval needs checkpoint=PATH (a step-N directory or an output_dir)")
    # Evaluation reports to stdout only: it must not append to (or open) the training run's trackers.
    no_tracking = ["tracking.wandb.enabled=false", "tracking.tensorboard.enabled=false"]
    cfg, dist_env = _start(config_path, [*rest, *no_tracking, f"train.resume={checkpoint[0]}"])
    trainer = None
    try:
        trainer = Trainer.build(cfg, dist_env)
        # Model (and optimizer) plus progress only: the data position and RNG do not matter to an evaluation,
        # so a checkpoint evaluates under any batch size or world size.
        resumed = trainer.checkpointer.resume(cfg.train.resume, {"progress": trainer.progress})
        if resumed is None:
            from .config import ConfigError

            raise ConfigError(f"checkpoint={checkpoint[0]}: no complete checkpoint found")
        path = resumed[0]
        metrics = trainer.evaluate()
        if dist_env.is_main:
            import json

            print(json.dumps({"checkpoint": str(path), "optimizer_step": trainer.progress.optimizer_step, **metrics}), flush=True)
        return 0
    finally:
        if trainer is not None:
            trainer.close()
        destroy_process_group()
