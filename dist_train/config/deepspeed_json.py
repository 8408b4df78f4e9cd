"""A DeepSpeed JSON (`strategy.deepspeed.config`) reconciled with dist_train's config.

The JSON is passed through as it is, except for what dist_train must reconcile:

- the keys it owns (micro batch, accumulation, global batch, clipping, bf16/fp16) are set from its config;
  a JSON value must be "auto" or agree;
- the ZeRO stage, the `optimizer` section (its type and lr, betas, weight_decay, momentum) and the
  `scheduler` section (DeepSpeed's WarmupLR and WarmupDecayLR) stand for `strategy.deepspeed.zero_stage` and
  `optim.*` values. Before a run (`reconcile_deepspeed_json`, from run.py and `dist-train launch`) a value
  the config leaves unset is adopted into the config, one printed line each, so config.yaml, the checkpoint
  and the log show the run that happens; a value the config sets otherwise is a conflict naming both sides.
  "auto" is filled from the config;
- the scheduler then runs as dist_train's own schedule (optim.schedule=warmup_lr / warmup_decay_lr, the
  same curve step for step: optim.deepspeed_warmup_factor), so "auto" total steps are the planned steps, the
  position resumes with the scheduler's step count and a changed optim.lr applies on resume as for every
  schedule; the section itself is not handed to DeepSpeed. The optimizer is DeepSpeed's to build (its
  CPU Adam under offload_optimizer).

Every problem of a JSON is reported in one error. A pure function of the config, the batch arithmetic and
the file; nothing here imports DeepSpeed.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .tree import BatchArithmetic, Config, ConfigError, batch_arithmetic


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


def reconcile_deepspeed_json(cfg: Config, explicit_keys: "set[str] | frozenset[str]", world_size: Optional[int] = None) -> list[str]:
    """Adopt the JSON's ZeRO stage, optimizer and scheduler into the `cfg` keys that `explicit_keys` (what the
    preset and overrides set) leave unset, in place, then check the whole JSON against `cfg` (the batch keys
    only when `world_size` is known). Returns the lines to print; one ConfigError lists every problem."""
    path = cfg.strategy.deepspeed.config
    if cfg.strategy.name != "deepspeed" or not path:
        return []
    user = load_user_config(path)
    lines = []
    for meaning in _meanings(user, cfg)[0]:
        current = _config_value(cfg, meaning.config_key)
        if meaning.config_key in explicit_keys or _same(meaning.value, current):
            continue  # a disagreement with an explicit key is reported by the check below
        _set_config_value(cfg, meaning.config_key, meaning.value)
        lines.append(f"{meaning.config_key}={_show(meaning.value)} (from {path}: {meaning.said})")
    arithmetic = batch_arithmetic(cfg.train, world_size) if world_size is not None else None
    _, notes = _resolve(cfg, arithmetic, user, path)
    return lines + notes


def build_deepspeed_config(cfg: Config, arithmetic: BatchArithmetic, user: Optional[dict] = None, source: str = "") -> dict:
    """The user's JSON with dist_train's keys reconciled into it, ready for deepspeed.initialize. `cfg` must
    already hold what `reconcile_deepspeed_json` adopted; `source` names the JSON in errors."""
    return _resolve(cfg, arithmetic, user or {}, source or "the DeepSpeed config")[0]


# ---------------------------------------------------------------- what the JSON's values mean for the config

# DeepSpeed builds "Adam" and "AdamW" itself (AdamW unless "adam_w_mode": false, deepspeed/runtime/engine.py
# _configure_basic_optimizer) and any other name as torch.optim.<name>, spelt as the class is.
OPTIMIZER_PARAMS = {  # optim.name -> the JSON parameters that stand for optim.* fields
    "sgd": ("lr", "momentum", "weight_decay"),
    "adam": ("lr", "betas", "weight_decay"),
    "adamw": ("lr", "betas", "weight_decay"),
}
ADAM_EPS = 1e-8  # "eps": "auto" (optim.* has no eps): torch's and DeepSpeed's default
SCHEDULES = {"WarmupLR": "warmup_lr", "WarmupDecayLR": "warmup_decay_lr"}
SCHEDULER_PARAMS = {
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"},
    "WarmupDecayLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration", "total_num_steps"},
}
# Hugging Face fills these from the model config's hidden_size, which an nn.Module does not have: "auto"
# leaves them to DeepSpeed's defaults.
DEEPSPEED_DEFAULT_WHEN_AUTO = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold")


@dataclass(frozen=True)
class _Meaning:
    """One JSON value that stands for a dist_train key."""

    said: str  # the JSON side, as the user wrote it: 'optimizer.type="AdamW"'
    config_key: str
    value: Any  # in the config's terms
    instead: str  # how to keep the config's value instead


def _meanings(user: dict, cfg: Config) -> tuple[list[_Meaning], list[str]]:
    """(what the JSON's stage, optimizer and scheduler stand for, the problems that stand for nothing)."""
    meanings: list[_Meaning] = []
    problems: list[str] = []
    stage = _get(user, "zero_optimization.stage")
    if stage is not None and stage != "auto":
        meanings.append(_Meaning(f"zero_optimization.stage={_json(stage)}", "strategy.deepspeed.zero_stage", stage, 'set "stage": "auto"'))
    optimizer, scheduler = user.get("optimizer"), user.get("scheduler")
    if optimizer is not None:
        _optimizer_meanings(optimizer, meanings, problems)
    if scheduler is not None:
        _scheduler_meanings(scheduler, _json_lr(user) or cfg.optim.lr, meanings, problems)
    typed = [m for m in meanings if _fits(m.config_key, m.value)]
    problems += [f"{m.said} cannot be {m.config_key} (it needs {_kind(m.config_key)})" for m in meanings if m not in typed]
    return typed, problems


_KINDS = {"strategy.deepspeed.zero_stage": "an integer", "optim.warmup_steps": "an integer", "optim.betas": "two numbers"}


def _kind(config_key: str) -> str:
    return _KINDS.get(config_key, "a name" if config_key in ("optim.name", "optim.schedule", "optim.warmup_type") else "a number")


def _fits(config_key: str, value: Any) -> bool:
    kind = _kind(config_key)
    if kind == "an integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "two numbers":
        return isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)
    return _is_number(value) if kind == "a number" else isinstance(value, str)


