"""Optimizer and LR schedule from `optim.*`."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def build_optimizer(cfg: OptimConfig, model: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """`fused=True` asks for torch's fused kernels, which take GradScaler's found-inf flag on the device and
    skip an overflowing step there; the unfused ones make GradScaler.step read the flag on the host (a sync
    every step). Falls back to the unfused optimizer where this torch has no fused kernel for the params."""
    params = [p for p in model.parameters() if p.requires_grad]
    if fused:
        try:
            return _optimizer(cfg, params, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return _optimizer(cfg, params)


def _optimizer(cfg: OptimConfig, params: list, **kwargs: bool) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kwargs)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kwargs)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kwargs)


def lr_factor(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if cfg.schedule in ("warmup_lr", "warmup_decay_lr"):
        return deepspeed_warmup_factor(cfg, step, total_steps)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** ((step - cfg.warmup_steps) // max(cfg.step_size, 1))
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def deepspeed_warmup_factor(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """DeepSpeed's WarmupLR / WarmupDecayLR (deepspeed/runtime/lr_schedules.py), with warmup_max_lr = optim.lr,
    warmup_min_lr = optim.min_lr_ratio x optim.lr, warmup_num_steps = optim.warmup_steps, total_num_steps = the
    planned steps. DeepSpeed's scheduler starts at iteration -1 (the warmup's start) and is stepped after every
    optimizer step, so optimizer step `step` runs at iteration step - 1: the first two steps both run at the
    start LR, as they do under DeepSpeed."""
    iteration = step - 1
    warmup = max(2, cfg.warmup_steps)  # DeepSpeed's own floor
    if iteration < 0:
        gamma = 0.0
    elif iteration < warmup:
        gamma = math.log(iteration + 1) / math.log(warmup) if cfg.warmup_type == "log" else iteration / warmup
    elif cfg.schedule == "warmup_decay_lr":
        gamma = max(0.0, (total_steps - iteration) / max(1.0, total_steps - warmup))
    else:
        gamma = 1.0
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * gamma


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    # A LambdaLR's state_dict holds only its step count, so it checkpoints and resumes exactly.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total_steps))


def apply_hyperparameters(cfg: OptimConfig, optimizer: torch.optim.Optimizer, scheduler: object) -> None:
    """After a resume: the config's LR and optimizer settings replace the ones the checkpoint restored.

    The LR takes effect at the next optimizer step, at the schedule's current position (the scheduler's
    step count is kept). Every run's scheduler is this LambdaLR: a DeepSpeed JSON's WarmupLR / WarmupDecayLR
    runs as optim.schedule=warmup_lr / warmup_decay_lr (config/deepspeed_json.py).
    """
    for group in optimizer.param_groups:
        for key, value in (("weight_decay", cfg.weight_decay), ("momentum", cfg.momentum), ("betas", tuple(cfg.betas))):
            if key in group:
                group[key] = value
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
