"""What `dist-train train` and `dist-train eval` do: config -> launch facts -> process groups -> trainer,
torn down in `finally`.

`train` is also the Python API's engine (`dist_train.api`): the CLI and a user's script run the same code.
The process groups are made here once (`start_process_groups`, through distributed/groups.py) and torn down
once at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import Config, ConfigError, config_from_dict, explicit_keys, raw_config, validate
from .config.accelerate import reconcile_launcher_settings
from .config.deepspeed_json import reconcile_deepspeed_json
from .distributed.environment import DistEnv, detect_environment
from .distributed.groups import ProcessGroups
from .files import atomic_write
from .supervise.signals import finish_interrupted, resolve_signal, stop_on_signals


def resolve_raw(config: Any, overrides: Sequence[str]) -> dict:
    """A preset path, a dict of sections, or None (defaults), with `section.key=value` overrides on top."""
    if isinstance(config, dict):
        raw = _merge(_copy(config), raw_config(None, overrides))
    else:
        raw = raw_config(config, overrides)
    return raw


def _copy(tree: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _merge(base: dict, top: dict) -> dict:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "kwargs":
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def start_process_groups(cfg: Config, dist_env: DistEnv) -> ProcessGroups:
    """The process groups a run of `cfg` needs (what its strategy asks for), made once, on every rank."""
    from .strategies import strategy_class

    needs = strategy_class(cfg.strategy.name).group_needs(cfg)
    return ProcessGroups.start(dist_env, needs, cfg.strategy.timeout_seconds)


def _start(config: Any, overrides: Sequence[str], raw: Optional[dict] = None) -> tuple[Config, ProcessGroups, list[str]]:
    """Config, process groups and the lines to show about the config; the groups are up on return."""
    raw = resolve_raw(config, overrides) if raw is None else raw
    cfg = config_from_dict(raw)
    resolve_signal(cfg.train.preemption_signal)
    dist_env = detect_environment()
    # accelerate launch exports its config's settings, a DeepSpeed JSON has its optimizer and schedule:
    # explicit dist_train keys must agree with them, the others take their values.
    explicit = explicit_keys(raw)
    taken = reconcile_launcher_settings(cfg, dist_env.accelerate, dist_env.world_size, explicit)
    taken += reconcile_deepspeed_json(cfg, explicit, dist_env.world_size)
    lines = [f"dist-train: {line}" for line in taken]
    validate(cfg)
    if dist_env.restarted:
        lines.append(f"dist-train: restart {dist_env.restart_count} of this job ({dist_env.launcher}): continuing from the newest checkpoint of its run")
    groups = start_process_groups(cfg, dist_env)
    if dist_env.is_local_main:  # about this machine: said once per node
        for note in groups.notes:
            print(f"dist-train: {note}", flush=True)
    if not dist_env.is_main:  # rank 0's line comes from the trainer; one per other rank shows the group as launched
        print(f"dist_train: {dist_env.describe()}", flush=True)
    return cfg, groups, lines


def config_changes(config: Any, cfg: Config) -> list[str]:
    """`key: preset value -> value` for each leaf the overrides or the launcher changed (the full resolved
    config goes to OUTPUT_DIR/config.yaml, not to the terminal)."""
    try:
        preset = config_from_dict(resolve_raw(config, ()))
    except ConfigError:  # the preset alone may be incomplete (an override completes it): compare to the defaults
        preset = Config()
    before, after = _flatten(preset.to_dict()), _flatten(cfg.to_dict())
    return [f"{key}: {before.get(key)!r} -> {value!r}" for key, value in after.items() if before.get(key) != value]


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "kwargs":
            flat.update(_flatten(value, prefix + key + "."))
        else:
            flat[prefix + key] = value
    return flat


class _StopRequest:
    """Holds a stop request until the trainer exists; then the signal handlers set the trainer's."""

    stop_requested = False


