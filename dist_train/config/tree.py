"""The typed config tree: YAML preset + `section.key=value` overrides -> validated dataclasses.

Every field carries a one-line `help` that doubles as documentation (`dist-train config --help-keys`).
Validation errors are `ConfigError`s whose message names the key and what to set it to; the CLI prints
them as one line and exits 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config problem the user fixes by editing a key; the message names that key."""


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = _f("cnn", "registered model (linear_regression, two_layer_net, mlp, cnn, lenet, resnet18) or 'package.module:ClassName'")
    kwargs: dict = _f({}, "keyword arguments for a model given by import path")
    num_classes: int = _f(10, "output classes of classifiers (resnet18 gets a new fc of this size)")
    input_shape: Optional[list] = _f(None, "input shape without batch, e.g. [1, 28, 28]; needed only for models given by import path")
    task: Optional[Literal["classification", "regression"]] = _f(None, "loss/metrics family; needed only for models given by import path")
    freeze_backbone: bool = _f(False, "resnet18: train only the new fc layer (the tutorial's fixed feature extractor)")
    weights: Optional[str] = _f(None, "local file with pretrained weights (a state_dict); never downloaded at run time")
    image_size: Optional[int] = _f(None, "resnet18: input height/width (default 32 on digits, 224 in the tutorial)")
    loss: Optional[str] = _f(None, "'package.module:function' computing loss(outputs, batch); default: the model's own loss(outputs, batch) method, else cross-entropy / MSE by model.task")


@dataclass
class DataConfig:
    source: str = _f("digits", "digits | synthetic_linear | random | fashion_mnist | mnist | cifar10 | image_folder | shards, or 'package.module:function' returning (train, eval) map-style datasets")
    path: Optional[str] = _f(None, "dataset root (torchvision formats, image folder); source=shards: what `data prepare` or `data index` wrote, or a folder of webdataset tars (indexed on first use into data.cache_dir)")
    download: bool = _f(False, "torchvision sources: download into data.path when missing (needs network)")
    num_samples: int = _f(1024, "synthetic_linear / random: number of generated samples")
    test_fraction: float = _f(0.2, "digits, synthetic and image folder: held-out fraction for evaluation")
    num_workers: int = _f(0, "DataLoader worker processes per rank")
    shuffle: bool = _f(True, "shuffle the training order every epoch (deterministic in train.seed and the epoch)")
    shuffle_window: int = _f(1024, "source=shards: the epoch's stream (shards in a seeded order) is shuffled inside consecutive blocks of this many samples; `data prepare` shuffles across the whole split")
    skip_bad_samples: bool = _f(False, "source=shards: skip (and count) bad samples (undecodable, wrong shape or dtype, label outside the classes, NaN/inf) instead of stopping every rank")
    cache_dir: Optional[str] = _f(None, "source=shards: node-local folder where remote shards (http(s)://, pipe:) are downloaded once per node, verified against the manifest's sha256, and shared by the node's ranks and workers")
    cache_max_bytes: int = _f(50 * 2**30, "source=shards: data.cache_dir's size limit; the least recently used shards are evicted beyond it")
    shard_urls: Optional[str] = _f(None, "source=shards: read shards from here instead of data.path/{split}/ (manifests stay in data.path): a brace pattern of paths, http(s):// URLs or a pipe: command, {split} = train|test, e.g. 'https://host/d/{split}/{split}-{000000..000005}.tar'")
    fields: dict = _f({}, "source=shards on webdataset shards dist_train did not write: the member that is the input and the one holding the label, where webdataset's conventions (jpg/jpeg/png/webp/ppm/pgm or npy input; cls/label/target, or a json member's label) don't find them, e.g. {input: seg.png, target: 'json:category'}; fixed when the index is built")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = _f("sgd", "torch.optim.SGD, Adam or AdamW; a DeepSpeed JSON's optimizer.type Adam and AdamW are adamw unless \"adam_w_mode\": false")
    lr: float = _f(0.01, "peak learning rate")
    momentum: float = _f(0.0, "SGD momentum")
    weight_decay: float = _f(0.0, "weight decay")
    betas: list = _f([0.9, 0.999], "Adam/AdamW betas")
    schedule: Literal["constant", "cosine", "linear", "step", "warmup_lr", "warmup_decay_lr"] = _f(
        "constant",
        "LR schedule after warmup; warmup_lr and warmup_decay_lr are DeepSpeed's WarmupLR (warmup, then constant) and "
        "WarmupDecayLR (warmup, then linear decay over the planned steps) step for step, from optim.min_lr_ratio x optim.lr",
    )
    warmup_steps: int = _f(0, "warmup length in optimizer steps (linear; warmup_lr / warmup_decay_lr: at least 1, curve by optim.warmup_type)")
    warmup_type: Literal["linear", "log"] = _f("linear", "warmup_lr / warmup_decay_lr: DeepSpeed's warmup_type, linear or log (DeepSpeed's default, so a JSON scheduler without it means log)")
    step_size: int = _f(1000, "schedule=step: optimizer steps between decays")
    gamma: float = _f(0.1, "schedule=step: decay factor")
    min_lr_ratio: float = _f(0.0, "cosine/linear: final lr as a fraction of optim.lr; warmup_lr / warmup_decay_lr: where the warmup starts (and the decay ends), DeepSpeed's warmup_min_lr / warmup_max_lr")


