"""A DeepSpeed JSON (`strategy.deepspeed.config`) reconciled with dist_train's config.

The JSON is passed through as it is; dist_train sets only the keys it owns (micro batch, accumulation,
global batch, clipping, bf16/fp16, ZeRO stage), fills DeepSpeed's "auto" values from `optim.*`, and refuses
a JSON value that contradicts its own config, naming both sides. A pure function of the config, the batch
arithmetic and the file: the strategy builds its engine from the result, and nothing here imports DeepSpeed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from .tree import BatchArithmetic, Config, ConfigError


def load_user_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"strategy.deepspeed.config={path} does not exist; give a DeepSpeed JSON such as configs/deepspeed/zero2.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"strategy.deepspeed.config={path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"strategy.deepspeed.config={path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def build_deepspeed_config(cfg: Config, arithmetic: BatchArithmetic, user: Optional[dict] = None, source: str = "") -> dict:
    """The user's JSON with dist_train's keys reconciled into it. `source` names the JSON in errors."""
    ds = copy.deepcopy(user or {})
    source = source or "the DeepSpeed config"
    t, precision = cfg.train, cfg.train.precision
    batch = (
        f"train.global_batch_size={arithmetic.global_batch_size} / (train.micro_batch_size="
        f"{arithmetic.micro_batch_size} x {arithmetic.world_size} ranks)"
    )
    owned = [
        ("train_micro_batch_size_per_gpu", arithmetic.micro_batch_size, f"train.micro_batch_size={t.micro_batch_size}"),
        ("gradient_accumulation_steps", arithmetic.grad_accum_steps, batch),
        ("train_batch_size", arithmetic.global_batch_size, f"train.global_batch_size={t.global_batch_size}"),
        ("gradient_clipping", float(t.grad_clip or 0.0), f"train.grad_clip={t.grad_clip}"),
        ("bf16.enabled", precision == "bf16", f"train.precision={precision}"),
        ("fp16.enabled", precision == "fp16", f"train.precision={precision}"),
        ("zero_optimization.stage", cfg.strategy.deepspeed.zero_stage, f"strategy.deepspeed.zero_stage={cfg.strategy.deepspeed.zero_stage}"),
    ]
    for key, value, origin in owned:
        _reconcile(ds, key, value, origin, source)

    # A JSON optimizer/scheduler replaces dist_train's; its "auto" values come from optim.*.
    o = cfg.optim
    fills = {
        "optimizer.params": {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay, "eps": 1e-8, "momentum": o.momentum},
        "scheduler.params": {"warmup_num_steps": o.warmup_steps, "warmup_max_lr": o.lr, "warmup_min_lr": 0.0},
    }
    for section, values in fills.items():
        params = _get(ds, section)
        if isinstance(params, dict):
            for name, value in values.items():
                if params.get(name) == "auto":
                    params[name] = value
    leftover = _auto_keys(ds)
    if leftover:
        raise ConfigError(
            f"{source} {leftover[0]}=auto: dist_train fills auto only for the batch sizes, accumulation, gradient_clipping, "
            f"bf16/fp16, zero_optimization.stage and optimizer/scheduler lr, betas, eps, weight_decay, warmup; give {leftover[0]} a value"
        )
    # dist_train hands ZeRO the user's torch optimizer (SGD included), which DeepSpeed otherwise refuses as "untested".
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _reconcile(ds: dict, dotted: str, value: Any, origin: str, source: str) -> None:
    *parents, leaf = dotted.split(".")
    node = ds
    for part in parents:
        node = node.setdefault(part, {})
    given = node.get(leaf, "auto")
    if given == "auto" or _same(given, value):
        node[leaf] = value
        return
    raise ConfigError(
        f"{source} {dotted}={json.dumps(given)} but dist_train derives {json.dumps(value)} from {origin}; "
        f"remove {dotted} from {source} or set it to \"auto\""
    )


def _same(given: Any, value: Any) -> bool:
    if isinstance(value, bool) or isinstance(given, bool):
        return given is value
    if isinstance(given, (int, float)) and isinstance(value, (int, float)):
        return float(given) == float(value)
    return False


def _auto_keys(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if tree == "auto" else []
