"""A user's own model, datasets and metrics, handed in through the Python API (`dist_train.train`).

Map-style datasets (`__len__` + `__getitem__`, any `torch.utils.data.Dataset`) get exactly what the
built-in sources get: one seeded global-batch plan per epoch (every sample once per epoch over all ranks,
the remainder smaller than one global batch dropped and counted, every rank the same number of steps, the
order a function of (seed, epoch) only) and an exact resume at step granularity on any number of ranks.
An `IterableDataset` is refused: dist_train cannot know its length, split it without duplicates or
resume its position; write it as shards (`dist-train data prepare`) instead. So is a dataset that differs
between ranks (each rank reads its share by index: different data on each would silently break every one
of those guarantees), told by a fingerprint of a few samples compared once at start.
"""

from __future__ import annotations

import hashlib
import random
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

    def data(self, cfg: Config, arithmetic: BatchArithmetic, dist_env: DistEnv, control_group: Any = None) -> Any:
        """`control_group`: ProcessGroups.control (None for one process), over which the ranks compare datasets."""
        from .data import user_data_bundle

        if self.eval_dataset is None:
            raise ConfigError("train_dataset= needs an eval_dataset= too (the run ends with an exact evaluation on it)")
        train = require_map_style(self.train_dataset, "train_dataset")
        evaluation = require_map_style(self.eval_dataset, "eval_dataset")
        require_same_on_every_rank({"train_dataset": train, "eval_dataset": evaluation}, control_group)
        return user_data_bundle(train, evaluation, cfg=cfg, arithmetic=arithmetic, dist_env=dist_env)


FINGERPRINT_SAMPLES = 8  # samples hashed per dataset: a handful of __getitem__ calls at start


def require_same_on_every_rank(datasets: dict[str, Any], control_group: Any) -> None:
    """Collective over `control_group` (nothing for one process): every rank holds the same datasets, by
    their lengths and a few samples hashed, or every rank raises the same ConfigError."""
    if control_group is None:
        return
    import torch.distributed as dist

    mine = {name: dataset_fingerprint(dataset) for name, dataset in datasets.items()}
    everyone: list[Any] = [None] * dist.get_world_size(control_group)
    dist.all_gather_object(everyone, mine, group=control_group)
    for name in datasets:
        differing = [rank for rank, theirs in enumerate(everyone) if theirs[name] != everyone[0][name]]
        if differing:
            raise ConfigError(
                f"{name} differs between ranks (rank {differing[0]}'s length or samples are not rank 0's): every process "
                "runs your script, and each must build the same dataset, since each trains on its share of it by index; "
                "draw random data from a seeded generator (torch.Generator().manual_seed(0)) or load it from files"
            )


def dataset_fingerprint(dataset: Any) -> tuple[int, str]:
    """(length, sha256 of a few samples at fixed positions). Drawn with every RNG seeded alike and restored
    after, so random augmentation gives every rank the same samples when the data is the same."""
    length = len(dataset)
    positions = sorted({(i * (length - 1)) // max(FINGERPRINT_SAMPLES - 1, 1) for i in range(FINGERPRINT_SAMPLES)}) if length else []
    import numpy as np

    saved = (random.getstate(), np.random.get_state())
    digest = hashlib.sha256()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(0), np.random.seed(0), torch.manual_seed(0)
            for position in positions:
                _digest_into(digest, dataset[position])
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    return length, digest.hexdigest()


def _digest_into(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (tuple, list)):
        for item in value:
            _digest_into(digest, item)
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _digest_into(digest, value[key])
    elif hasattr(value, "tobytes"):  # numpy arrays, PIL images
        digest.update(value.tobytes())
    else:
        digest.update(repr(value).encode() if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__.encode())
