"""One strategy class per backend; `build_strategy` picks it from `strategy.name`.

A new backend is one file in this package, one line in STRATEGIES (imported only when chosen, so a
backend's heavy or optional dependency costs nothing to the others), its name in `strategy.name`'s choices
and its own section `strategy.<name>` in config/tree.py (a test checks that the three agree). It takes its
process groups from distributed/groups.py and creates none."""

from __future__ import annotations

import importlib

from ..config import BatchArithmetic, Config, ConfigError
from ..distributed.groups import ProcessGroups
from .base import StepResult, Strategy, check_precision_supported

# strategy.name -> (module in this package, class, what to install when the import fails)
STRATEGIES = {
    "ddp": ("ddp", "DDPStrategy", ""),
    "fsdp2": ("fsdp2", "FSDP2Strategy", "torch >= 2.6"),
    "deepspeed": ("deepspeed", "DeepSpeedStrategy", "pip install 'dist_train[deepspeed]'"),
}


def strategy_class(name: str) -> type[Strategy]:
    """The backend's class (importing its module and dependencies); ConfigError naming what to install."""
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name={name} is unknown; use one of: {', '.join(STRATEGIES)}")
    module_name, class_name, install = STRATEGIES[name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as e:
        raise ConfigError(f"strategy.name={name} needs {install or 'a dependency that is missing'} ({e})") from None
    return getattr(module, class_name)


def build_strategy(cfg: Config, groups: ProcessGroups, arithmetic: BatchArithmetic) -> Strategy:
    return strategy_class(cfg.strategy.name).from_config(cfg, groups, arithmetic)


__all__ = ["STRATEGIES", "StepResult", "Strategy", "build_strategy", "check_precision_supported", "strategy_class"]