@dataclass
class TrainConfig:
    global_batch_size: int = _f(64, "samples per optimizer step over all ranks; accumulation is derived from it")
    micro_batch_size: int = _f(32, "samples per forward/backward on one rank")
    epochs: int = _f(1, "passes over the training split")
    max_steps: Optional[int] = _f(None, "stop after this many optimizer steps (overrides epochs when reached first)")
    grad_clip: Optional[float] = _f(None, "clip the global gradient norm to this value; null disables")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "fp32, bf16 autocast, or fp16 autocast with loss scaling")
    seed: int = _f(0, "seed for model init, data order and every rank's RNG")
    eval_interval: int = _f(0, "evaluate every N optimizer steps; 0 = at the end of every epoch")
    log_interval: int = _f(10, "log every N optimizer steps")
    straggler_warn_skew: float = _f(1.5, "warn when one rank's data + forward time is this many times the median rank's at 3 log steps in a row; 0: never")
    resume: Optional[str] = _f(None, "'auto' = continue this output_dir's run from its newest checkpoint, or a checkpoint path (first start only: restarts continue from the newest)")
    start_over: bool = _f(False, "start a new run in an output_dir that holds another run: its files are moved to output_dir/previous/, never deleted")
    stop_at_step: Optional[int] = _f(None, "stop after this optimizer step, saving a checkpoint, as a preemption would (the LR schedule is unchanged)")
    progress_bar: bool = _f(True, "tqdm progress bar on the main process")
    max_consecutive_skipped_steps: int = _f(25, "fp16: this many optimizer steps in a row skipped by the loss scaler count as divergence")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms for bitwise-reproducible runs")
    preemption_signal: str = _f("SIGUSR2", "signal that asks for checkpoint + stop (+ requeue under Slurm), besides SIGTERM/SIGINT; match sbatch --signal (not USR1: NCCL may use it)")


@dataclass
class CheckpointConfig:
    interval_steps: int = _f(0, "save every N optimizer steps; 0 = only at the end")
    interval_seconds: float = _f(0.0, "also save when this many seconds passed since the last save; 0 = off")
    keep_latest: int = _f(3, "complete checkpoints to keep; older ones are deleted after a new one is complete")
    async_save: bool = _f(False, "DDP: write the checkpoint in the background while training continues")
    save_at_end: bool = _f(True, "save a checkpoint when training finishes")


@dataclass
class DDPConfig:
    find_unused_parameters: bool = _f(False, "set when some parameters get no gradient in a step")
    sync_batchnorm: bool = _f(False, "on CUDA: BatchNorm statistics over the whole global micro-batch (SyncBatchNorm) instead of per rank")


