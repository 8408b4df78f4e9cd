"""The trainer core on real 2-process gloo groups: equivalence, no-sync, every model, accuracy, precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_train.config import load_config
from dist_train.models import build_model
from tests.hand_loop import tutorial_loop
from tests.procs import REPO, dist_train, worker

pytestmark = pytest.mark.slow

STEPS = 6


def _train_cli(preset: str, out: Path, nproc: int, *overrides: str) -> dict[str, torch.Tensor]:
    dist_train(["train", f"configs/{preset}", f"output_dir={out}", "checkpoint.save_at_end=false", "train.progress_bar=false", *overrides], nproc=nproc, timeout=240)
    return torch.load(out / "model.pt", weights_only=True)


@pytest.mark.parametrize("preset", ["mlp_digits.yaml", "cnn_digits.yaml"])
def test_two_ranks_with_accumulation_equal_one_big_batch_and_the_tutorial_loop(preset, tmp_path):
    common = ["data.source=digits", f"train.max_steps={STEPS}", "train.global_batch_size=32", "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.schedule=constant"]
    distributed = _train_cli(preset, tmp_path / "w2", 2, *common, "train.micro_batch_size=8")  # 8 x 2 ranks x 2 accum
    single = _train_cli(preset, tmp_path / "w1", 1, *common, "train.micro_batch_size=32")  # 32 x 1 x 1
    tutorial = tutorial_loop(preset, common, batch_size=32, steps=STEPS)
    initial = build_model(load_config(REPO / "configs" / preset).model).state_dict()
    for name, reference in tutorial.items():
        assert not torch.equal(reference, initial[name]) or "bias" in name, f"{name} did not train"
        torch.testing.assert_close(single[name], reference, rtol=1e-5, atol=1e-6, msg=f"{name}: world 1 vs tutorial")
        torch.testing.assert_close(distributed[name], reference, rtol=1e-5, atol=1e-6, msg=f"{name}: world 2 x accum 2 vs tutorial")


def test_only_the_last_micro_batch_synchronises_gradients(tmp_path):
    out = tmp_path / "nosync"
    worker("core_train.py", ["nosync", str(out), "data.source=digits", f"output_dir={tmp_path}", "train.max_steps=5", "train.global_batch_size=64", "train.micro_batch_size=8", "checkpoint.save_at_end=false"], timeout=240)
    for rank in (0, 1):
        result = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        accum = result["grad_accum_steps"]
        assert accum == 4 and result["steps"] == 5
        # The hook fires during backward, before the micro-step counter moves on: value = step * accum + i.
        micro_indices = {call % accum for call in result["calls"]}
        steps_synced = sorted({call // accum for call in result["calls"]})
        assert micro_indices == {accum - 1}, f"rank {rank}: gradients synced on micro-batches {micro_indices}"
        assert steps_synced == list(range(5))


def test_every_tutorial_model_trains_under_ddp(tmp_path):
    out = tmp_path / "models"
    worker("core_train.py", ["models", str(out), "train.max_steps=24", "train.log_interval=4", "checkpoint.save_at_end=false", "train.eval_interval=24"], timeout=420)
    results = json.loads(Path(f"{out}.rank0.json").read_text())
    for preset in ("linear_regression.yaml", "two_layer_net.yaml", "mlp_digits.yaml", "cnn_digits.yaml", "lenet_digits.yaml", "resnet18_digits.yaml"):
        losses = results[preset]["losses"]
        assert results[preset]["steps"] == 24 and len(losses) == 6
        assert losses[-1] < 0.8 * losses[0], f"{preset}: loss did not go down: {losses}"


def test_main_job_cnn_on_digits_reaches_95_percent(tmp_path):
    # Exactly the README's main job: the preset as it is, streaming the data/digits shards.
    result = dist_train(["train", "configs/cnn_digits.yaml", f"output_dir={tmp_path}", "train.progress_bar=false"], nproc=2, timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["eval"]["eval/samples"] == 359
    assert summary["eval"]["eval/accuracy"] >= 0.95, summary
    assert "global batch 64 = micro batch 32 x 2 ranks x 1 accumulation steps" in result.stdout
    assert "test accuracy" in result.stdout
    # Only the main process prints (the config diff; the resolved config goes to config.yaml only).
    assert result.stdout.count("config: configs/cnn_digits.yaml") == 1 and "resolved config:\n" not in result.stdout


def test_linear_regression_recovers_the_tutorial_line(tmp_path):
    state = _train_cli("linear_regression.yaml", tmp_path, 2)
    assert abs(state["linear.weight"].item() - 0.5) < 0.02
    assert abs(state["linear.bias"].item() - 30.0) < 0.05


def test_bf16_matches_fp32_and_fp16_scales_the_loss(tmp_path):
    common = ["train.max_steps=20", "train.log_interval=20", "train.eval_interval=20"]
    losses = {}
    for precision in ("fp32", "bf16", "fp16"):
        out = tmp_path / precision
        dist_train(["train", "configs/mlp_digits.yaml", "data.source=digits", f"output_dir={out}", f"train.precision={precision}", "checkpoint.save_at_end=false", *common], nproc=1, timeout=240)
        summary = json.loads((out / "summary.json").read_text())
        losses[precision] = summary["eval"]["eval/loss"]
        assert summary["optimizer_steps"] == 20
    # bf16 keeps 8 bits of mantissa: after 20 steps the eval loss stays within 5% of fp32's.
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"], losses
    assert abs(losses["fp16"] - losses["fp32"]) < 0.05 * losses["fp32"], losses
