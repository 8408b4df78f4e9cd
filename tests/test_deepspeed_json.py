"""DeepSpeed JSONs from the ecosystem (issue 25): Hugging Face's published ZeRO-2 and ZeRO-3 configs, their
optimizer and scheduler reconciled with optim.* (adopted with a line, or refused naming both sides), every
problem of a JSON in one line before DeepSpeed starts (also by `dist-train launch --dry-run`), and real
2-process runs whose LR curve is DeepSpeed's WarmupLR step for step across a stop and resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint.resume_semantics import resume_changes
from dist_train.cli import main as cli_main
from dist_train.config import ConfigError, OptimConfig, batch_arithmetic, config_from_dict, explicit_keys, load_config
from dist_train.config.deepspeed_json import build_deepspeed_config, load_user_config, reconcile_deepspeed_json
from dist_train.observe.tracking import read_history
from dist_train.optim import build_scheduler
from tests.procs import REPO, dist_train, worker

lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules", reason="DeepSpeed is not installed")

# huggingface/transformers tests/deepspeed/ds_config_zero2.json (commit 00e12e7c), as published.
HF_ZERO2 = """{
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1
    },

    "bf16": {
        "enabled": "auto"
    },

    "optimizer": {
        "type": "AdamW",
        "params": {
            "lr": "auto",
            "betas": "auto",
            "eps": "auto",
            "weight_decay": "auto"
        }
    },

    "scheduler": {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": "auto",
            "warmup_max_lr": "auto",
            "warmup_num_steps": "auto"
        }
    },

    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": {
            "device": "cpu",
            "pin_memory": true
        },
        "allgather_partitions": true,
        "allgather_bucket_size": 2e8,
        "overlap_comm": true,
        "reduce_scatter": true,
        "reduce_bucket_size": 2e8,
        "contiguous_gradients": true
    },

    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": false
}
"""

# huggingface/transformers tests/deepspeed/ds_config_zero3.json (commit e7a14199), as published.
HF_ZERO3 = """{
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1
    },

    "optimizer": {
        "type": "AdamW",
        "params": {
            "lr": "auto",
            "betas": "auto",
            "eps": "auto",
            "weight_decay": "auto"
        }
    },

    "scheduler": {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": "auto",
            "warmup_max_lr": "auto",
            "warmup_num_steps": "auto"
        }
    },

    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {
            "device": "cpu",
            "pin_memory": true
        },
        "offload_param": {
            "device": "cpu",
            "pin_memory": true
        },
        "overlap_comm": true,
        "contiguous_gradients": true,
        "sub_group_size": 1e14,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_fp16_weights_on_model_save": true
    },

    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": false
}
"""

MLP = str(REPO / "configs" / "mlp_digits.yaml")
ZERO2_PRESET = str(REPO / "configs" / "mlp_digits_zero2.yaml")


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("hf_json")
    (folder / "ds_config_zero2.json").write_text(HF_ZERO2)
    (folder / "ds_config_zero3.json").write_text(HF_ZERO3)
    return {2: folder / "ds_config_zero2.json", 3: folder / "ds_config_zero3.json"}


def _reconciled(raw: dict, world_size: int = 2):
    """What run.py does before a run: the config, adopted from the JSON, and the lines it prints."""
    cfg = config_from_dict(raw)
    lines = reconcile_deepspeed_json(cfg, explicit_keys(raw), world_size)
    return cfg, lines


def _raw(json_path: Path, **optim) -> dict:
    """A config that leaves the optimizer type and the schedule to the JSON (as a user's own would)."""
    return {
        "model": {"name": "mlp"},
        "data": {"source": "digits"},
        "optim": {"lr": 0.002, "warmup_steps": 5, **optim},
        "train": {"global_batch_size": 64, "micro_batch_size": 16},
        "strategy": {"name": "deepspeed", "deepspeed": {"config": str(json_path)}},
    }


# ---------------------------------------------------------------- the JSON as published, reconciled


@pytest.mark.parametrize("stage", [2, 3])
def test_hugging_face_json_adopts_its_optimizer_and_schedule_with_a_line_each_and_deepspeed_accepts_the_result(hf_json, stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    path = hf_json[stage]
    cfg, lines = _reconciled(_raw(path), world_size=1)
    assert f'optim.name=adamw (from {path}: optimizer.type="AdamW")' in lines
    assert f'optim.schedule=warmup_lr (from {path}: scheduler.type="WarmupLR")' in lines
    assert f'optim.warmup_type=log (from {path}: WarmupLR without warmup_type (DeepSpeed\'s default "log"))' in lines
    assert (f"strategy.deepspeed.zero_stage=3 (from {path}: zero_optimization.stage=3)" in lines) == (stage == 3)
    # The resolved run is in the config (config.yaml, the checkpoint's meta.json): not the preset's SGD.
    o = cfg.optim
    assert (o.name, o.lr, o.schedule, o.warmup_steps, o.warmup_type, cfg.strategy.deepspeed.zero_stage) == ("adamw", 0.002, "warmup_lr", 5, "log", stage)

    ds = build_deepspeed_config(cfg, batch_arithmetic(cfg.train, 1), load_user_config(str(path)), str(path))
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 0.002, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}}
    assert "scheduler" not in ds  # it runs as optim.schedule=warmup_lr, DeepSpeed's curve (next test)
    assert "auto" not in json.dumps(ds)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 16, 4)
    assert ds["fp16"]["enabled"] is False and ds["gradient_clipping"] == 0.0 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    if stage == 3:  # Hugging Face derives these from a transformers model's hidden_size: here DeepSpeed's defaults
        assert "reduce_bucket_size" not in ds["zero_optimization"] and any("DeepSpeed's defaults" in line for line in lines)
    accepted = DeepSpeedConfig(ds)  # DeepSpeed's own validation (pydantic), without a process group
    assert accepted.optimizer_name == "adamw" and accepted.zero_optimization_stage == stage and accepted.train_batch_size == 64


