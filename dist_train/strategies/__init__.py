"""One strategy class per backend; `build_strategy` picks it from `strategy.name`."""

from __future__ import annotations

from ..config import BatchArithmetic, Config, ConfigError
from ..env import DistEnv
from .base import StepResult, Strategy, check_precision_supported
from .ddp import DDPStrategy


def build_strategy(cfg: Config, dist_env: DistEnv, arithmetic: BatchArithmetic) -> Strategy:
    if cfg.strategy.name == "ddp":
        check_precision_supported(cfg.train.precision, dist_env.torch_device)
        return DDPStrategy(cfg, dist_env, arithmetic)
    if cfg.strategy.name == "deepspeed":
        try:
            from .deepspeed import DeepSpeedStrategy
        except ImportError as e:
            raise ConfigError(f"strategy.name=deepspeed needs DeepSpeed: pip install 'dist_train[deepspeed]' ({e})") from None
        return DeepSpeedStrategy(cfg, dist_env, arithmetic)
    raise ConfigError(f"strategy.name={cfg.strategy.name} is unknown; use ddp or deepspeed")


__all__ = ["DDPStrategy", "StepResult", "Strategy", "build_strategy"]
