"""What `accelerate launch` exported from its config file, folded into dist_train's config before a run.

The launch facts (`distributed/environment.py`) only read the settings; deciding what they mean for the
config happens here, on the config side: a key the preset or an override set explicitly must agree with
accelerate's value (a disagreement is a ConfigError naming both, never a silent override either way), a
key left at its default takes accelerate's value, and every value taken is one line the run prints.
"""

from __future__ import annotations

from typing import Any, Optional

from .tree import Config, ConfigError, batch_arithmetic


def reconcile_launcher_settings(cfg: Config, settings: Any, world_size: int, explicit_keys: "set[str] | frozenset[str]") -> list[str]:
    """Fold `settings` (an AccelerateSettings, or None when accelerate did not start this process) into `cfg`
    in place; returns one line per value taken from it."""
    if settings is None:
        return []
    if settings.use_fsdp and settings.fsdp_version != 2:
        raise ConfigError(
            f"accelerate's config enables FSDP version {settings.fsdp_version or 1}, which dist_train does not run; set "
            "fsdp_version: 2 in it (configs/accelerate/fsdp2.yaml) for strategy.name=fsdp2"
        )
    taken: list[str] = []

    def take(key: str, accelerate_name: str, accelerate_value: Optional[object], section: Any, field: str) -> None:
        current = getattr(section, field)
        if accelerate_value is None or accelerate_value == current:
            return
        if key in explicit_keys:
            raise ConfigError(
                f"accelerate's config sets {accelerate_name}={accelerate_value} but the dist_train config sets "
                f"{key}={current}; make them agree (edit one of them) or drop {key} to take accelerate's value"
            )
        setattr(section, field, accelerate_value)
        taken.append(f"{key}={accelerate_value} (from accelerate's {accelerate_name})")

    if settings.mixed_precision not in (None, "fp32", "bf16", "fp16"):
        raise ConfigError(f"accelerate's mixed_precision={settings.mixed_precision} is not supported; use no, bf16 or fp16 (train.precision)")
    strategy = cfg.strategy
    take("train.precision", "mixed_precision", settings.mixed_precision, cfg.train, "precision")
    if settings.use_deepspeed:
        take("strategy.name", "distributed_type", "deepspeed", strategy, "name")
        take("strategy.deepspeed.zero_stage", "zero_stage", settings.zero_stage, strategy.deepspeed, "zero_stage")
        take("strategy.deepspeed.config", "deepspeed_config_file", settings.deepspeed_config_file, strategy.deepspeed, "config")
    if settings.use_fsdp:
        take("strategy.name", "distributed_type", "fsdp2", strategy, "name")
        take("strategy.fsdp2.reshard_after_forward", "fsdp_reshard_after_forward", settings.fsdp_reshard_after_forward, strategy.fsdp2, "reshard_after_forward")
        take("strategy.fsdp2.cpu_offload", "fsdp_offload_params", settings.fsdp_offload_params, strategy.fsdp2, "cpu_offload")
    take("train.grad_clip", "gradient_clipping", settings.grad_clip, cfg.train, "grad_clip")
    if settings.grad_accum_steps is not None:
        derived = batch_arithmetic(cfg.train, world_size).grad_accum_steps
        if settings.grad_accum_steps != derived:
            # Accumulation is derived from the global batch, so accelerate's value sets the global batch.
            if "train.global_batch_size" in explicit_keys:
                raise ConfigError(
                    f"accelerate's config sets gradient_accumulation_steps={settings.grad_accum_steps} but the dist_train "
                    f"config derives {derived} (train.global_batch_size={cfg.train.global_batch_size} / (train.micro_batch_size="
                    f"{cfg.train.micro_batch_size} x {world_size} processes)); make them agree or drop train.global_batch_size"
                )
            cfg.train.global_batch_size = cfg.train.micro_batch_size * world_size * settings.grad_accum_steps
            taken.append(f"train.global_batch_size={cfg.train.global_batch_size} (from accelerate's gradient_accumulation_steps={settings.grad_accum_steps})")
    return taken
