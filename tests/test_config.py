"""The config tree: presets load, overrides apply, bad input is one clear line naming the key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dist_train.config import ConfigError, batch_arithmetic, load_config
from tests.procs import REPO, run

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_documents_its_launch(preset: Path):
    cfg = load_config(preset)
    head = preset.read_text().splitlines()[0:8]
    assert any("Launch" in line for line in head), f"{preset.name} must start with its launch command"
    assert any("Batch" in line for line in head), f"{preset.name} must state its batch arithmetic"
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


def test_overrides_are_typed_and_nested():
    cfg = load_config(REPO / "configs/cnn_digits.yaml", ["train.epochs=3", "optim.lr=0.5", "train.grad_clip=1", "model.name=mlp", "tracking.wandb.tags=[a, b]"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.5 and cfg.train.grad_clip == 1.0
    assert cfg.model.name == "mlp" and cfg.tracking.wandb.tags == ["a", "b"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epoch=3", "unknown config key 'train.epoch'"),
        ("train.epochs=three", "train.epochs must be an integer"),
        ("train.precision=fp8", "set train.precision to one of: fp32 | bf16 | fp16"),
        ("train.global_batch_size=48", "train.global_batch_size=48 is not divisible by train.micro_batch_size=32"),
        ("strategy.name=horovod", "strategy.name"),
        ("bogus=1", "unknown config key 'bogus'"),
    ],
)
def test_bad_values_name_the_key(override: str, fragment: str):
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs/cnn_digits.yaml", [override])
    assert fragment in str(error.value)


def test_accumulation_is_derived_from_the_global_batch():
    cfg = load_config(REPO / "configs/cnn_digits.yaml", ["train.global_batch_size=64", "train.micro_batch_size=8"])
    arithmetic = batch_arithmetic(cfg.train, world_size=2)
    assert arithmetic.grad_accum_steps == 4
    assert arithmetic.describe() == "global batch 64 = micro batch 8 x 2 ranks x 4 accumulation steps"
    with pytest.raises(ConfigError, match=r"not divisible by train.micro_batch_size=8 x world size 3 = 24"):
        batch_arithmetic(cfg.train, world_size=3)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train.epohcs=2"], "unknown config key 'train.epohcs'"),
        (["train.micro_batch_size=abc"], "train.micro_batch_size must be an integer"),
        (["train.global_batch_size=100", "train.micro_batch_size=32"], "not divisible"),
        (["model.name=transformer"], "model.name=transformer is not a registered model"),
    ],
)
def test_cli_reports_bad_config_in_one_line(args, fragment, tmp_path):
    result = run([sys.executable, "-m", "dist_train", "train", "configs/cnn_digits.yaml", f"output_dir={tmp_path}", *args], timeout=120, check=False)
    assert result.returncode == 2, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1 and fragment in error_lines[0], result.stderr


def test_cli_help_lists_subcommands_and_keys():
    result = run([sys.executable, "-m", "dist_train", "--help"], timeout=60)
    for word in ("train", "eval", "export", "data", "launch", "train.global_batch_size", "strategy.name"):
        assert word in result.stdout
