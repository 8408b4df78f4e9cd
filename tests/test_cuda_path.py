"""CUDA-path fixes that show on CPU: no per-step host sync, the fp16 skip decided on the device, deterministic
mode that warns on CUDA-only gaps, DeepSpeed's own bf16 cast without torch autocast on top, and only the
main process copying the full model at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_train.config import batch_arithmetic, load_config
from dist_train.determinism import CUDA_NOTE, use_deterministic_algorithms
from dist_train.distributed.environment import DistEnv
from dist_train.distributed.groups import ProcessGroups
from dist_train.models import build_model
from dist_train.optim import build_optimizer, build_scheduler
from dist_train.strategies.ddp import DDPStrategy
from tests.procs import REPO, free_port, worker
from tests.sync_counter import syncs_per_step

# 22 steps per epoch on one process; eval only after the last step, so every other step is an ordinary one.
RUN = ["train.max_steps=8", "train.log_interval=4", "train.eval_interval=8"]


@pytest.mark.parametrize(
    "precision, extra",
    [
        ("fp32", []),
        ("fp16", []),
        pytest.param("fp32", ["checkpoint.interval_seconds=3600"], id="fp32-interval_seconds"),
    ],
)
def test_no_host_sync_outside_log_steps(precision, extra, tmp_path):
    overrides = [*RUN, f"train.precision={precision}", f"output_dir={tmp_path}", "checkpoint.save_at_end=true", *extra]
    per_step, log_steps, summary = syncs_per_step(overrides, DistEnv())
    assert summary["optimizer_steps"] == 8 and isinstance(summary["skipped_steps"], int)
    # The skip count (kept on the device between log steps) is a plain number in the checkpoint.
    saved = json.loads((tmp_path / "checkpoints" / "step-00000008" / "trainer.json").read_text())
    assert saved["progress"]["skipped_steps"] == summary["skipped_steps"]
    ordinary = {step: calls for step, calls in per_step.items() if 1 <= step and step not in log_steps and calls}
    assert ordinary == {}, f"host syncs on steps that do not log: {ordinary}"
    # The counter does see the reads a log step makes (the loss for the log line).
    assert all(any("trainer.py" in call for call in per_step.get(step, [])) for step in log_steps), per_step


def _ddp_strategy(precision: str, tmp_path: Path) -> DDPStrategy:
    cfg = load_config(REPO / "configs" / "mlp_digits.yaml", ["data.source=digits", f"train.precision={precision}", "optim.name=adam", f"output_dir={tmp_path}"])
    strategy = DDPStrategy.from_config(cfg, ProcessGroups.start(DistEnv()), batch_arithmetic(cfg.train, 1))
    torch.manual_seed(0)
    strategy.setup_module(build_model(cfg.model))
    optimizer = build_optimizer(cfg.optim, strategy.unwrapped_model, fused=strategy.wants_fused_optimizer)
    strategy.setup_optimizer(optimizer, build_scheduler(cfg.optim, optimizer, 10))
    return strategy


def _step(strategy: DDPStrategy, poison: bool):
    inputs = torch.randn(8, 1, 28, 28)
    with strategy.autocast():
        loss = strategy.model(inputs).float().square().mean()
    strategy.backward(loss * (float("inf") if poison else 1.0), True)
    return strategy.optimizer_step(compute_grad_norm=False)


def test_fp16_overflow_skips_the_step_on_the_device(tmp_path):
    strategy = _ddp_strategy("fp16", tmp_path)
    assert getattr(strategy.optimizer, "_step_supports_amp_scaling", False), "fp16 under DDP should get a fused optimizer"
    before = {k: v.clone() for k, v in strategy.unwrapped_model.state_dict().items()}
    scale = strategy.scaler.get_scale()
    result = _step(strategy, poison=True)
    assert isinstance(result.skipped, torch.Tensor) and result.skipped.device == strategy.device and bool(result.skipped)
    assert strategy.scaler.get_scale() == scale / 2
    for name, value in strategy.unwrapped_model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed on a skipped step"
    assert int(strategy.optimizer.state[next(iter(strategy.unwrapped_model.parameters()))]["step"]) == 0
    result = _step(strategy, poison=False)
    assert not bool(result.skipped)
    assert any(not torch.equal(v, before[k]) for k, v in strategy.unwrapped_model.state_dict().items())


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def test_deterministic_mode_is_strict_on_cpu_and_warns_on_cuda(restore_determinism):
    assert use_deterministic_algorithms(torch.device("cpu")) is None
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    note = use_deterministic_algorithms(torch.device("cuda", 0))
    assert note == CUDA_NOTE and "pytorch#149130" in note
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.mark.slow
def test_deepspeed_bf16_runs_its_own_cast_without_torch_autocast(tmp_path):
    """ResNet-18 (BatchNorm) under ZeRO-2 bf16: the module computes in bf16 with autocast off, and the loss
    means what fp32 DDP's does."""
    pytest.importorskip("deepspeed")
    from dist_train.run import start_process_groups
    from dist_train.trainer import Trainer

    common = ["data.source=digits", "train.max_steps=6", "train.log_interval=3", "train.eval_interval=6", "train.progress_bar=false", "checkpoint.save_at_end=false"]
    seen: list[tuple[bool, torch.dtype]] = []

    def fit(name: str, *overrides: str) -> dict:
        cfg = load_config(REPO / "configs" / "resnet18_digits.yaml", [*common, f"output_dir={tmp_path / name}", *overrides])
        trainer = Trainer.build(cfg, start_process_groups(cfg, DistEnv(master_port=free_port())))
        conv = trainer.strategy.unwrapped_model.conv1
        handle = conv.register_forward_hook(lambda m, args, out: seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype)))
        try:
            return trainer.fit()
        finally:
            handle.remove()
            trainer.close()

    reference = fit("ddp_fp32")
    seen.clear()
    zero = fit("zero2_bf16", "strategy.name=deepspeed", "strategy.deepspeed.zero_stage=2", "train.precision=bf16")
    assert seen and set(seen) == {(False, torch.bfloat16)}, f"(autocast on, input dtype) in the bf16 forward: {set(seen)}"
    # Same data, same init; bf16 rounding only: the eval loss stays within 5% of fp32's.
    assert zero["eval"]["eval/loss"] == pytest.approx(reference["eval"]["eval/loss"], rel=0.05), (zero["eval"], reference["eval"])
    assert zero["eval"]["eval/samples"] == 359


@pytest.mark.slow
def test_only_the_main_process_copies_the_full_model(tmp_path):
    out = tmp_path / "full"
    worker("cuda_path.py", ["full_model", str(out), f"output_dir={tmp_path}", "train.max_steps=2", "checkpoint.save_at_end=false"], timeout=240)
    main, other = (json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1))
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert other["full_model_keys"] == [], "a non-main DDP rank copied the whole model to CPU"
    assert main["full_model_keys"] == sorted(saved) and len(saved) == 6
