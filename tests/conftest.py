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


def pytest_addoption(parser):
    parser.addoption("--gpu-tests-on-cpu", action="store_true", help="run the gpu-marked tests on CPU (to debug their bodies)")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped here on CPU-only machines, run by `make gpu-check` on a GPU."""
    import torch

    if torch.cuda.is_available() or config.getoption("--gpu-tests-on-cpu"):
        return
    skip = pytest.mark.skip(reason="needs CUDA (make gpu-check runs it on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
