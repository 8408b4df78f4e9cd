"""A user's own model, datasets and metrics, handed in through the Python API (`dist_train.train`).

Map-style datasets (`__len__` + `__getitem__`, any `torch.utils.data.Dataset`) get exactly what the
built-in sources get: one seeded global-batch plan per epoch (every sample once per epoch over all ranks,
the remainder smaller than one global batch dropped and counted, every rank the same number of steps, the
order a function of (seed, epoch) only) and an exact resume at step granularity on any number of ranks.
An `IterableDataset` is refused: dist_train cannot know its length, split it without duplicates or
resume its position; write it as shards (`dist-train data prepare`) instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import nn
from torch.utils.data import IterableDataset

from .config import BatchArithmetic, Config, ConfigError, ModelConfig
from .distributed.environment import DistEnv


def require_map_style(dataset: Any, name: str) -> Any:
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ConfigError(
            f"{name}: a {type(dataset).__name__} has no length and index (an iterable dataset); dist_train's "
            "exactly-once, equal-steps and exact-resume guarantees need a map-style torch Dataset "
            "(__len__ and __getitem__), or shards written by `dist-train data prepare`"
        )
    return dataset


@dataclass
class UserParts:
    """What replaces config-built parts: a model (an nn.Module, or a function returning one, called after
    seeding so every rank builds the same initial weights), train/eval datasets, and eval metrics."""

    model: Union[nn.Module, Callable[[], nn.Module], None] = None
    train_dataset: Any = None
    eval_dataset: Any = None
    metrics: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = field(default_factory=dict)

    def model_spec(self, cfg: ModelConfig) -> Any:
        from .models import ModelSpec

        name = type(self.model).__name__ if isinstance(self.model, nn.Module) else getattr(self.model, "__name__", "model")
        return ModelSpec(name, tuple(cfg.input_shape or ()), cfg.task or "classification", cfg.num_classes)

    def build_model(self) -> nn.Module:
        model = self.model() if not isinstance(self.model, nn.Module) and callable(self.model) else self.model
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model= must be a torch.nn.Module or a function returning one, got {type(model).__name__}")
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # An object built before dist_train seeded may differ per rank; ZeRO would not reconcile it.
            state = [model.state_dict() if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(state, src=0)
            model.load_state_dict(state[0])
        return model

    def data(self, cfg: Config, arithmetic: BatchArithmetic, dist_env: DistEnv) -> Any:
        from .data import user_data_bundle

        if self.eval_dataset is None:
            raise ConfigError("train_dataset= needs an eval_dataset= too (the run ends with an exact evaluation on it)")
        train = require_map_style(self.train_dataset, "train_dataset")
        evaluation = require_map_style(self.eval_dataset, "eval_dataset")
        return user_data_bundle(train, evaluation, cfg=cfg, arithmetic=arithmetic, dist_env=dist_env)
