"""dist_train: distributed training for tutorial-sized PyTorch models.

    from dist_train import train, load_config, Config, ConfigError

`train(config, *overrides, model=..., train_dataset=..., eval_dataset=..., metrics=...)` runs a user's own
nn.Module, map-style Dataset and metrics under the same config tree, launchers and checkpoints as the CLI
(see dist_train.api). Names are imported on first use: `import dist_train` itself loads nothing heavy.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "load_config", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from .api import train

        return train
    if name in ("Config", "ConfigError", "load_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'dist_train' has no attribute {name!r}")
