"""What happens to each config key when a run resumes with a different value.

Every key of the config tree has exactly one entry (a test enforces it), so no change is ever silently
ignored:

  applied     the new value is used from the resumed step on, and the change is printed
  replanned   the new value is used and what depends on it is recomputed from the current step
              (accumulation steps, the number of planned steps, the LR curve); printed
  refused     the checkpoint's state or the data position cannot honour it: resuming stops with one line
              naming the key and both values

The keys that are refused are also the ones that define a run: `fingerprint` hashes them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..config import Config, ConfigError, all_keys, upgrade_saved_config
from ..config.tree import MAPPING_LEAVES

APPLIED, REPLANNED, REFUSED = "applied", "replanned", "refused"

# Longest matching prefix wins. The note says what the change does (applied/replanned) or why it can't (refused).
RESUME_SEMANTICS: dict[str, tuple[str, str]] = {
    "model": (REFUSED, "the checkpoint holds this model's tensors"),
    "model.loss": (APPLIED, "the objective from the resumed step on; the weights are the checkpoint's"),
    "model.weights": (APPLIED, "read only by a fresh start; a resume continues from the checkpoint's weights"),
    "data.source": (REFUSED, "the data position counts samples of this source"),
    "data.path": (APPLIED, "the split must have the same number of samples (checked)"),
    "data.shard_urls": (APPLIED, "the shards must match the manifest (checked)"),
    "data.download": (APPLIED, ""),
    "data.num_samples": (REFUSED, "the data position counts samples of the generated split"),
    "data.test_fraction": (REFUSED, "it changes which samples are in the training split"),
    "data.num_workers": (APPLIED, "the order does not depend on the worker count"),
    "data.shuffle": (REFUSED, "the rest of this epoch follows the checkpoint's order"),
    "data.shuffle_window": (REFUSED, "the rest of this epoch follows the checkpoint's order"),
    "data.cache_dir": (APPLIED, "a cache only holds verified copies of the shards"),
    "data.cache_max_bytes": (APPLIED, ""),
    "data.skip_bad_samples": (APPLIED, ""),
    "data.fields": (REFUSED, "it decides what each sample's input and label are"),
    "optim.name": (REFUSED, "the optimizer state belongs to this optimizer"),
    "optim.lr": (APPLIED, "the new peak LR takes effect at the resumed step, on the same schedule position"),
    "optim.momentum": (APPLIED, "set in every parameter group"),
    "optim.weight_decay": (APPLIED, "set in every parameter group"),
    "optim.betas": (APPLIED, "set in every parameter group"),
    "optim.schedule": (REPLANNED, "the LR curve is recomputed at the resumed step"),
    "optim.warmup_steps": (REPLANNED, "the LR curve is recomputed at the resumed step"),
    "optim.warmup_type": (REPLANNED, "the LR curve is recomputed at the resumed step"),
    "optim.step_size": (REPLANNED, "the LR curve is recomputed at the resumed step"),
    "optim.gamma": (REPLANNED, "the LR curve is recomputed at the resumed step"),
    "optim.min_lr_ratio": (REPLANNED, "the LR curve is recomputed at the resumed step"),
    "train.global_batch_size": (REFUSED, "the data position and the LR schedule count global batches"),
    "train.micro_batch_size": (REPLANNED, "accumulation steps are derived again; the global batch is unchanged"),
    "train.epochs": (REPLANNED, "planned steps and the LR schedule's length are recomputed"),
    "train.max_steps": (REPLANNED, "planned steps and the LR schedule's length are recomputed"),
    "train.grad_clip": (APPLIED, ""),
    "train.precision": (APPLIED, "weights and optimizer state are fp32 in every precision"),
    "train.max_consecutive_skipped_steps": (APPLIED, ""),
    "train.seed": (REFUSED, "the data order of every epoch is a function of the seed"),
    "train": (APPLIED, ""),  # eval/log intervals, resume, start_over, stop_at_step, progress bar, deterministic, signal
    "checkpoint": (APPLIED, ""),
    "strategy.name": (APPLIED, "model and optimizer state are loaded by parameter name: DDP and FSDP2 read each other's DCP files, a DeepSpeed checkpoint is converted once into DCP beside it (strategies/zero_bridge.py)"),
    "strategy.deepspeed.zero_stage": (APPLIED, "a checkpoint of another stage (or world size) is loaded by parameter name through its DCP view"),
    "strategy": (APPLIED, ""),
    "tracking": (APPLIED, ""),
    "output_dir": (APPLIED, ""),
}


# Keys that steer this one invocation (where to resume from, where to stop): their changes are expected.
INVOCATION_KEYS = frozenset({"train.resume", "train.start_over", "train.stop_at_step"})


def semantics_of(key: str) -> tuple[str, str]:
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = RESUME_SEMANTICS.get(".".join(parts[:end]))
        if found is not None:
            return found
    raise KeyError(f"{key} has no resume semantics")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in MAPPING_LEAVES:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fingerprint(cfg: Config) -> str:
    """A short hash of the keys that define a run (those a resume refuses to change)."""
    flat = _flatten(cfg.to_dict())
    defining = {k: flat[k] for k in sorted(flat) if semantics_of(k)[0] == REFUSED}
    return hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_changes(saved_config: dict, cfg: Config, source: str) -> list[str]:
    """Lines describing each key that differs from the checkpoint's config (applied or replanned);
    ConfigError naming the key and both values for the first refused one. `source` names the checkpoint."""
    then, now = _flatten(upgrade_saved_config(saved_config)), _flatten(cfg.to_dict())
    lines = []
    for key in all_keys():
        if key not in then or then[key] == now.get(key) or key in INVOCATION_KEYS:
            continue  # a key the checkpoint's version did not have keeps its default meaning
        kind, note = semantics_of(key)
        old, new = _show(then[key]), _show(now.get(key))
        if kind == REFUSED:
            raise ConfigError(
                f"checkpoint {source} was written with {key}={old}, this run has {key}={new}; a resume cannot change it "
                f"({note}): set {key}={old}, or start a new run in another output_dir"
            )
        lines.append(f"{key}: {old} -> {new} ({kind}{': ' + note if note else ''})")
    return lines


def _show(value: Any) -> str:
    """A value as it is written in a `key=value` override."""
    return value if isinstance(value, str) else json.dumps(value)