@dataclass
class FSDP2Config:
    reshard_after_forward: bool = _f(True, "free each block's gathered parameters after its forward (less memory, one more all-gather in backward)")
    cpu_offload: bool = _f(False, "on CUDA: keep sharded parameters, gradients and optimizer state in CPU memory")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _f(2, "ZeRO stage 1, 2 or 3")
    config: Optional[str] = _f(None, "DeepSpeed JSON passed through (configs/deepspeed/*.json)")


@dataclass
class StrategyConfig:
    name: Literal["ddp", "fsdp2", "deepspeed"] = _f("ddp", "ddp (also plain single process), fsdp2 (torch's fully_shard) or deepspeed; each has its own section below")
    backend: Optional[Literal["nccl", "gloo"]] = _f(None, "process group backend; default nccl on CUDA (with cpu:gloo beside it where CPU tensors are reduced), gloo on CPU")
    timeout_seconds: float = _f(1800.0, "collective timeout: a rank that stops answering fails the job after this")
    hang_timeout_seconds: float = _f(300.0, "a rank that makes no progress this long once training is steady is named (rank, step, phase, stack) and the job exits 75 to retry from the newest checkpoint; 0 turns the watchdog off")
    startup_timeout_seconds: float = _f(900.0, "the same limit for start-up, the first optimizer step, evaluation, checkpoint saves and the end of the run")
    ddp: DDPConfig = _section(DDPConfig, "strategy.name=ddp")
    fsdp2: FSDP2Config = _section(FSDP2Config, "strategy.name=fsdp2")
    deepspeed: DeepSpeedConfig = _section(DeepSpeedConfig, "strategy.name=deepspeed")


@dataclass
class WandbConfig:
    enabled: bool = _f(False, "log to Weights & Biases (offline unless WANDB_API_KEY is set)")
    project: str = _f("dist_train", "W&B project")
    entity: Optional[str] = _f(None, "W&B entity (team or user)")
    run_name: Optional[str] = _f(None, "W&B run name; default: the output directory's name")
    tags: list = _f([], "W&B tags")
    mode: Optional[Literal["online", "offline", "disabled"]] = _f(None, "force a W&B mode; default offline without an API key")
    dir: Optional[str] = _f(None, "folder W&B writes its wandb/ run files into; default output_dir")
    init_timeout_seconds: float = _f(60.0, "give up connecting to W&B after this long (online falls back to offline)")


@dataclass
class TensorboardConfig:
    enabled: bool = _f(False, "write TensorBoard event files into output_dir/tensorboard")


@dataclass
class TrackingConfig:
    wandb: WandbConfig = _section(WandbConfig, "Weights & Biases")
    tensorboard: TensorboardConfig = _section(TensorboardConfig, "TensorBoard")


@dataclass
class Config:
    model: ModelConfig = _section(ModelConfig, "which model to train")
    data: DataConfig = _section(DataConfig, "where samples come from")
    optim: OptimConfig = _section(OptimConfig, "optimizer and LR schedule")
    train: TrainConfig = _section(TrainConfig, "the loop: batch arithmetic, precision, length")
    checkpoint: CheckpointConfig = _section(CheckpointConfig, "when and how checkpoints are written")
    strategy: StrategyConfig = _section(StrategyConfig, "distributed backend")
    tracking: TrackingConfig = _section(TrackingConfig, "experiment tracking")
    output_dir: str = _f("runs/default", "run directory: resolved config, checkpoints, logs, final model")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- loading


def load_config(path: Optional[str | Path] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Preset YAML (optional) + `a.b=value` overrides -> validated Config."""
    return config_from_dict(raw_config(path, overrides))


def raw_config(path: Optional[str | Path] = None, overrides: typing.Sequence[str] = ()) -> dict:
    """The preset merged with the overrides, before defaults are filled in."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML preset such as configs/cnn_digits.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    return raw


# Keys whose value is a mapping of the user's own (not a section): one leaf each, compared and hashed whole.
MAPPING_LEAVES = frozenset({"model.kwargs", "data.fields"})


def explicit_keys(raw: dict, prefix: str = "") -> set[str]:
    """Dotted keys a raw config sets (as opposed to defaults); launchers' settings may fill only the others."""
    keys = set()
    for key, value in raw.items():
        keys.add(prefix + key)
        if isinstance(value, dict) and prefix + key not in MAPPING_LEAVES:
            keys |= explicit_keys(value, prefix + key + ".")
    return keys


def config_from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.epochs=3)")
    key, value_text = item.split("=", 1)
    try:
        value = yaml.safe_load(value_text) if value_text != "" else None
    except yaml.YAMLError:
        value = value_text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