@pytest.mark.parametrize(
    "schedule, warmup_type, warmup_steps, min_lr_ratio",
    [("warmup_lr", "log", 5, 0.0), ("warmup_lr", "linear", 5, 0.0), ("warmup_lr", "log", 1, 0.0), ("warmup_decay_lr", "log", 4, 0.1), ("warmup_decay_lr", "linear", 3, 0.0)],
)
def test_optim_schedule_warmup_lr_is_deepspeeds_own_curve_step_for_step(schedule, warmup_type, warmup_steps, min_lr_ratio):
    total, lr = 20, 0.002
    cfg = OptimConfig(name="adamw", lr=lr, schedule=schedule, warmup_steps=warmup_steps, warmup_type=warmup_type, min_lr_ratio=min_lr_ratio)
    ours_optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    ours = build_scheduler(cfg, ours_optimizer, total)
    theirs_optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    kwargs = {"warmup_min_lr": min_lr_ratio * lr, "warmup_max_lr": lr, "warmup_num_steps": warmup_steps, "warmup_type": warmup_type}
    theirs = lr_schedules.WarmupLR(theirs_optimizer, **kwargs) if schedule == "warmup_lr" else lr_schedules.WarmupDecayLR(theirs_optimizer, total, **kwargs)
    used = []
    for _ in range(total):  # the LR each optimizer step runs at; DeepSpeed's engine steps its scheduler after it
        mine, deepspeeds = ours_optimizer.param_groups[0]["lr"], theirs_optimizer.param_groups[0]["lr"]
        if min_lr_ratio == 0.0:
            assert mine == deepspeeds, used
        else:
            assert mine == pytest.approx(deepspeeds, rel=1e-12), used
        used.append(mine)
        ours_optimizer.step(), theirs_optimizer.step()
        ours.step(), theirs.step()
    assert used[0] == used[1] == min_lr_ratio * lr and max(used) == pytest.approx(lr)


def test_deepspeeds_schedules_without_a_json_refuse_a_zero_warmup_and_log_goes_with_them_only():
    with pytest.raises(ConfigError, match=r"optim.schedule=warmup_lr is DeepSpeed's WarmupLR, which refuses a warmup of 0 steps; set optim.warmup_steps"):
        load_config(None, ["optim.schedule=warmup_lr"])
    with pytest.raises(ConfigError, match=r"optim.warmup_type=log is the curve of DeepSpeed's schedules; with optim.schedule=cosine"):
        load_config(None, ["optim.schedule=cosine", "optim.warmup_steps=3", "optim.warmup_type=log"])
    assert load_config(None, ["optim.schedule=warmup_decay_lr", "optim.warmup_steps=3", "optim.warmup_type=log"]).optim.warmup_type == "log"


# ---------------------------------------------------------------- refused: every problem, both sides, one line


