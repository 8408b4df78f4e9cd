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
(every process runs the script, so every one must build the same datasets: seed what you draw; only the main
process prints and writes). Resume with "train.resume=auto", as on the command line. A configuration or
data error raises (ConfigError, ...) for the caller to catch; left uncaught, it ends the script as it ends
the CLI: one line (from the main process for a config error) and the CLI's exit code, not a traceback per rank.
"""

from __future__ import annotations

import logging
import os
import sys
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
    try:
        code = run_train(config, list(overrides), parts=parts, result=result)
    except BaseException as e:
        _end_like_the_cli_if_uncaught(e)
        raise
    return {**result, "exit_code": code}


def _end_like_the_cli_if_uncaught(error: BaseException) -> None:
    """If `error` reaches the interpreter uncaught, say it as the CLI does (cli.report_error: one line, from
    the main process only for a config error, which every rank meets alike) and exit with the CLI's code.
    A user-facing error is otherwise a 70-line traceback on every rank of a torchrun job. Other exceptions,
    and this one when it is caught, go to the hook that was there before."""
    from .errors import classify

    if classify(error) is None:
        return
    previous, marker = sys.excepthook, id(error)

    def hook(kind: type, value: BaseException, traceback: object) -> None:
        if id(value) == marker:
            from .cli import report_error

            code = report_error(value)
            if code is not None:
                # os._exit, as the console script does (cli.console_main): run.py has torn everything down.
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        previous(kind, value, traceback)  # type: ignore[arg-type]

    sys.excepthook = hook


__all__ = ["Config", "ConfigError", "load_config", "train"]