RENAMED_KEYS = {
    "data.shuffle_buffer": "data.shuffle_window (the same number: a fixed block of the stream shuffled in place, not a sampling buffer)",
    # Each strategy has its own section since the process-groups issue (#21).
    "strategy.find_unused_parameters": "strategy.ddp.find_unused_parameters",
    "strategy.sync_batchnorm": "strategy.ddp.sync_batchnorm",
    "strategy.reshard_after_forward": "strategy.fsdp2.reshard_after_forward",
    "strategy.cpu_offload": "strategy.fsdp2.cpu_offload",
    "strategy.zero_stage": "strategy.deepspeed.zero_stage",
    "strategy.deepspeed_config": "strategy.deepspeed.config",
}


def upgrade_saved_config(raw: dict) -> dict:
    """A config recorded by an older dist_train (a checkpoint's meta.json) with its renamed keys moved to
    where they live now, so a resume compares like with like; the argument is not changed."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for old, new in RENAMED_KEYS.items():
        new_key = new.split(" ", 1)[0]
        *old_parents, old_leaf = old.split(".")
        parent = tree
        for part in old_parents:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or old_leaf not in parent:
            continue
        value = parent.pop(old_leaf)
        *new_parents, new_leaf = new_key.split(".")
        node = tree
        for part in new_parents:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node.setdefault(new_leaf, value)
    return tree


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = prefix + unknown[0]
        if key in RENAMED_KEYS:
            raise ConfigError(f"config key '{key}' was renamed: use {RENAMED_KEYS[key]}")
        known = ", ".join(prefix + k for k in fields)
        nearest = nearest_keys(key, raw[unknown[0]])
        hint = f"did you mean {' or '.join(nearest)}? " if nearest else ""
        raise ConfigError(f"unknown config key '{key}'; {hint}known keys here: {known}")
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, prefix + name)
    return cls(**values)


def nearest_keys(key: str, value: Any = None) -> list[str]:
    """The known keys closest to a misspelt one (at most two); a misspelt section is matched by the keys set
    under it (`trian.max_steps=5` -> train.max_steps)."""
    typed = [f"{key}.{leaf}" for leaf in sorted(explicit_keys(value)) if not isinstance(_get_raw(value, leaf), dict)] if isinstance(value, dict) else [key]
    found: list[str] = []
    for name in typed:
        scored = sorted(((difflib.SequenceMatcher(None, name, k).ratio(), k) for k in all_keys()), reverse=True)
        # A second key only when it is about as close as the first (optim.warmup: warmup_steps, warmup_type).
        found += [k for score, k in scored[:2] if score >= 0.6 and score >= scored[0][0] - 0.05 and k not in found]
    return found[:2]


def _get_raw(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            choices = " | ".join(str(a) for a in args)
            raise ConfigError(f"{key}={value!r} is not allowed; set {key} to one of: {choices}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 3e-4 as a string: it wants a dot (3.0e-4); Python's float does not.
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and math.isfinite(number):
                return number
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{key} must be a list, got {value!r}")
    return value


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Checks that need no knowledge of the world size (that one lives in `batch_arithmetic`)."""
    t = cfg.train
    if t.micro_batch_size <= 0:
        raise ConfigError(f"train.micro_batch_size must be positive, got {t.micro_batch_size}")
    if t.global_batch_size <= 0:
        raise ConfigError(f"train.global_batch_size must be positive, got {t.global_batch_size}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
            f"{t.micro_batch_size}; set train.global_batch_size to a multiple of {t.micro_batch_size}"
        )
    if t.epochs <= 0 and t.max_steps is None:
        raise ConfigError("train.epochs must be positive (or set train.max_steps)")
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"train.max_steps must be positive, got {t.max_steps}")
    if t.stop_at_step is not None and t.stop_at_step <= 0:
        raise ConfigError(f"train.stop_at_step must be positive or null, got {t.stop_at_step}")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise ConfigError(f"train.grad_clip must be positive or null, got {t.grad_clip}")
    if t.log_interval <= 0:
        raise ConfigError(f"train.log_interval must be positive, got {t.log_interval}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {cfg.optim.lr}")
    _validate_schedule(cfg.optim)
    if not 0.0 < cfg.data.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction must be between 0 and 1, got {cfg.data.test_fraction}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    if cfg.strategy.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"strategy.deepspeed.zero_stage must be 1, 2 or 3, got {cfg.strategy.deepspeed.zero_stage}")
    if t.max_consecutive_skipped_steps < 1:
        raise ConfigError(f"train.max_consecutive_skipped_steps must be at least 1, got {t.max_consecutive_skipped_steps}")
    if cfg.checkpoint.keep_latest < 1:
        raise ConfigError(f"checkpoint.keep_latest must be at least 1, got {cfg.checkpoint.keep_latest}")
    if ":" in cfg.model.name and (cfg.model.input_shape is None or cfg.model.task is None):
        raise ConfigError(
            f"model.name={cfg.model.name} is an import path; also set model.input_shape (e.g. [1,28,28]) "
            "and model.task (classification or regression)"
        )


