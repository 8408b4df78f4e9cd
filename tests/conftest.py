"""Shared fixtures: each test gets a clean environment (no launcher variables) and no process group."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environment(monkeypatch):
    from .procs import LAUNCHER_PREFIXES

    for key in list(os.environ):
        if key.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(key, raising=False)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session", autouse=True)
def _digits_shards():
    """The digits presets train from data/digits shards, as `make demo` does; a no-op once they are there."""
    from dist_train.cli import main

    from .procs import REPO

    assert main(["data", "prepare", "--source", "digits", "--out", str(REPO / "data" / "digits")]) == 0