def test_every_problem_of_a_json_is_reported_in_one_error_naming_both_sides(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({
        "train_batch_size": 128,
        "gradient_accumulation_steps": 4,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "Adam", "params": {"adam_w_mode": False, "lr": 3e-5}},
        "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.0}},
    }))  # fmt: skip
    raw = _raw(bad, name="adamw")
    raw["strategy"]["deepspeed"]["zero_stage"] = 2
    with pytest.raises(ConfigError) as error:
        _reconciled(raw)
    message = str(error.value)
    assert "\n" not in message and f"{bad}: 6 problems: 1) " in message, message
    for fragment in (
        'zero_optimization.stage=3 is strategy.deepspeed.zero_stage=3 but this run has strategy.deepspeed.zero_stage=2',
        'optimizer.type="Adam" with "adam_w_mode": false is optim.name=adam but this run has optim.name=adamw',
        "optimizer.params.lr=3e-05 is optim.lr=3e-05 but this run has optim.lr=0.002",
        'scheduler.type="OneCycle": dist_train runs DeepSpeed\'s WarmupLR and WarmupDecayLR',
        "train_batch_size=128 but dist_train derives 64 from train.global_batch_size=64",
        "gradient_accumulation_steps=4 but dist_train derives 2 from train.global_batch_size=64 / (train.micro_batch_size=16 x 2 ranks)",
    ):
        assert fragment in message, (fragment, message)
    # Left unset in the config, the same optimizer values are adopted instead, each with its line.
    raw = _raw(bad)
    raw["optim"].pop("lr")
    del raw["strategy"]["deepspeed"]["config"]
    good = tmp_path / "adam.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam", "params": {"adam_w_mode": False, "lr": 3e-5}}}))
    raw["strategy"]["deepspeed"]["config"] = str(good)
    cfg, lines = _reconciled(raw)
    assert (cfg.optim.name, cfg.optim.lr, cfg.strategy.deepspeed.zero_stage) == ("adam", 3e-5, 3)
    assert f'optim.name=adam (from {good}: optimizer.type="Adam" with "adam_w_mode": false)' in lines and f"optim.lr=3e-05 (from {good}: optimizer.params.lr=3e-05)" in lines


def test_a_warmup_lr_of_zero_steps_and_the_presets_sgd_are_one_line_before_deepspeed_starts(hf_json, tmp_path):
    """The published ZeRO-2 JSON with the ZeRO-2 preset (optim.name: sgd, no warmup): before issue 25 the run
    ended after ~2 min in DeepSpeed's raw `ValueError: warmup_num_steps must be a positive integer, got 0`
    (on every rank under torchrun, where the main process alone says a config error: tests/test_experience.py)."""
    out = tmp_path / "run"
    result = dist_train(["train", ZERO2_PRESET, "data.source=digits", f"strategy.deepspeed.config={hf_json[2]}", f"output_dir={out}"], timeout=180, check=False)
    assert result.returncode == 2 and "Traceback" not in result.output, result.output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"dist-train: config error: {hf_json[2]}: 2 problems: 1) "), errors[0]
    assert 'optimizer.type="AdamW" is optim.name=adamw but this run has optim.name=sgd' in errors[0]
    assert "scheduler.params.warmup_num_steps=auto is filled from optim.warmup_steps=0, but DeepSpeed's WarmupLR needs at least 1 warmup step; set optim.warmup_steps" in errors[0]
    assert not out.exists()  # refused before the run directory, the process group or DeepSpeed


