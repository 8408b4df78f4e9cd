"""The behaviour every strategy shares, run for each of them (ddp, fsdp2, deepspeed) on real 2-process gloo
groups: a new backend added to STRATEGIES gets these tests by adding its name to STRATEGY_NAMES.

- 2 ranks x 2 accumulation steps with clipping equal the hand-written loop on the same batches;
- a run stopped mid-epoch and resumed is bitwise equal to the straight run;
and FSDP2's own: DCP checkpoints that DDP resumes (and the reverse) on another world size with each
remaining sample delivered once, export into the tutorial model, bf16 through MixedPrecisionPolicy.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dist_train.config import load_config
from dist_train.data import GlobalBatchPlan, load_source
from dist_train.data.transforms import adapt_images
from dist_train.export import export_checkpoint
from dist_train.models import build_model, model_spec
from dist_train.strategies import STRATEGIES
from dist_train.strategies.dcp import load_dcp_full
from tests.hand_loop import tutorial_loop
from tests.procs import REPO, dist_train, worker

pytestmark = pytest.mark.slow

STRATEGY_NAMES = [name for name in STRATEGIES if name != "deepspeed" or importlib.util.find_spec("deepspeed")]
STEPS, STOP, CLIP = 6, 3, 0.5
# global batch 32 = micro 8 x 2 ranks x 2 accumulation steps; SGD with momentum; clipping is active (norms ~1-3)
COMMON = ["data.source=digits", f"train.max_steps={STEPS}", "train.global_batch_size=32", "train.micro_batch_size=8", "optim.name=sgd",
          "optim.lr=0.1", "optim.momentum=0.9", "optim.schedule=constant", f"train.grad_clip={CLIP}", "train.log_interval=2",
          "checkpoint.interval_steps=2", "checkpoint.keep_latest=5"]


@pytest.fixture(scope="module", params=["mlp_digits.yaml", "cnn_digits.yaml"])
def scenarios(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param.split(".")[0])
    worker("strategy_scenarios.py", [out, request.param, str(STOP), ",".join(STRATEGY_NAMES), *COMMON], nproc=2, timeout=600)
    return {"preset": request.param, "out": out, "hand": tutorial_loop(request.param, COMMON, batch_size=32, steps=STEPS, clip=CLIP)}


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_two_ranks_with_accumulation_and_clipping_equal_the_hand_written_loop(scenarios, strategy):
    trained = torch.load(scenarios["out"] / f"{strategy}-straight" / "model.pt", weights_only=True)
    for name, reference in scenarios["hand"].items():
        torch.testing.assert_close(trained[name], reference, rtol=1e-5, atol=1e-6, msg=f"{strategy}: {name}")


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_stopped_and_resumed_mid_epoch_is_bitwise_equal_to_straight(scenarios, strategy):
    straight = torch.load(scenarios["out"] / f"{strategy}-straight" / "model.pt", weights_only=True)
    resumed = torch.load(scenarios["out"] / f"{strategy}-resumed" / "model.pt", weights_only=True)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), f"{strategy}: {name}"
    meta = json.loads((scenarios["out"] / f"{strategy}-resumed" / "checkpoints" / f"step-{STOP:08d}" / "meta.json").read_text())
    assert meta["strategy"] == strategy and meta["step"] == STOP


# ---------------------------------------------------------------- FSDP2's checkpoints are DDP's


def _expected_inputs(config_overrides: list[str], epoch: int, first_step: int, world: int, rank: int) -> list[torch.Tensor]:
    cfg = load_config(REPO / "configs" / "mlp_digits.yaml", config_overrides)
    spec = model_spec(cfg.model)
    source = load_source(cfg.data, spec)
    plan = GlobalBatchPlan(len(source.train), cfg.train.global_batch_size, cfg.train.seed)
    order = plan.epoch_order(epoch)
    return [adapt_images(source.train.inputs[plan.rank_slice(order, step, rank, world)], spec.input_shape) for step in range(first_step, plan.steps_per_epoch)]


@pytest.mark.parametrize("saved_by, resumed_by, world", [("fsdp2", "ddp", 1), ("ddp", "fsdp2", 1)])
def test_fsdp2_and_ddp_resume_each_others_checkpoints_on_another_world_size(scenarios, saved_by, resumed_by, world, tmp_path):
    if scenarios["preset"] != "mlp_digits.yaml":
        pytest.skip("one model is enough for the checkpoint format")
    checkpoint = scenarios["out"] / f"{saved_by}-straight" / "checkpoints" / f"step-{4:08d}"
    overrides = [*COMMON, f"strategy.name={resumed_by}", f"output_dir={tmp_path / 'run'}", f"train.resume={checkpoint}", "train.max_steps=8"]
    worker("ckpt_resume_probe.py", [tmp_path / "probe", REPO / "configs" / "mlp_digits.yaml", *overrides], nproc=world, timeout=300)
    probe = torch.load(tmp_path / "probe" / "rank-0.pt", weights_only=True)
    assert probe["optimizer_step"] == 4 and probe["position"]["samples_consumed"] == 4 * 32
    saved = load_dcp_full(checkpoint)
    for name, value in saved["model"].items():
        assert torch.equal(probe["model"][name].full_tensor() if hasattr(probe["model"][name], "full_tensor") else probe["model"][name], value), name
    # Each remaining sample of the epoch, exactly once, in the plan's order (one rank holds all of them).
    expected = _expected_inputs(overrides, epoch=0, first_step=4, world=world, rank=0)
    assert len(probe["steps"]) == len(expected) and all(torch.equal(a, b) for a, b in zip(probe["steps"], expected))
    assert probe["checkpoint"] == str(checkpoint)


def test_an_fsdp2_checkpoint_exports_into_the_tutorial_model_with_the_same_accuracy(scenarios, tmp_path):
    run = scenarios["out"] / "fsdp2-straight"
    assert export_checkpoint(str(run), str(tmp_path / "model.pt")) == 0
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    model = build_model(load_config(REPO / "configs" / scenarios["preset"], COMMON).model)
    model.load_state_dict(exported, strict=True)
    for name, value in torch.load(run / "model.pt", weights_only=True).items():
        assert torch.equal(exported[name], value), name
    summary = json.loads((run / "summary.json").read_text())
    cfg = load_config(REPO / "configs" / scenarios["preset"], COMMON)
    spec = model_spec(cfg.model)
    test = load_source(cfg.data, spec).test
    with torch.no_grad():
        predictions = model.eval()(adapt_images(test.inputs, spec.input_shape)).argmax(dim=1)
    assert (predictions == test.targets).double().mean().item() == pytest.approx(summary["eval"]["eval/accuracy"], abs=1e-12)


def test_fsdp2_bf16_mixed_precision_trains_and_checkpoints_fp32(tmp_path):
    out = tmp_path / "bf16"
    result = dist_train(["train", "configs/cnn_digits.yaml", "data.source=digits", "strategy.name=fsdp2", "train.precision=bf16", "train.max_steps=20",
                         "train.log_interval=5", "optim.schedule=constant", "train.progress_bar=false", f"output_dir={out}"], nproc=2, timeout=300)
    losses = [float(line.split("| loss ")[1].split()[0]) for line in result.output.splitlines() if "| loss " in line]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
    saved = load_dcp_full(out / "checkpoints" / f"step-{20:08d}")
    assert all(v.dtype == torch.float32 for v in saved["model"].values() if v.is_floating_point())
    assert all(v.dtype == torch.float32 for v in torch.load(out / "model.pt", weights_only=True).values() if v.is_floating_point())


DICT_CONFIG = """\
# a user's model with its own loss, on a user's dataset of dict samples: global batch 32 = micro 8 x 2 ranks x 2
model: {name: "tests.nets:DictBatchNet", input_shape: [1, 8, 8], task: classification}
data: {source: "tests.nets:digits_as_dicts"}
optim: {name: sgd, lr: 0.3, momentum: 0.9}
train: {global_batch_size: 32, micro_batch_size: 8, max_steps: 16, log_interval: 4, progress_bar: false}
checkpoint: {interval_steps: 4}
"""


def test_a_model_with_its_own_loss_on_dict_batches_trains_and_resumes_under_ddp_and_fsdp2(tmp_path):
    config = tmp_path / "dict_batches.yaml"
    config.write_text(DICT_CONFIG)
    worker("strategy_scenarios.py", [tmp_path / "out", config, "5", "ddp,fsdp2"], nproc=2, timeout=600)
    models = {}
    for strategy in ("ddp", "fsdp2"):
        straight, resumed = (torch.load(tmp_path / "out" / f"{strategy}-{kind}" / "model.pt", weights_only=True) for kind in ("straight", "resumed"))
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), strategy
        summary = json.loads((tmp_path / "out" / f"{strategy}-straight" / "summary.json").read_text())
        assert summary["eval"]["eval/samples"] == 397 and summary["eval"]["eval/loss"] < 2.0  # ln 10 = 2.30 untrained
        models[strategy] = straight
    for name in models["ddp"]:
        torch.testing.assert_close(models["fsdp2"][name], models["ddp"][name], rtol=1e-5, atol=1e-6, msg=name)
