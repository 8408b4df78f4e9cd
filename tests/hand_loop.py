"""The hand-written tutorial loop, the reference every strategy's training is compared with."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.nn import functional as F

from dist_train.config import load_config
from dist_train.data import GlobalBatchPlan, load_source
from dist_train.data.transforms import adapt_images
from dist_train.models import build_model, model_spec
from dist_train.trainer import seed_everything
from tests.procs import REPO


def tutorial_loop(preset: str, overrides: list[str], batch_size: int, steps: int, clip: Optional[float] = None) -> dict[str, torch.Tensor]:
    """zero_grad, loss.backward, (clip_grad_norm_,) step on the same global batches as the trainer, one process."""
    cfg = load_config(REPO / "configs" / preset, overrides)
    spec = model_spec(cfg.model)
    source = load_source(cfg.data, spec)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    order = GlobalBatchPlan(len(source.train), batch_size, cfg.train.seed).epoch_order(0)
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        loss = F.cross_entropy(model(adapt_images(source.train.inputs[idx], spec.input_shape)), source.train.targets[idx])
        optimizer.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return model.state_dict()


TUTORIAL_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def tutorial_continue(preset: str, overrides: list[str], checkpoint: Path, batch_size: int, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The tutorial's "saving and loading a general checkpoint", then its loop: build the model and the
    optimizer (any lr: load_state_dict sets it), load both from the dict, model.train(), and zero_grad /
    loss.backward / step on the next epoch's global batches, no scheduler. (losses, final weights)."""
    cfg = load_config(REPO / "configs" / preset, overrides)
    spec = model_spec(cfg.model)
    source = load_source(cfg.data, spec)
    model = build_model(cfg.model)
    optimizer = TUTORIAL_OPTIMIZERS[cfg.optim.name](model.parameters(), lr=1e-3)
    saved = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(saved["model_state_dict"])
    optimizer.load_state_dict(saved["optimizer_state_dict"])
    epoch = saved["epoch"]
    model.train()
    order = GlobalBatchPlan(len(source.train), batch_size, cfg.train.seed).epoch_order(epoch)
    losses = []
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        loss = F.cross_entropy(model(adapt_images(source.train.inputs[idx], spec.input_shape)), source.train.targets[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model.state_dict()