def test_launch_dry_run_checks_the_json_before_printing_the_command(hf_json, capsys):
    launch = ["launch", "--dry-run", "--nproc-per-node", "2", ZERO2_PRESET, f"strategy.deepspeed.config={hf_json[2]}"]
    assert cli_main(launch) == 2
    captured = capsys.readouterr()
    assert "optim.warmup_steps" in captured.err and "torch.distributed.run" not in captured.out, captured
    assert cli_main([*launch, "optim.name=adamw", "optim.lr=0.002", "optim.warmup_steps=5"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert f'dist-train: optim.schedule=warmup_lr (from {hf_json[2]}: scheduler.type="WarmupLR")' in shown
    assert "batch: global batch 64 = micro batch 16 x 2 ranks x 2 accumulation steps" in shown and "torch.distributed.run" in shown[-1]


def test_a_resume_compares_what_the_json_made_of_the_config(hf_json, tmp_path):
    """The adopted keys are in the checkpoint's config: the same JSON resumes without a change, another
    optimizer type is refused (optim.name), a new optim.lr is applied."""
    saved, _ = _reconciled(_raw(hf_json[2]))
    same, _ = _reconciled(_raw(hf_json[2]))
    assert resume_changes(saved.to_dict(), same, "step-00000006") == []
    sgd = tmp_path / "sgd.json"
    sgd.write_text(json.dumps({**json.loads(HF_ZERO2), "optimizer": {"type": "SGD", "params": {"lr": "auto", "momentum": "auto"}}}))
    other, _ = _reconciled(_raw(sgd))
    with pytest.raises(ConfigError, match="written with optim.name=adamw, this run has optim.name=sgd"):
        resume_changes(saved.to_dict(), other, "step-00000006")
    lower, _ = _reconciled(_raw(hf_json[2], lr=0.001))
    assert resume_changes(saved.to_dict(), lower, "step-00000006") == ["optim.lr: 0.002 -> 0.001 (applied: the new peak LR takes effect at the resumed step, on the same schedule position)"]


# ---------------------------------------------------------------- real 2-process runs with the published JSONs


def test_a_run_starts_with_the_lines_naming_what_came_from_the_json(hf_json):
    """What `dist-train train` prints first (run.py's start: config, launch facts, the JSON, process groups)."""
    from dist_train.run import _start

    cfg, groups, lines = _start(MLP, ["strategy.name=deepspeed", f"strategy.deepspeed.config={hf_json[3]}", "optim.name=adamw", "optim.warmup_steps=5"])
    groups.teardown()
    assert f"dist-train: strategy.deepspeed.zero_stage=3 (from {hf_json[3]}: zero_optimization.stage=3)" in lines
    assert f'dist-train: optim.schedule=warmup_lr (from {hf_json[3]}: scheduler.type="WarmupLR")' in lines
    assert (cfg.optim.schedule, cfg.optim.warmup_type, cfg.strategy.deepspeed.zero_stage) == ("warmup_lr", "log", 3)


@pytest.fixture(scope="module")
def hf_runs(hf_json, tmp_path_factory):
    """ZeRO-2 stopped at step 6 and resumed to 12; ZeRO-3 straight to 12; the JSONs as published (DeepSpeed's
    CPU Adam under offload_optimizer: `make deepspeed-ops` builds it once; a fresh build takes minutes)."""
    out = tmp_path_factory.mktemp("hf_runs")
    result = worker("ds_json_runs.py", [str(out), str(hf_json[2]), str(hf_json[3])], timeout=600)
    return out, json.loads((out / "results.json").read_text()), result.output


@pytest.mark.slow
def test_hugging_face_zero2_trains_with_deepspeeds_warmup_lr_across_a_stop_and_resume(hf_json, hf_runs):
    out, results, output = hf_runs
    assert f'optim.schedule=warmup_lr (from {hf_json[2]}: scheduler.type="WarmupLR")' in results["zero2_stopped"]["lines"]
    assert results["zero2_stopped"]["interrupted_at"] == 6
    assert results["zero2_resumed"]["optim"] == results["zero2_stopped"]["optim"]  # the same run: nothing to refuse
    assert re.search(r"resumed from \S+step-00000006 at optimizer step 6", output), output[-3000:]
    rows = {row["step"]: row for row in read_history(out / "zero2") if "train/lr" in row}
    assert sorted(rows) == list(range(1, 13))
    # What DeepSpeed's own WarmupLR gives after each step (the log shows the LR of the next step).
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.002)
    warmup = lr_schedules.WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=0.002, warmup_num_steps=5)
    expected = []
    for _ in range(12):
        optimizer.step()
        warmup.step()
        expected.append(optimizer.param_groups[0]["lr"])
    assert [rows[step]["train/lr"] for step in range(1, 13)] == pytest.approx(expected, rel=1e-12)
    assert rows[12]["train/loss"] < rows[1]["train/loss"] - 1.0, rows


@pytest.mark.slow
def test_hugging_face_zero3_runs_the_same_training_as_zero2_stopped_and_resumed(hf_json, hf_runs):
    out, results, _ = hf_runs
    assert f"strategy.deepspeed.zero_stage=3 (from {hf_json[3]}: zero_optimization.stage=3)" in results["zero3"]["lines"]
    zero2, zero3 = (torch.load(out / run / "model.pt", weights_only=True) for run in ("zero2", "zero3"))
    assert set(zero2) == set(zero3)
    for name, value in zero3.items():
        # fp32 AdamW on both; ZeRO-3 gathers where ZeRO-2 reduce-scatters, so sums may round differently.
        torch.testing.assert_close(zero2[name], value, rtol=1e-5, atol=1e-6, msg=name)
    accuracies = [results[run]["summary"]["eval"]["eval/accuracy"] for run in ("zero2_resumed", "zero3")]
    assert accuracies[0] == accuracies[1] > 0.6
