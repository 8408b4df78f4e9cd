"""The tutorial models, registered by name, plus user models by import path.

Models are plain nn.Modules: nothing here knows about ranks, devices or wrappers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from .tutorial import CNN, MLP, LeNet, LinearRegression, TwoLayerNet, resnet18


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of dist_train needs to know about a model: its input and its task."""

    name: str
    input_shape: tuple[int, ...]
    task: str  # "classification" | "regression"
    num_outputs: int


@dataclass(frozen=True)
class _Entry:
    build: Callable[[ModelConfig], nn.Module]
    input_shape: Callable[[ModelConfig], tuple[int, ...]]
    task: str
    num_outputs: Callable[[ModelConfig], int]


MODELS: dict[str, _Entry] = {
    "linear_regression": _Entry(lambda c: LinearRegression(), lambda c: (1,), "regression", lambda c: 1),
    "two_layer_net": _Entry(lambda c: TwoLayerNet(), lambda c: (1000,), "regression", lambda c: 10),
    "mlp": _Entry(lambda c: MLP(c.num_classes), lambda c: (1, 28, 28), "classification", lambda c: c.num_classes),
    "cnn": _Entry(lambda c: CNN(c.num_classes), lambda c: (1, 28, 28), "classification", lambda c: c.num_classes),
    "lenet": _Entry(lambda c: LeNet(c.num_classes), lambda c: (1, 32, 32), "classification", lambda c: c.num_classes),
    "resnet18": _Entry(
        lambda c: resnet18(c.num_classes, c.freeze_backbone, c.weights),
        lambda c: (3, c.image_size or 32, c.image_size or 32),
        "classification",
        lambda c: c.num_classes,
    ),
}


def model_spec(cfg: ModelConfig) -> ModelSpec:
    if ":" in cfg.name:
        return ModelSpec(cfg.name, tuple(cfg.input_shape or ()), cfg.task or "classification", cfg.num_classes)
    entry = _entry(cfg)
    return ModelSpec(cfg.name, entry.input_shape(cfg), entry.task, entry.num_outputs(cfg))


def build_model(cfg: ModelConfig) -> nn.Module:
    """Builds the model on the CPU with the current torch RNG (seed it first for identical replicas)."""
    if ":" in cfg.name:
        return _import_model(cfg)
    if cfg.weights and cfg.name != "resnet18":
        model = _entry(cfg).build(cfg)
        load_weights(model, cfg.weights)
        return model
    return _entry(cfg).build(cfg)


def _entry(cfg: ModelConfig) -> _Entry:
    try:
        return MODELS[cfg.name]
    except KeyError:
        names = ", ".join(MODELS)
        raise ConfigError(f"model.name={cfg.name} is not a registered model; use one of {names} or 'package.module:ClassName'") from None


def _import_model(cfg: ModelConfig) -> nn.Module:
    module_name, _, class_name = cfg.name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model.name={cfg.name}: cannot import module {module_name} ({e})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"model.name={cfg.name}: module {module_name} has no attribute {class_name}")
    try:
        model = cls(**cfg.kwargs)
    except TypeError as e:
        raise ConfigError(f"model.kwargs do not fit {cfg.name}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name={cfg.name} built a {type(model).__name__}, not a torch.nn.Module")
    if cfg.weights:
        load_weights(model, cfg.weights)
    return model


def load_weights(model: nn.Module, path: str, strict: bool = True) -> None:
    """A state_dict file, or the tutorial's checkpoint dict (`export --tutorial-dict`): its model_state_dict."""
    state = _read_weights(path)
    if _is_tutorial_dict(state):
        state = state["model_state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ConfigError(
            f"model.weights={path} does not fit {type(model).__name__}: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )


def describe_weights(path: str) -> str:
    """What a fresh start takes from model.weights, for the model line at start."""
    state = _read_weights(path)
    if not _is_tutorial_dict(state):
        return f"weights loaded from {path}"
    has_optimizer = state.get("optimizer_state_dict") is not None
    return (
        f"weights loaded from {path}, a tutorial checkpoint dict (epoch {state.get('epoch')}, loss {state.get('loss')}): its "
        f"model_state_dict{'; its optimizer_state_dict is not used' if has_optimizer else ''}, as a fresh start builds "
        "the optimizer and the LR schedule from optim.*"
    )


def _read_weights(path: str) -> object:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model.weights={path} does not exist; give a local state_dict file (nothing is downloaded)")
    return torch.load(file, map_location="cpu", weights_only=True)


def _is_tutorial_dict(state: object) -> bool:
    return isinstance(state, dict) and "model_state_dict" in state


__all__ = ["MODELS", "ModelSpec", "build_model", "describe_weights", "model_spec", "load_weights"]
