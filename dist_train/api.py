"""The Python API: train your own model object on your own dataset with dist_train's config tree,
launchers and checkpoints. The `dist-train` CLI runs the same code.

    import dist_train

    summary = dist_train.train(
        "configs/cnn_digits.yaml",           # or a dict of sections, or None for the defaults
        "output_dir=runs/mine", "train.epochs=2",
        model=lambda: MyNet(),               # an nn.Module, or a function returning one (called after seeding)
        train_dataset=my_train,              # map-style torch Dataset of (input, target) pairs
        eval_dataset=my_test,
        metrics={"top2": top2_per_sample},   # name -> fn(outputs, targets) giving one value per sample
    )

Start the script like the CLI: `python script.py` (one process) or `torchrun --nproc_per_node 2 script.py`
(every process runs the script; only the main process prints and writes). Resume with
"train.resume=auto", as on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .config import Config, ConfigError, load_config


def train(
    config: Union[str, Path, dict, None] = None,
    *overrides: str,
    model: Union[nn.Module, Callable[[], nn.Module], None] = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    metrics: Optional[dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = None,
) -> dict:
    """Train; returns the run's summary (what summary.json holds) plus `exit_code`: 0 done, 130 stopped on
    request with a checkpoint saved (resume with train.resume=auto), 3 diverged. Configuration and data
    problems raise ConfigError (or the error of the module that found them) on every process.

    Without `model`, the config's model.name is built; without `train_dataset`, the config's data source
    is read. With `model`, set model.task (classification or regression: the loss) in the config if it
    is not classification. Map-style datasets get the same guarantees as the built-in sources (see
    dist_train.user); iterable ones are refused."""
    from .run import train as run_train
    from .user import UserParts

    if (train_dataset is None) != (eval_dataset is None):
        raise ConfigError("give train_dataset= and eval_dataset= together (or neither, to use the config's data)")
    parts = UserParts(model, train_dataset, eval_dataset, dict(metrics or {}))
    result: dict = {}
    code = run_train(config, list(overrides), parts=parts, result=result)
    return {**result, "exit_code": code}


__all__ = ["Config", "ConfigError", "load_config", "train"]