def train(config: Any, overrides: Sequence[str] = (), parts: Any = None, result: Optional[dict] = None) -> int:
    """Exit status (errors.py: 0 done or a planned stop, 3 diverged, 130 stopped by a signal with a checkpoint);
    `result` receives the summary."""
    from .supervise.guard import EXIT_DIVERGED, TrainingDiverged
    from .checkpoint.lineage import RunDirectory
    from .observe.plot import write_run_plot
    from .observe.runlog import RunLog, filter_known_warnings
    from .trainer import Trainer, TrainingInterrupted
    from .supervise.watchdog import start_watchdog

    filter_known_warnings()
    run_log = RunLog()
    trainer = None
    run_dir = None
    watchdog = None
    stop_signals = None
    groups: Optional[ProcessGroups] = None
    try:
        cfg, groups, lines = _start(config, overrides)
        dist_env = groups.dist_env
        # From here to the end: a signal during start-up becomes a stop at the first step boundary (with a
        # checkpoint), and one during the final save or tracker finish lets them complete instead of killing them.
        stop_signals = stop_on_signals(_StopRequest(), cfg.train.preemption_signal, announce=dist_env.is_main).__enter__()
        # A rank stuck anywhere from here on is named and the job exits to retry (watchdog.py).
        watchdog = start_watchdog(cfg.strategy, cfg.output_dir, groups)
        # Before anything is written: lock output_dir and decide whose run this is (collective).
        run_dir = RunDirectory.open(cfg, groups)
        run_log.attach(cfg.output_dir, dist_env)
        if dist_env.is_main:
            for line in lines:
                print(line, flush=True)
            for note in run_dir.info.notes:
                print(f"dist-train: {note}", flush=True)
            atomic_write(Path(cfg.output_dir) / "config.yaml", cfg.to_yaml())
        # Model, data, strategy and batch arithmetic are checked here, before the config is shown.
        trainer = Trainer.build(cfg, groups, run_dir.info, parts)
        trainer.stop_requested = stop_signals.target.stop_requested
        stop_signals.target = trainer
        if watchdog is not None:
            trainer.watchdog = watchdog
        if dist_env.is_main:
            name = config if isinstance(config, (str, Path)) else "config"
            changes = config_changes(config, cfg)
            where = f"full resolved config: {Path(cfg.output_dir) / 'config.yaml'}"
            print(f"config: {name}, " + (f"{len(changes)} key(s) changed ({where}):" if changes else f"as written ({where})"), flush=True)
            for change in changes:
                print(f"  {change}", flush=True)
        summary = trainer.fit()
        _ended_together(watchdog)
        if result is not None:
            result.update(summary)
        if dist_env.is_main:
            accuracy = summary["eval"].get("eval/accuracy")
            final = f"test accuracy {accuracy:.4f}" if accuracy is not None else f"test loss {summary['eval']['eval/loss']:.6f}"
            picture = write_run_plot(cfg.output_dir)
            print(f"done: {summary['optimizer_steps']} optimizer steps, {final}; outputs in {cfg.output_dir}" + (f" (curves: {picture})" if picture else ""), flush=True)
        return 0
    except TrainingInterrupted as e:
        _ended_together(watchdog)
        # Close the tracker before a Slurm requeue, which ends this job's processes.
        trainer.close()
        trainer = None
        return finish_interrupted(e, groups.dist_env, preempted=stop_signals.preempted, signalled=bool(stop_signals.received), timing=_stop_timing(stop_signals, e))
    except TrainingDiverged as e:
        _ended_together(watchdog)
        # Every rank raised it at the same step (the check is collective); a restart must not loop into it.
        if groups.dist_env.is_main:
            run_dir.record_divergence(e.step)
            print(f"dist-train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except BaseException as e:
        run_log.record_exception(e)  # the full traceback stays in logs/rank-K.log; the CLI prints one line
        raise
    finally:
        try:
            if trainer is not None:
                trainer.close()
            if watchdog is not None:
                watchdog.stop()  # joined before the process group and the interpreter go down
            if run_dir is not None:
                run_dir.close()
            if groups is not None:
                groups.teardown()
        finally:
            run_log.close()
            if stop_signals is not None:
                stop_signals.__exit__(None, None, None)


def _ended_together(watchdog: Any) -> None:
    """Every rank left fit() at the same point (done, an agreed stop, divergence): from here a peer that is
    gone has finished, not failed. Rank 0 may exit first and, where it hosts the rendezvous store (Slurm,
    mpirun, dist-train launch), take the store with it; this rank's watchdog must not call that a lost peer
    and exit 75 after a successful run."""
    if watchdog is not None:
        watchdog.run_ended = True


def _stop_timing(stop_signals: object, interrupted: BaseException) -> str:
    """How long the stop took, to hold against the launcher's grace period (torchrun: 30 s by default)."""
    import time

    save = getattr(interrupted, "save_seconds", None)
    parts = [f"the checkpoint took {save:.1f} s"] if save is not None else []
    received_at = getattr(stop_signals, "first_received_at", None)
    if received_at is not None:
        parts.append(f"{time.monotonic() - received_at:.1f} s after the signal arrived")
    return "; ".join(parts)


# ---------------------------------------------------------------- eval


def split_eval_args(args: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """`dist-train eval checkpoint=PATH [CONFIG] [overrides]` in any order: the one argument without '=' is CONFIG."""
    configs = [a for a in args if "=" not in a]
    if len(configs) > 1:
        raise ConfigError(f"dist-train eval takes at most one CONFIG file, got {' '.join(configs)}; give overrides as section.key=value")
    return (configs[0] if configs else None), [a for a in args if "=" in a]


def evaluate(config: Optional[str], overrides: Sequence[str]) -> int:
    """Evaluate a checkpoint (step-N directory or output_dir; any strategy, any world size that wrote it),
    a model.pt, or an exported state_dict. A checkpoint brings its own config (meta.json): CONFIG is not
    needed, and if given only its data section is used. A plain weights file needs a CONFIG (or a
    config.yaml beside it) for the model and the data."""
    import torch

    from .checkpoint import CheckpointError, find_checkpoint, read_meta
    from .observe.runlog import filter_known_warnings
    from .trainer import Trainer

    filter_known_warnings()
    spec = [o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint=")]
    rest = [o for o in overrides if not o.startswith("checkpoint=")]
    if not spec:
        raise ConfigError("dist-train eval needs checkpoint=PATH (a step-N directory, an output_dir, model.pt or an exported file)")
    target = Path(spec[0])
    step: Optional[int] = None
    if target.is_file():
        config_file = config or (target.parent / "config.yaml" if (target.parent / "config.yaml").is_file() else None)
        if config_file is None:
            raise ConfigError(f"checkpoint={target} is a weights file; also give the CONFIG it was trained with (dist-train eval checkpoint={target} CONFIG)")
        raw = raw_config(config_file, ())
        checkpoint_dir = None
        # model.pt of a finished run: its summary.json says how many steps the weights were trained for.
        try:
            import json

            step = int(json.loads((target.parent / "summary.json").read_text())["optimizer_steps"])
        except (OSError, ValueError, KeyError, TypeError):
            step = None
    else:
        checkpoint_dir = find_checkpoint(spec[0], target, key="checkpoint")
        if checkpoint_dir is None:
            raise CheckpointError(f"checkpoint={spec[0]}: no complete checkpoint found")
        meta = read_meta(checkpoint_dir)
        raw = _copy(meta.get("config") or {})
        step = int(meta["step"])
        if config is not None:
            raw["data"] = raw_config(config, ()).get("data", raw.get("data", {}))
    # Evaluation writes nothing: no trackers, no resume, no run directory; the weights are loaded in full
    # into a plain (DDP) model, so any strategy's checkpoint evaluates on any number of processes.
    raw = _merge(raw, raw_config(None, rest))
    raw.setdefault("tracking", {})
    raw["tracking"] = {"wandb": {**raw["tracking"].get("wandb", {}), "enabled": False}, "tensorboard": {"enabled": False}}
    raw.setdefault("train", {})["resume"] = None
    raw["strategy"] = {k: v for k, v in (raw.get("strategy") or {}).items() if k in ("backend", "timeout_seconds")}
    cfg, groups, lines = _start(None, (), raw=raw)
    dist_env = groups.dist_env
    # Any world size: the train split is not trained on, but its loader must still divide.
    cfg.train.global_batch_size = cfg.train.micro_batch_size * dist_env.world_size
    trainer = None
    try:
        trainer = Trainer.build(cfg, groups)
        state = _full_weights(checkpoint_dir, target)
        model = trainer.strategy.unwrapped_model
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"checkpoint={spec[0]} does not fit model.name={cfg.model.name}: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        trainer.progress.optimizer_step = step or 0
        if dist_env.is_main:
            for line in lines:
                print(line, flush=True)
            print(f"eval: loaded {checkpoint_dir or target} ({trainer.model_summary}) on {dist_env.world_size} process(es)", flush=True)
        with torch.no_grad():
            metrics = trainer.evaluate()
        if dist_env.is_main:
            import json

            print(json.dumps({"checkpoint": str(checkpoint_dir or target), "optimizer_step": step, **metrics}), flush=True)
        return 0
    finally:
        if trainer is not None:
            trainer.close()
        groups.teardown()


def _full_weights(checkpoint_dir: Optional[Path], weights_file: Path) -> dict:
    """The whole model state_dict with the tutorial's keys, read in this process."""
    import torch

    from .checkpoint import CheckpointError, read_meta

    if checkpoint_dir is None:
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint={weights_file} is not a state_dict file torch can load safely ({type(e).__name__})") from None
        if isinstance(state, dict) and "model_state_dict" in state:  # export --tutorial-dict
            state = state["model_state_dict"]
        return state
    from .export import load_full_checkpoint

    return load_full_checkpoint(checkpoint_dir, read_meta(checkpoint_dir))[0]
