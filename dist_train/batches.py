"""What a micro-batch is: `(inputs, targets)` from the built-in sources, or whatever a user's dataset yields
(a tuple, or a dict of tensors), and the loss that turns the model's outputs on it into one scalar.

The tutorial models keep their tutorial losses (cross-entropy / MSE by `model.task`). A model given by import
path may bring its own: `model.loss=pkg.mod:fn`, or a `loss(outputs, batch)` method on the model. The model
is called with `inputs` for a tuple batch and with the whole batch for a dict.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .config import ConfigError, ModelConfig

Batch = Any  # (inputs, targets) | tuple | dict[str, Tensor]
LossFn = Callable[[Any, Batch], torch.Tensor]


def to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":  # loaders yield CPU tensors: nothing to move, and no per-tensor call every step
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def batch_size(batch: Batch) -> int:
    """Samples in a micro-batch: the length of its first tensor."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError("a micro-batch holds no tensor")


def model_input(batch: Batch) -> Any:
    return batch if isinstance(batch, dict) else batch[0]


def select(batch: Batch, count: int) -> Batch:
    """The first `count` samples of a batch (evaluation drops the padding at the end of a rank's share)."""
    if isinstance(batch, torch.Tensor):
        return batch[:count]
    if isinstance(batch, dict):
        return {key: select(value, count) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(select(value, count) for value in batch)
    return batch


def task_loss(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(outputs.float(), targets)
    return F.mse_loss(outputs.float(), targets.float())


def resolve_loss(cfg: ModelConfig, model: nn.Module) -> Optional[LossFn]:
    """The model's own loss (model.loss, else a `loss` method), or None for the task's tutorial loss."""
    if cfg.loss:
        module_name, _, attr = cfg.loss.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"model.loss={cfg.loss}: cannot import it ({e}); give 'package.module:function' taking (outputs, batch)") from None
        return fn
    method = getattr(model, "loss", None)
    return method if callable(method) and not isinstance(method, nn.Module) else None