def _optimizer_meanings(section: Any, meanings: list[_Meaning], problems: list[str]) -> None:
    kind = section.get("type") if isinstance(section, dict) else None
    params = (section.get("params") or {}) if isinstance(section, dict) else {}
    name = _optimizer_name(kind, params)
    if name is None:
        problems.append(
            f"optimizer.type={_json(kind)} has no optim.name: dist_train reconciles Adam, AdamW and SGD (sgd, adam, adamw); "
            "use one of them, or remove the optimizer section to train with optim.name"
        )
        return
    meanings.append(_Meaning(f"optimizer.type={_json(kind)}" + (f' with "adam_w_mode": {_json(params["adam_w_mode"])}' if "adam_w_mode" in params else ""), "optim.name", name, 'delete the "optimizer" section'))
    for param in OPTIMIZER_PARAMS[name]:
        value = params.get(param, "auto")
        if value != "auto":
            meanings.append(_Meaning(f"optimizer.params.{param}={_json(value)}", f"optim.{param}", list(value) if isinstance(value, tuple) else value, f'set "{param}": "auto"'))


def _optimizer_name(kind: Any, params: dict) -> Optional[str]:
    if not isinstance(kind, str):
        return None
    if kind.lower() == "adamw":
        return "adamw"
    if kind.lower() == "adam":
        return "adam" if params.get("adam_w_mode", True) is False else "adamw"
    return "sgd" if kind == "SGD" else None


