"""DeepSpeed ZeRO 1/2/3 behind the trainer: equivalence with DDP, bf16, exact mid-epoch resume, export, config
reconciliation. The 2-process runs share one torchrun launch (tests/workers/ds_scenarios.py) because each
DeepSpeed process spends ~20 s importing before its first step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_train.config import ConfigError, batch_arithmetic, load_config
from dist_train.data import load_source
from dist_train.data.transforms import adapt_images
from dist_train.config.deepspeed_json import build_deepspeed_config
from dist_train.distributed.environment import DistEnv
from dist_train.distributed.groups import ProcessGroups
from dist_train.models import build_model, model_spec
from dist_train.trainer import seed_everything
from tests.procs import REPO, dist_train, worker

deepspeed_strategy = pytest.importorskip("dist_train.strategies.deepspeed", reason="DeepSpeed is not installed")

MLP = REPO / "configs" / "mlp_digits.yaml"
DIGITS = ["data.source=digits"]  # in memory, as tests/workers/ds_scenarios.py trains on


def _model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("deepspeed")
    worker("ds_scenarios.py", [str(out)], timeout=420)
    return out, json.loads((out / "results.json").read_text())


# ---------------------------------------------------------------- 2 processes (one shared launch)


@pytest.mark.slow
def test_zero_stages_match_ddp_with_accumulation_and_clipping(scenarios):
    out, results = scenarios
    seed_everything(0)
    initial = build_model(load_config(MLP, DIGITS).model).state_dict()
    ddp = _model(out / "ddp")
    assert all(not torch.equal(ddp[k], initial[k]) for k in ddp), "DDP reference did not train"
    for run in ("zero1", "zero2", "zero3", "zero2_json_optimizer"):
        assert results[run]["summary"]["grad_accum_steps"] == 2 and results[run]["summary"]["optimizer_steps"] == 4
        zero = _model(out / run)
        assert set(zero) == set(ddp) and all(v.dtype == torch.float32 for v in zero.values())
        for name, reference in ddp.items():
            # fp32; ZeRO reduce-scatters where DDP all-reduces, so the sums round differently (seen: 7e-9).
            torch.testing.assert_close(zero[name], reference, rtol=1e-5, atol=1e-6, msg=f"{run} vs DDP: {name}")
        assert results[run]["summary"]["eval"]["eval/accuracy"] == results["ddp"]["summary"]["eval"]["eval/accuracy"]
        # Norms before clipping, as DDP reports them; all above train.grad_clip=0.5, so clipping acted.
        assert min(results["ddp"]["grad_norms"]) > 0.5
        assert results[run]["grad_norms"] == pytest.approx(results["ddp"]["grad_norms"], rel=1e-5)


@pytest.mark.slow
def test_bf16_under_zero2_trains_and_the_loss_goes_down(scenarios):
    out, results = scenarios
    run = results["zero2_bf16"]
    before, after = run["initial_eval"], run["summary"]["eval"]
    assert after["eval/loss"] < before["eval/loss"] - 0.3, (before, after)
    assert after["eval/accuracy"] > before["eval/accuracy"] + 0.2, (before, after)
    losses = run["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    # The exported weights are the optimizer's fp32 masters, in the tutorial's dtype.
    assert all(v.dtype == torch.float32 for v in _model(out / "zero2_bf16").values())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_mid_epoch_continues_exactly(scenarios, stage):
    out, results = scenarios
    assert results[f"resume{stage}_stopped"]["interrupted_at"] == 3
    checkpoint = out / f"resume{stage}_split" / "checkpoints" / "step-00000003"
    side = json.loads((checkpoint / "trainer.json").read_text())
    assert side["data"]["epoch"] == 0 and side["data"]["samples_consumed"] == 96 < side["data"]["num_samples"], "not mid-epoch"
    assert (checkpoint / "zero").is_dir() and (checkpoint / "COMPLETE").is_file()
    assert results[f"resume{stage}_resumed"]["start_step"] == 3, "the second run did not resume"
    full, resumed = _model(out / f"resume{stage}_full"), _model(out / f"resume{stage}_split")
    for name, reference in full.items():
        torch.testing.assert_close(resumed[name], reference, rtol=0, atol=1e-7, msg=f"ZeRO-{stage} resumed vs uninterrupted: {name}")
    assert results[f"resume{stage}_resumed"]["summary"]["eval"] == results[f"resume{stage}_full"]["summary"]["eval"]


@pytest.mark.slow
def test_export_from_zero3_loads_into_the_plain_model_with_the_trainers_accuracy(scenarios, tmp_path):
    out, results = scenarios
    exported = tmp_path / "exported.pt"
    dist_train(["export", str(out / "resume3_full"), "--out", str(exported)], timeout=180)
    cfg = load_config(MLP, DIGITS)
    model = build_model(cfg.model)
    model.load_state_dict(torch.load(exported, weights_only=True))  # strict: the tutorial's keys and shapes
    for name, value in _model(out / "resume3_full").items():  # the trainer's own model.pt (gathered in memory)
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    spec = model_spec(cfg.model)
    test = load_source(cfg.data, spec).test
    model.eval()
    with torch.no_grad():
        logits = model(adapt_images(test.inputs, spec.input_shape))
    accuracy = (logits.argmax(dim=1) == test.targets).double().mean().item()
    trainer_eval = results["resume3_full"]["summary"]["eval"]
    assert trainer_eval["eval/samples"] == len(test)
    assert accuracy == pytest.approx(trainer_eval["eval/accuracy"], abs=1e-12)


# ---------------------------------------------------------------- the DeepSpeed config


def _ds_config(tmp_path: Path, user: dict | None, *overrides: str, world_size: int = 2) -> dict:
    cfg = load_config(MLP, [*DIGITS, "train.global_batch_size=32", "train.micro_batch_size=8", "strategy.name=deepspeed", *overrides])
    source = None
    if user is not None:
        source = tmp_path / "user.json"
        source.write_text(json.dumps(user))
    arithmetic = batch_arithmetic(cfg.train, world_size)
    return build_deepspeed_config(cfg, arithmetic, user, source=str(source) if source else "")


def test_auto_values_are_filled_from_dist_train(tmp_path):
    zero3 = json.loads((REPO / "configs/deepspeed/zero3.json").read_text())
    ds = _ds_config(tmp_path, zero3, "strategy.deepspeed.zero_stage=3", "train.grad_clip=1.0", "train.precision=bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 32
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is True  # passed through
    no_json = _ds_config(tmp_path, None, "strategy.deepspeed.zero_stage=1")
    assert no_json["zero_optimization"] == {"stage": 1} and no_json["gradient_clipping"] == 0.0
    # The JSON's optimizer must agree with optim.* (tests/test_deepspeed_json.py: adopted before a run, or refused).
    with_optimizer = _ds_config(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "weight_decay": 0.1}}}, "optim.name=adamw", "optim.weight_decay=0.1")
    assert with_optimizer["optimizer"]["params"] == {"lr": 0.1, "betas": [0.9, 0.999], "weight_decay": 0.1}


@pytest.mark.parametrize(
    "user, overrides, expected",
    [
        ({"gradient_accumulation_steps": 4}, [], "gradient_accumulation_steps=4 but dist_train derives 2 from train.global_batch_size=32 / (train.micro_batch_size=8 x 2 ranks)"),
        ({"train_micro_batch_size_per_gpu": 16}, [], "train_micro_batch_size_per_gpu=16 but dist_train derives 8 from train.micro_batch_size=8"),
        ({"train_batch_size": 64}, [], "train_batch_size=64 but dist_train derives 32 from train.global_batch_size=32"),
        ({"bf16": {"enabled": True}}, [], "bf16.enabled=true but dist_train derives false from train.precision=fp32"),
        ({"gradient_clipping": 1.0}, [], "gradient_clipping=1.0 but dist_train derives 0.0 from train.grad_clip=None"),
        ({"zero_optimization": {"stage": 3}}, ["strategy.deepspeed.zero_stage=2"], "zero_optimization.stage=3 is strategy.deepspeed.zero_stage=3 but this run has strategy.deepspeed.zero_stage=2"),
        ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, [], "zero_optimization.sub_group_size=auto: dist_train fills auto only for"),
    ],
)
def test_a_conflicting_json_is_refused_naming_both_values(tmp_path, user, overrides, expected):
    with pytest.raises(ConfigError) as error:
        _ds_config(tmp_path, user, *overrides)
    assert expected in str(error.value) and str(tmp_path / "user.json") in str(error.value)


def test_the_cli_refuses_a_conflicting_json_in_one_line(tmp_path):
    bad = tmp_path / "zero2_accum3.json"
    bad.write_text(json.dumps({**json.loads((REPO / "configs/deepspeed/zero2.json").read_text()), "gradient_accumulation_steps": 3}))
    result = dist_train(["train", "configs/mlp_digits_zero2.yaml", f"strategy.deepspeed.config={bad}", f"output_dir={tmp_path / 'run'}"], timeout=180, check=False)
    assert result.returncode == 2, result.output
    assert "Traceback" not in result.output
    # One process: global 64 = micro 16 x 1 rank x 4 accumulation steps.
    expected = f"{bad} gradient_accumulation_steps=3 but dist_train derives 4 from train.global_batch_size=64 / (train.micro_batch_size=16 x 1 ranks)"
    assert expected in result.stderr, result.output


def test_fp16_on_cpu_is_refused_naming_train_precision():
    cfg = load_config(MLP, [*DIGITS, "strategy.name=deepspeed", "train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.precision=fp16 with strategy.name=deepspeed needs a GPU"):
        deepspeed_strategy.DeepSpeedStrategy.from_config(cfg, ProcessGroups.start(DistEnv()), batch_arithmetic(cfg.train, 1))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 under DeepSpeed needs CUDA")
def test_fp16_under_zero2_on_gpus_trains(tmp_path):
    nproc = min(2, torch.cuda.device_count())
    overrides = [f"output_dir={tmp_path}", "train.precision=fp16", "train.max_steps=30", "train.progress_bar=false", "checkpoint.save_at_end=false"]
    dist_train(["train", "configs/mlp_digits_zero2.yaml", *overrides], nproc=nproc, timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    # DeepSpeed's dynamic loss scale starts at 2**16 and skips the first overflowing steps, on every rank alike.
    assert summary["skipped_steps"] < 15 and summary["eval"]["eval/accuracy"] > 0.5, summary


# ---------------------------------------------------------------- no code from a checkpoint


class _RunsACommand:
    """What a crafted checkpoint would hold: unpickling it calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