DEEPSPEED_SCHEDULES = ("warmup_lr", "warmup_decay_lr")


def _validate_schedule(optim: OptimConfig) -> None:
    if optim.schedule in DEEPSPEED_SCHEDULES and optim.warmup_steps < 1:
        raise ConfigError(
            f"optim.schedule={optim.schedule} is DeepSpeed's {'WarmupLR' if optim.schedule == 'warmup_lr' else 'WarmupDecayLR'}, "
            f"which refuses a warmup of {optim.warmup_steps} steps; set optim.warmup_steps to at least 1 (e.g. optim.warmup_steps=5)"
        )
    if optim.warmup_type == "log" and optim.schedule not in DEEPSPEED_SCHEDULES:
        raise ConfigError(
            f"optim.warmup_type=log is the curve of DeepSpeed's schedules; with optim.schedule={optim.schedule} the warmup is "
            "linear: set optim.warmup_type=linear, or optim.schedule=warmup_lr / warmup_decay_lr"
        )


@dataclass(frozen=True)
class BatchArithmetic:
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    grad_accum_steps: int

    @property
    def per_rank_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch_size} = micro batch {self.micro_batch_size} x "
            f"{self.world_size} ranks x {self.grad_accum_steps} accumulation steps"
        )


def batch_arithmetic(train: TrainConfig, world_size: int) -> BatchArithmetic:
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by train.micro_batch_size="
            f"{train.micro_batch_size} x world size {world_size} = {per_step}; set train.global_batch_size "
            f"to a multiple of {per_step} or change train.micro_batch_size"
        )
    return BatchArithmetic(train.global_batch_size, train.micro_batch_size, world_size, train.global_batch_size // per_step)


def leaf_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """(dotted key, field) for every leaf of the tree, in declaration order (model.kwargs, data.fields: one leaf each)."""
    for key, f, _ in _leaves(cls, prefix):
        yield key, f


def _leaves(cls: type, prefix: str) -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name, f, hints[f.name]


def all_keys() -> list[str]:
    return [key for key, _ in leaf_fields()]


def describe_keys() -> list[str]:
    """`key (default): help` lines for every field, for --help output."""
    lines = []
    for key, f, tp in _leaves(Config, ""):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {key} (default {default!r}{_choices(tp)}): {f.metadata.get('help', '')}")
    return lines


def _choices(tp: Any) -> str:
    """'; one of a | b' for a key whose type is a set of literal values (an Optional one too)."""
    literal = tp if typing.get_origin(tp) is Literal else next((a for a in typing.get_args(tp) if typing.get_origin(a) is Literal), None)
    return f"; one of {' | '.join(str(a) for a in typing.get_args(literal))}" if literal is not None else ""
