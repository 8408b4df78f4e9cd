"""The CUDA path on one GPU (`make gpu-check` runs these and tabulates them; skipped without CUDA).

Each test is the CPU test's body on the GPU: the CLI and in-process Trainers pick cuda:0 themselves. Run on
CPU for debugging the bodies with `pytest tests/test_gpu.py --gpu-tests-on-cpu` (CUDA-only asserts skip).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dist_train.config import load_config
from dist_train.distributed.environment import detect_environment
from dist_train.models import build_model
from dist_train.observe.tracking import Tracker
from dist_train.run import start_process_groups
from dist_train.trainer import Trainer
from tests.procs import REPO, dist_train, worker
from tests.sync_counter import syncs_per_step

pytestmark = pytest.mark.gpu

CUDA = torch.cuda.is_available()
CNN = "configs/cnn_digits.yaml"
# In memory; one process: 64 = 32 x 1 x 2 accumulation, 22 steps per epoch, so step 10 is mid-epoch.
BASE = ["data.source=digits", "train.progress_bar=false", "train.log_interval=10"]


def _train(out: Path, *overrides: str, nproc: int = 1, check: bool = True, preset: str = CNN):
    return dist_train(["train", preset, *BASE, f"output_dir={out}", *overrides], nproc=nproc, timeout=240, check=check)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("fp32")
    result = _train(out, "train.max_steps=44", "checkpoint.save_at_end=false")
    return out, result.stdout


# ---------------------------------------------------------------- DDP strategy on the GPU


def test_cuda_one_process_trains_the_cnn(fp32_run):
    out, stdout = fp32_run
    if CUDA:
        assert "device=cuda:0" in stdout, stdout[-2000:]
    summary = _summary(out)
    assert summary["optimizer_steps"] == 44 and summary["eval"]["eval/accuracy"] > 0.85, summary
    assert all(v.device.type == "cpu" for v in _model(out).values())


def test_two_processes_share_one_gpu(tmp_path):
    """NCCL refuses two ranks on one device ("Duplicate GPU detected"); gloo carries CUDA tensors then."""
    overrides = ["train.max_steps=22", "checkpoint.save_at_end=false"]
    first = _train(tmp_path / "nccl", *overrides, "strategy.backend=nccl" if CUDA else "strategy.backend=gloo", nproc=2, check=False)
    out = tmp_path / "nccl"
    if first.returncode != 0:
        assert "has no GPU" not in first.output, "local rank 1 was refused the one GPU: the launcher's device choice for more ranks than GPUs is not in yet"
        assert re.search(r"[Dd]uplicate GPU|ncclInvalidUsage|invalid usage", first.output), first.output[-4000:]
        out = tmp_path / "gloo"
        _train(out, *overrides, "strategy.backend=gloo", nproc=2)
    summary = _summary(out)
    assert summary["world_size"] == 2 and summary["eval"]["eval/accuracy"] > 0.6, summary


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fsdp2_mixed_precision_trains_on_cuda_and_checkpoints_fp32(fp32_run, precision, tmp_path):
    """FSDP2 on one GPU (a process group of one): MixedPrecisionPolicy compute, fp16 with the sharded scaler."""
    _train(tmp_path, "strategy.name=fsdp2", "train.max_steps=44", f"train.precision={precision}")
    summary, reference = _summary(tmp_path), _summary(fp32_run[0])
    assert summary["eval"]["eval/accuracy"] > reference["eval"]["eval/accuracy"] - 0.05, (summary, reference)
    from dist_train.strategies.dcp import load_dcp_full

    saved = load_dcp_full(tmp_path / "checkpoints" / f"step-{44:08d}")
    assert all(v.dtype == torch.float32 for v in saved["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_matches_fp32(fp32_run, precision, tmp_path):
    _train(tmp_path, "train.max_steps=44", "checkpoint.save_at_end=false", f"train.precision={precision}")
    summary, reference = _summary(tmp_path), _summary(fp32_run[0])
    # Same data and init; after 44 Adam steps rounding has moved the weights a little, not the result.
    assert abs(summary["eval"]["eval/accuracy"] - reference["eval"]["eval/accuracy"]) <= 0.05, (summary["eval"], reference["eval"])
    assert summary["eval"]["eval/loss"] == pytest.approx(reference["eval"]["eval/loss"], rel=0.25), (summary["eval"], reference["eval"])
    # GradScaler starts at 2**16 and halves on each overflow: a few skipped steps at most.
    assert summary["skipped_steps"] <= (8 if precision == "fp16" else 0), summary


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_no_host_sync_outside_log_steps_on_cuda(precision, tmp_path):
    per_step, log_steps, summary = syncs_per_step(
        ["train.max_steps=12", "train.log_interval=4", "train.eval_interval=12", f"train.precision={precision}", f"output_dir={tmp_path}"], detect_environment()
    )
    ordinary = {step: calls for step, calls in per_step.items() if step >= 1 and step not in log_steps and calls}
    assert ordinary == {}, f"host syncs on steps that do not log: {ordinary}"
    assert summary["optimizer_steps"] == 12


class _Recorder(Tracker):
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log(self, metrics, step):
        self.rows.append((step, dict(metrics)))


def test_peak_memory_is_reported_per_log_window(tmp_path):
    if not CUDA:
        pytest.skip("CUDA memory statistics only")
    cfg = load_config(REPO / CNN, [*BASE, "train.max_steps=6", "train.log_interval=2", "checkpoint.save_at_end=false", f"output_dir={tmp_path}"])
    trainer = Trainer.build(cfg, start_process_groups(cfg, detect_environment()))
    trainer.tracker = recorder = _Recorder()
    step = trainer._optimizer_step

    def first_step_spikes(*args, **kwargs):
        if trainer.progress.optimizer_step == 0:
            spike = torch.empty(256 * 2**20, dtype=torch.uint8, device=trainer.strategy.device)  # 256 MiB
            del spike
        return step(*args, **kwargs)

    trainer._optimizer_step = first_step_spikes
    try:
        trainer.fit()
    finally:
        trainer.close()
    peaks = [m["train/cuda_max_memory_mb"] for _, m in recorder.rows if "train/cuda_max_memory_mb" in m]
    assert len(peaks) == 3 and peaks[0] >= 256, peaks
    assert peaks[1] < 256 and peaks[2] < 256, f"the first window's peak leaked into later windows: {peaks}"


def test_deterministic_resnet18_warns_instead_of_failing(tmp_path):
    # ResNet-18's adaptive average-pool backward has no deterministic CUDA kernel (pytorch#149130).
    result = _train(tmp_path, "train.max_steps=2", "train.deterministic=true", "checkpoint.save_at_end=false", preset="configs/resnet18_digits.yaml")
    assert _summary(tmp_path)["optimizer_steps"] == 2
    if CUDA:
        assert "pytorch#149130" in result.stdout


# ---------------------------------------------------------------- checkpoints of CUDA tensors

RESUME = ["train.max_steps=20", "train.deterministic=true", "optim.schedule=cosine", "optim.warmup_steps=3"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    _train(out, *RESUME)
    return out


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_resume_mid_epoch_is_bitwise_on_cuda(straight_run, mode, tmp_path):
    overrides = [*RESUME, f"checkpoint.async_save={'true' if mode == 'async' else 'false'}"]
    stopped = _train(tmp_path, *overrides, "train.stop_at_step=10", check=False)
    assert (tmp_path / "checkpoints" / "step-00000010" / "COMPLETE").is_file(), stopped.output[-3000:]
    resumed = _train(tmp_path, *overrides, "train.resume=auto")
    assert "resumed from" in resumed.stdout and "at optimizer step 10, epoch 0" in resumed.stdout
    reference, split = _model(straight_run), _model(tmp_path)
    for name, value in reference.items():
        assert torch.equal(split[name], value), f"{mode}: {name} differs after resume"
    assert _summary(tmp_path)["eval"] == _summary(straight_run)["eval"]


def test_export_of_a_cuda_checkpoint_loads_into_the_plain_model(straight_run, tmp_path):
    exported = tmp_path / "exported.pt"
    dist_train(["export", str(straight_run), "--out", str(exported)], timeout=120)
    model = build_model(load_config(REPO / CNN).model)
    model.load_state_dict(torch.load(exported, weights_only=True))  # strict: the tutorial's keys
    for name, value in _model(straight_run).items():
        assert torch.equal(model.state_dict()[name], value), name


# ---------------------------------------------------------------- DeepSpeed ZeRO on the GPU


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    worker("gpu_deepspeed.py", [str(out)], nproc=1, timeout=400)
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("scenario", ["zero2_fp16", "zero2_bf16", "zero3_fp16", "zero3_bf16"])
def test_deepspeed_zero_trains(deepspeed_runs, scenario):
    run = deepspeed_runs[scenario]
    assert "error" not in run, run.get("traceback", run.get("error"))
    before, after = run["initial_eval"], run["summary"]["eval"]
    assert after["eval/loss"] < before["eval/loss"] - 0.3 and after["eval/accuracy"] > before["eval/accuracy"] + 0.2, (before, after)
    # DeepSpeed's dynamic loss scale starts at 2**16 and skips the first overflowing steps.
    assert run["summary"]["skipped_steps"] < (15 if scenario.endswith("fp16") else 1), run["summary"]


def test_deepspeed_bf16_resnet18_with_batchnorm(deepspeed_runs):
    run = deepspeed_runs["zero2_bf16_resnet18"]
    assert "error" not in run, run.get("traceback", run.get("error"))
    assert run["summary"]["optimizer_steps"] == 10 and all(loss == loss for loss in run["losses"]), run


# ---------------------------------------------------------------- the groups and the device (issue 21)


def test_fsdp2_with_async_save_on_one_gpu_resumes_bitwise(tmp_path):
    """One process under FSDP2 has an NCCL-only default group on a GPU; torch's async saver needs a CPU group
    (the checkpoint group, distributed/groups.py). It used to assert at the first save."""
    overrides = ["strategy.name=fsdp2", *RESUME, "checkpoint.async_save=true"]
    _train(tmp_path / "straight", *overrides)
    _train(tmp_path / "split", *overrides, "train.stop_at_step=10", check=False)
    assert (tmp_path / "split" / "checkpoints" / "step-00000010" / "COMPLETE").is_file()
    _train(tmp_path / "split", *overrides, "train.resume=auto")
    reference, split = _model(tmp_path / "straight"), _model(tmp_path / "split")
    assert all(torch.equal(split[k], v) for k, v in reference.items())


def test_fsdp2_cpu_offload_trains_past_its_first_logged_step(tmp_path):
    """The logged gradient norm's full_tensor() sends CPU shards through the default group, which therefore
    is cuda:nccl,cpu:gloo; an NCCL-only group failed at the first logged step."""
    if not CUDA:
        pytest.skip("cpu_offload moves shards off a GPU")
    result = _train(tmp_path, "strategy.name=fsdp2", "strategy.fsdp2.cpu_offload=true", "train.max_steps=22", "train.log_interval=5")
    summary = _summary(tmp_path)
    assert summary["optimizer_steps"] == 22 and summary["eval"]["eval/accuracy"] > 0.6, (summary, result.stdout[-2000:])


def test_deepspeed_at_local_rank_1_with_one_visible_gpu(tmp_path):
    """srun --gpus-per-task=1 / one GPU per pod: each process sees one GPU, so local rank 1 trains on cuda:0,
    and DeepSpeed must be told so (it set_device(LOCAL_RANK) and failed with "invalid device ordinal")."""
    pytest.importorskip("deepspeed")
    common = ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=2", "train.max_steps=6", "checkpoint.save_at_end=false"]
    env = {"CUDA_VISIBLE_DEVICES": "0"} if CUDA else {}
    result = dist_train(["train", "configs/mlp_digits.yaml", *BASE, *common, "strategy.backend=nccl" if CUDA else "strategy.backend=gloo",
                         f"output_dir={tmp_path / 'nccl'}"], nproc=2, timeout=300, env=env, check=False)  # fmt: skip
    assert "invalid device ordinal" not in result.output, result.output[-4000:]
    out = tmp_path / "nccl"
    if result.returncode != 0:  # NCCL refuses two ranks on one device; gloo carries the CUDA tensors then
        assert re.search(r"[Dd]uplicate GPU|ncclInvalidUsage|invalid usage", result.output), result.output[-4000:]
        out = tmp_path / "gloo"
        dist_train(["train", "configs/mlp_digits.yaml", *BASE, *common, "strategy.backend=gloo", f"output_dir={out}"], nproc=2, timeout=300, env=env)
    assert _summary(out)["optimizer_steps"] == 6


def test_async_saved_batchnorm_statistics_are_the_models(tmp_path):
    """The async save clones BatchNorm's running statistics on the compute stream and copies them on the
    stager's side stream, which must wait for the clones (and the step before them)."""
    overrides = ["train.max_steps=5", "checkpoint.async_save=true", "train.log_interval=5"]
    _train(tmp_path, *overrides, preset="configs/resnet18_digits.yaml")
    from dist_train.strategies.dcp import load_dcp_full

    saved = load_dcp_full(tmp_path / "checkpoints" / "step-00000005")["model"]
    final = _model(tmp_path)
    buffers = [k for k in final if "running_" in k]
    assert buffers, "ResNet-18 has BatchNorm buffers"
    for key in buffers:
        assert torch.equal(saved[key], final[key]), f"{key}: the async checkpoint holds other statistics than model.pt"
