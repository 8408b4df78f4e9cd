"""One strategy class per backend; `build_strategy` picks it from `strategy.name`.

A new backend is one file in this package and one line in STRATEGIES (imported only when chosen, so a
backend's heavy or optional dependency costs nothing to the others)."""

from __future__ import annotations

import importlib

from ..config import BatchArithmetic, Config, ConfigError
from ..env import DistEnv
from .base import StepResult, Strategy, check_precision_supported

# strategy.name -> (module in this package, class, what to install when the import fails)
STRATEGIES = {
    "ddp": ("ddp", "DDPStrategy", ""),
    "fsdp2": ("fsdp2", "FSDP2Strategy", "torch >= 2.6"),
    "deepspeed": ("deepspeed", "DeepSpeedStrategy", "pip install 'dist_train[deepspeed]'"),
}


def build_strategy(cfg: Config, dist_env: DistEnv, arithmetic: BatchArithmetic) -> Strategy:
    if cfg.strategy.name not in STRATEGIES:
        raise ConfigError(f"strategy.name={cfg.strategy.name} is unknown; use one of: {', '.join(STRATEGIES)}")
    module_name, class_name, install = STRATEGIES[cfg.strategy.name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as e:
        raise ConfigError(f"strategy.name={cfg.strategy.name} needs {install or 'a dependency that is missing'} ({e})") from None
    return getattr(module, class_name)(cfg, dist_env, arithmetic)


__all__ = ["STRATEGIES", "StepResult", "Strategy", "build_strategy", "check_precision_supported"]