@pytest.mark.slow
def test_a_crafted_deepspeed_checkpoint_is_refused_on_resume_and_export_and_runs_nothing(scenarios, tmp_path):
    import shutil

    out, _ = scenarios
    crafted = tmp_path / "step-00000003"
    shutil.copytree(out / "resume2_split" / "checkpoints" / "step-00000003", crafted)
    marker = tmp_path / "code-ran"
    target = crafted / "zero" / "mp_rank_00_model_states.pt"
    torch.save({"module": _RunsACommand(f"touch {marker}")}, target)

    exported = dist_train(["export", str(crafted), "--out", str(tmp_path / "model.pt")], timeout=240, check=False)
    resumed = dist_train(
        ["train", str(MLP), "data.source=digits", "train.global_batch_size=32", "train.micro_batch_size=8", "train.progress_bar=false",
         "strategy.name=deepspeed", "strategy.deepspeed.zero_stage=2", f"strategy.deepspeed.config={REPO}/configs/deepspeed/zero2.json",
         f"train.resume={crafted}", f"output_dir={tmp_path / 'resumed'}"],  # fmt: skip
        timeout=300,
        check=False,
    )
    for result in (exported, resumed):
        assert result.returncode == 2, result.output[-3000:]
        assert f"checkpoint file {target} refers to posix.system" in result.stderr and "Traceback" not in result.output, result.output[-3000:]
    assert not marker.exists()
    assert not (tmp_path / "model.pt").exists()
