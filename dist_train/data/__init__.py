"""Data: sources -> (train loader, eval loader) with exact distributed batching.

`build_data` is the one entry point the trainer uses. Every train loader yields, per optimizer step, this
rank's list of `grad_accum_steps` micro-batches, and has `steps_per_epoch`, `set_epoch`, `state_dict`
and `load_state_dict` (its position: epoch and samples consumed this epoch over all ranks).
"""

from __future__ import annotations

from typing import Any

from ..config import BatchArithmetic, Config
from ..distributed.environment import DistEnv
from ..models import ModelSpec
from .loader import DataBundle, EvalLoader, GlobalBatchPlan, MapStyleTrainLoader, build_map_style
from .sources import SOURCES, SourceData, Split, load_source


def build_data(cfg: Config, spec: ModelSpec, arithmetic: BatchArithmetic, dist_env: DistEnv, control_group: Any = None) -> DataBundle:
    """`control_group`: the gloo group the ranks agree on each step's data over (ProcessGroups.control)."""
    if cfg.data.source == "shards":
        from .streaming import build_streaming  # noqa: PLC0415 (optional path, keeps import light)

        return build_streaming(cfg, spec, arithmetic, dist_env, control_group)
    if ":" in cfg.data.source:
        return build_user_data(cfg, arithmetic, dist_env)
    source = load_source(cfg.data, spec)
    train, evaluation = build_map_style(
        source.train,
        source.test,
        spec.input_shape,
        images=source.kind == "image",
        arithmetic=arithmetic,
        dist_env=dist_env,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        num_workers=cfg.data.num_workers,
    )
    return DataBundle(train, evaluation, len(source.train), len(source.test))


def build_user_data(cfg: Config, arithmetic: BatchArithmetic, dist_env: DistEnv) -> DataBundle:
    """data.source=package.module:function -> function(cfg.data) returns (train, eval) map-style datasets.

    The same guarantees as the built-in map-style sources: every sample once per epoch in a (seed, epoch)
    order cut into global batches, equal steps per rank, resume at any step on any world size."""
    import importlib

    from ..config import ConfigError

    module_name, _, attr = cfg.data.source.partition(":")
    try:
        build = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"data.source={cfg.data.source}: cannot import it ({e}); give 'package.module:function' returning (train, eval) datasets") from None
    return user_data_bundle(*build(cfg.data), cfg=cfg, arithmetic=arithmetic, dist_env=dist_env)


def user_data_bundle(train_dataset: Any, eval_dataset: Any, cfg: Config, arithmetic: BatchArithmetic, dist_env: DistEnv) -> DataBundle:
    """Map-style (train, eval) datasets of a user's (data.source=module:function, or the Python API's
    objects) under the global batch plan."""
    from .loader import EvalLoader, GlobalBatchPlan, MapStyleTrainLoader, UserDataset

    train, evaluation = UserDataset(train_dataset), UserDataset(eval_dataset)
    plan = GlobalBatchPlan(len(train), arithmetic.global_batch_size, cfg.train.seed, cfg.data.shuffle)
    train_loader = MapStyleTrainLoader(train, plan, arithmetic, dist_env, cfg.data.num_workers)  # type: ignore[arg-type]
    eval_loader = EvalLoader(evaluation, max(arithmetic.micro_batch_size, 256), dist_env)  # type: ignore[arg-type]
    return DataBundle(train_loader, eval_loader, len(train), len(evaluation))


__all__ = [
    "DataBundle",
    "EvalLoader",
    "GlobalBatchPlan",
    "MapStyleTrainLoader",
    "SOURCES",
    "SourceData",
    "Split",
    "build_data",
    "load_source",
]