def _scheduler_meanings(section: Any, lr: float, meanings: list[_Meaning], problems: list[str]) -> None:
    kind = section.get("type") if isinstance(section, dict) else None
    params = (section.get("params") or {}) if isinstance(section, dict) else {}
    if kind not in SCHEDULES:
        problems.append(
            f"scheduler.type={_json(kind)}: dist_train runs DeepSpeed's WarmupLR and WarmupDecayLR (as optim.schedule=warmup_lr / "
            "warmup_decay_lr) and its own optim.schedule; remove the scheduler section and set optim.schedule"
        )
        return
    meanings.append(_Meaning(f"scheduler.type={_json(kind)}", "optim.schedule", SCHEDULES[kind], 'delete the "scheduler" section'))
    for param in sorted(set(params) - SCHEDULER_PARAMS[kind]):
        problems.append(f"scheduler.params.{param} is not a parameter of DeepSpeed's {kind}; remove it")
    given = {k: v for k, v in params.items() if v != "auto"}
    if "warmup_num_steps" in given:
        steps = given["warmup_num_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int):
            problems.append(f"scheduler.params.warmup_num_steps={_json(steps)} must be an integer (DeepSpeed refuses anything else)")
        else:
            meanings.append(_Meaning(f"scheduler.params.warmup_num_steps={steps}", "optim.warmup_steps", steps, 'set "warmup_num_steps": "auto"'))
    if "warmup_max_lr" in given:
        meanings.append(_Meaning(f"scheduler.params.warmup_max_lr={_json(given['warmup_max_lr'])}", "optim.lr", given["warmup_max_lr"], 'set "warmup_max_lr": "auto"'))
    if "warmup_min_lr" in given:
        low = given["warmup_min_lr"]
        meanings.append(_Meaning(f"scheduler.params.warmup_min_lr={_json(low)}", "optim.min_lr_ratio", low / lr if _is_number(low) else low, 'set "warmup_min_lr": "auto"'))
    warmup_type = params.get("warmup_type", "log")
    if warmup_type not in ("auto", "log", "linear"):
        problems.append(f"scheduler.params.warmup_type={_json(warmup_type)} is not log or linear (DeepSpeed would run log with a warning); set one of them")
    elif warmup_type != "auto":
        said = f"scheduler.params.warmup_type={_json(warmup_type)}" if "warmup_type" in params else f'{kind} without warmup_type (DeepSpeed\'s default "log")'
        meanings.append(_Meaning(said, "optim.warmup_type", warmup_type, 'set "warmup_type": "auto"'))
    if given.get("last_batch_iteration", -1) != -1:
        problems.append("scheduler.params.last_batch_iteration: dist_train resumes the schedule's position from its checkpoint; remove it")
    if "total_num_steps" in given:
        problems.append(
            f"scheduler.params.total_num_steps={_json(given['total_num_steps'])}: dist_train decays over the planned steps (train.epochs, "
            'train.max_steps); set "total_num_steps": "auto" (and train.max_steps for that length)'
        )


def _json_lr(user: dict) -> Optional[float]:
    """The peak LR the JSON itself gives, which its warmup_min_lr is a fraction of."""
    for dotted in ("scheduler.params.warmup_max_lr", "optimizer.params.lr"):
        value = _get(user, dotted)
        if _is_number(value) and value > 0:
            return float(value)
    return None


# ---------------------------------------------------------------- the checked, filled JSON


def _resolve(cfg: Config, arithmetic: Optional[BatchArithmetic], user: dict, source: str) -> tuple[dict, list[str]]:
    """(the JSON for deepspeed.initialize, lines on values left to DeepSpeed); ConfigError with every problem."""
    ds = copy.deepcopy(user)
    meanings, problems = _meanings(user, cfg)
    for meaning in meanings:
        current = _config_value(cfg, meaning.config_key)
        if not _same(meaning.value, current):
            problems.append(
                f"{meaning.said} is {meaning.config_key}={_show(meaning.value)} but this run has {meaning.config_key}={_show(current)}: "
                f"set {meaning.config_key}={_show(meaning.value)}, or {meaning.instead} in {source}"
            )
    for key, value, origin in _owned(cfg, arithmetic):
        problem = _reconcile(ds, key, value, origin, source)
        if problem:
            problems.append(problem)
    _set(ds, "zero_optimization.stage", cfg.strategy.deepspeed.zero_stage)
    _fill_optimizer(ds, cfg)
    problems += _scheduler_problems(ds, cfg)
    ds.pop("scheduler", None)  # runs as optim.schedule (see the module doc)
    defaulted = [dotted for dotted in DEEPSPEED_DEFAULT_WHEN_AUTO if _get(ds, dotted) == "auto"]
    for dotted in defaulted:
        _pop(ds, dotted)
    notes = [f"{', '.join(defaulted)}=auto in {source}: DeepSpeed's defaults (Hugging Face derives them from a transformers model's hidden_size)"] if defaulted else []
    for leftover in _auto_keys(ds):
        problems.append(
            f"{leftover}=auto: dist_train fills auto only for the batch sizes, accumulation, gradient_clipping, bf16/fp16, "
            f"zero_optimization.stage and its bucket sizes, and the optimizer's and scheduler's parameters; give {leftover} a value"
        )
    if problems:
        raise ConfigError(_one_line(problems, source))
    # dist_train hands ZeRO the user's torch optimizer (SGD included), which DeepSpeed otherwise refuses as "untested".
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds, notes


def _owned(cfg: Config, arithmetic: Optional[BatchArithmetic]) -> list[tuple[str, Any, str]]:
    """(JSON key, the value dist_train derives, from which key) for the keys dist_train owns."""
    t, precision = cfg.train, cfg.train.precision
    owned = [
        ("gradient_clipping", float(t.grad_clip or 0.0), f"train.grad_clip={t.grad_clip}"),
        ("bf16.enabled", precision == "bf16", f"train.precision={precision}"),
        ("fp16.enabled", precision == "fp16", f"train.precision={precision}"),
    ]
    if arithmetic is None:  # the world size is not known yet (an elastic --nnodes range)
        return owned
    batch = (
        f"train.global_batch_size={arithmetic.global_batch_size} / (train.micro_batch_size="
        f"{arithmetic.micro_batch_size} x {arithmetic.world_size} ranks)"
    )
    return [
        ("train_micro_batch_size_per_gpu", arithmetic.micro_batch_size, f"train.micro_batch_size={t.micro_batch_size}"),
        ("gradient_accumulation_steps", arithmetic.grad_accum_steps, batch),
        ("train_batch_size", arithmetic.global_batch_size, f"train.global_batch_size={t.global_batch_size}"),
        *owned,
    ]


def _fill_optimizer(ds: dict, cfg: Config) -> None:
    """The JSON optimizer's "auto" parameters, from optim.* (those its type has)."""
    params = _get(ds, "optimizer.params")
    if not isinstance(params, dict):
        return
    name = _optimizer_name(_get(ds, "optimizer.type"), params)
    o = cfg.optim
    values = {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay, "momentum": o.momentum}
    for param in OPTIMIZER_PARAMS.get(name or "", ()):
        if params.get(param) == "auto":
            params[param] = values[param]
    if params.get("eps") == "auto" and name in ("adam", "adamw"):
        params["eps"] = ADAM_EPS


def _scheduler_problems(ds: dict, cfg: Config) -> list[str]:
    """A WarmupLR/WarmupDecayLR warmup must be at least one step: DeepSpeed refuses 0, and so does optim.schedule."""
    params = _get(ds, "scheduler.params")
    if _get(ds, "scheduler.type") not in SCHEDULES or not isinstance(params, dict) or cfg.optim.warmup_steps >= 1:
        return []
    if params.get("warmup_num_steps", "auto") == "auto":
        return [
            f"scheduler.params.warmup_num_steps=auto is filled from optim.warmup_steps={cfg.optim.warmup_steps}, but DeepSpeed's "
            f"{ds['scheduler']['type']} needs at least 1 warmup step; set optim.warmup_steps (e.g. optim.warmup_steps=5)"
        ]
    return [f"scheduler.params.warmup_num_steps={_json(params['warmup_num_steps'])}: DeepSpeed's {ds['scheduler']['type']} needs at least 1 warmup step; set it (or optim.warmup_steps) to 1 or more"]


def _one_line(problems: list[str], source: str) -> str:
    """One problem as `SOURCE problem`; several numbered on one line, so a single run shows them all."""
    if len(problems) == 1:
        return f"{source} {problems[0]}"
    return f"{source}: {len(problems)} problems: " + "; ".join(f"{i}) {p}" for i, p in enumerate(problems, 1))


def _reconcile(ds: dict, dotted: str, value: Any, origin: str, source: str) -> Optional[str]:
    given = _get(ds, dotted)
    given = "auto" if given is None else given
    if given == "auto" or _same(given, value):
        _set(ds, dotted, value)
        return None
    return f"{dotted}={json.dumps(given)} but dist_train derives {json.dumps(value)} from {origin}; remove {dotted} from {source} or set it to \"auto\""


# ---------------------------------------------------------------- small helpers


def _config_value(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _set_config_value(cfg: Config, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = cfg
    for part in parents:
        node = getattr(node, part)
    setattr(node, leaf, float(value) if isinstance(getattr(node, leaf), float) and _is_number(value) else value)


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _pop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree[part]
    tree.pop(leaf, None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(given: Any, value: Any) -> bool:
    if isinstance(value, bool) or isinstance(given, bool):
        return given is value
    if _is_number(given) and _is_number(value):
        return math.isclose(float(given), float(value), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(given, (list, tuple)) and isinstance(value, (list, tuple)):
        return len(given) == len(value) and all(_same(a, b) for a, b in zip(given, value))
    return isinstance(given, str) and given == value


def _json(value: Any) -> str:
    return json.dumps(value)


def _show(value: Any) -> str:
    """A value as it is written in a `key=value` override."""
    return value if isinstance(value, str) else json.dumps(value)


def _auto_keys(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if tree == "auto" else []
