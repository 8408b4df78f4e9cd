"""ZeRO checkpoints on any world size and across backends, exactly; `dist-train verify-resume`.

One module fixture runs every multi-process scenario (tests/workers/zero_reshard.py), because each DeepSpeed
process spends ~20 s importing before its first step:
  save (2 processes)  the source runs (ZeRO-1 SGD+momentum, ZeRO-2, ZeRO-3, ZeRO-2 bf16, DDP, FSDP2; 6 steps,
                      checkpoint at step 3, truth.pt = what the strategy held when it saved) and resumes across
                      strategies on 2 processes
  one (1 process)     2 -> 1 for every stage, ZeRO-2 -> DDP (the other path), DDP -> ZeRO-2, the DeepSpeed pins,
                      a 1-process ZeRO-3 source run
  four (4 processes)  2 -> 4 for ZeRO-2 and ZeRO-3 (micro batch 6), the ZeRO-3 full-setter pin
  the CLI             `dist-train verify-resume` of the 1-process ZeRO-3 checkpoint on 2 processes (1 -> 2),
                      against a reference continuation on 3 processes (1 -> 3)
Each resume reports (verify_resume.record_run) what the strategy held before its first step and each step's loss.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from dist_train import cli
from dist_train.checkpoint import CheckpointError
from dist_train.verify_resume import compare_losses, compare_state, fitting_micro_batch
from tests.procs import REPO, dist_train, worker

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
from dist_train.strategies import zero_bridge  # noqa: E402  (needs DeepSpeed for its pickles)

SAVED = 3
# fp32, another world size or backend: the weights after the load are identical, the sums of the gradient
# reduction and of the logged loss run in another order. Measured over 3 steps: <= 9e-8 (README's resume table).
RTOL_FP32 = 1e-5
RTOL_BF16 = 1e-3  # bf16 weights from the same fp32 masters, bf16 compute: measured <= 1.1e-4

# scenario -> (source run, world size it resumed on)
RESHARDED = {
    "zero1_1": ("zero1", 1), "zero2_1": ("zero2", 1), "zero3_1": ("zero3", 1), "zero2_bf16_1": ("zero2_bf16", 1),
    "zero2_4": ("zero2", 4), "zero3_4": ("zero3", 4),
    "cli/resumed": ("zero3_one", 2), "cli/reference": ("zero3_one", 3),
}  # fmt: skip
ACROSS = {
    "zero2_as_ddp_2": "zero2", "zero3_as_fsdp2_2": "zero3", "ddp_as_zero3_2": "ddp", "fsdp2_as_zero1_2": "fsdp2",
    "zero2_as_ddp_1": "zero2", "ddp_as_zero2_1": "ddp",
}  # fmt: skip


@pytest.fixture(scope="module")
def reshard(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reshard")
    outputs = [worker("zero_reshard.py", ["save", str(out)], nproc=2, timeout=480).output]
    outputs.append(worker("zero_reshard.py", ["one", str(out)], nproc=1, timeout=480).output)
    outputs.append(worker("zero_reshard.py", ["four", str(out)], nproc=4, timeout=480).output)
    checkpoint = _checkpoint(out, "zero3_one")
    command = ["verify-resume", str(checkpoint), "--nproc-per-node", "2", "--steps", "3", "--reference-nproc-per-node", "3", "--keep-state-in", str(out / "cli")]
    verify = dist_train(command, timeout=480, check=False)
    found = {}
    for phase in ("save", "one", "four"):
        found.update(json.loads((out / f"{phase}.json").read_text()))
    for side in ("resumed", "reference"):
        found[f"cli/{side}"] = json.loads((out / "cli" / f"{side}-result.json").read_text())
    return {"out": out, "found": found, "outputs": "\n".join(outputs), "verify": verify}


def _checkpoint(out: Path, run: str, step: int = SAVED) -> Path:
    return out / run / "checkpoints" / f"step-{step:08d}"


def _loaded(reshard: dict, scenario: str) -> dict:
    out = reshard["out"]
    path = out / "cli" / f"{scenario.split('/')[1]}-loaded_state.pt" if scenario.startswith("cli/") else out / scenario / "loaded_state.pt"
    return torch.load(path, weights_only=False)


def _truth(reshard: dict, source: str) -> dict:
    return torch.load(reshard["out"] / source / "truth.pt", weights_only=False)


def _assert_same_state(truth: dict, loaded: dict, what: str) -> None:
    """Every fp32 weight, buffer and optimizer state tensor (exp_avg, exp_avg_sq, momentum_buffer, step) bit for bit."""
    assert truth["model"].keys() == loaded["model"].keys(), what
    for name, tensor in truth["model"].items():
        assert tensor.dtype == loaded["model"][name].dtype == torch.float32 and torch.equal(tensor, loaded["model"][name]), f"{what}: {name}"
    saved, got = truth["optimizer"]["state"], loaded["optimizer"]["state"]
    assert saved.keys() == got.keys(), what
    for name, state in saved.items():
        assert state.keys() == got[name].keys(), f"{what}: {name} has {sorted(state)} saved, {sorted(got[name])} loaded"
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got[name][key])), f"{what}: {name}.{key}"
    for key in ("lr", "initial_lr", "betas", "eps", "weight_decay", "momentum"):
        for a, b in zip(truth["optimizer"]["param_groups"], loaded["optimizer"]["param_groups"]):
            assert (key in a) == (key in b) and (key not in a or list(_seq(a[key])) == list(_seq(b[key]))), f"{what}: param group {key}"
    assert loaded["optimizer"]["scheduler"]["last_epoch"] == truth["optimizer"]["scheduler"]["last_epoch"] == SAVED, what


def _seq(value):
    return value if isinstance(value, (list, tuple)) else [value]


def _continuation(reshard: dict, run: str) -> dict[int, float]:
    losses = reshard["found"][run]["losses"]
    return {int(step): loss for step, loss in losses.items() if int(step) > SAVED}


def _losses(reshard: dict, scenario: str) -> dict[int, float]:
    return {int(step): loss for step, loss in reshard["found"][scenario]["losses"].items()}


# ---------------------------------------------------------------- another world size


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(RESHARDED))
def test_zero_checkpoint_loads_bit_identically_on_another_world_size(reshard, scenario):
    source, world_size = RESHARDED[scenario]
    result = reshard["found"][scenario]
    assert result["world_size"] == world_size and result["start_step"] == SAVED and result["strategy"] == "deepspeed"
    loaded = _loaded(reshard, scenario)
    _assert_same_state(_truth(reshard, source), loaded, f"{source} -> {world_size} processes")
    # Independently of dist_train's consolidation: DeepSpeed's own zero_to_fp32 of the same files.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        deepspeeds = get_fp32_state_dict_from_zero_checkpoint(str(_checkpoint(reshard["out"], source)), tag="zero")
    for name, tensor in deepspeeds.items():
        assert torch.equal(tensor.float(), loaded["model"][name]), f"{scenario}: {name} differs from zero_to_fp32"
    # verify-resume's own comparison with the checkpoint says the same.
    assert all(row["first_difference"] is None and row["compared"] == row["identical"] > 0 for row in result["state"]), result["state"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(RESHARDED))
def test_training_after_a_reshard_follows_the_uninterrupted_run(reshard, scenario):
    """LR schedule, step counts and data position carried: each step's loss stays within the reduction-order
    tolerance of the run that never stopped (the next samples in another order, or another LR, move it by ~1e-2)."""
    source, _ = RESHARDED[scenario]
    reference, resumed = _continuation(reshard, source), _losses(reshard, scenario)
    assert sorted(resumed) == [4, 5, 6]
    rtol = RTOL_BF16 if "bf16" in source else RTOL_FP32
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=rtol), (scenario, step, resumed, reference)


# ---------------------------------------------------------------- the other path, and across backends


@pytest.mark.slow
def test_zero_two_to_one_is_bit_identical_to_ddp_resumed_from_the_same_checkpoint(reshard):
    """The promise for another world size: exactly what the other path to the same state computes. ZeRO-2 on one
    process, resumed from the 2-process ZeRO-2 checkpoint, and DDP on one process resumed from the same checkpoint
    (through its DCP view) train the same steps bit for bit: losses and the final weights."""
    assert _losses(reshard, "zero2_1") == _losses(reshard, "zero2_as_ddp_1")
    zero, ddp = (torch.load(reshard["out"] / run / "run" / "model.pt", weights_only=True) for run in ("zero2_1", "zero2_as_ddp_1"))
    assert zero.keys() == ddp.keys() and all(torch.equal(zero[k], ddp[k]) for k in zero)


@pytest.mark.slow
def test_same_world_size_and_stage_resumes_with_deepspeeds_own_loader_bit_for_bit(reshard):
    assert _losses(reshard, "zero2_2") == _continuation(reshard, "zero2")
    _assert_same_state(_truth(reshard, "zero2"), _loaded(reshard, "zero2_2"), "ZeRO-2 2 -> 2")


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(ACROSS))
def test_checkpoint_resumes_under_another_strategy_with_model_and_optimizer_state(reshard, scenario):
    source = ACROSS[scenario]
    result = reshard["found"][scenario]
    assert result["start_step"] == SAVED and result["strategy"] != ("deepspeed" if source.startswith("zero") else source)
    _assert_same_state(_truth(reshard, source), _loaded(reshard, scenario), scenario)
    for step, loss in _continuation(reshard, source).items():
        assert _losses(reshard, scenario)[step] == pytest.approx(loss, rel=RTOL_FP32), (scenario, step)


# ---------------------------------------------------------------- the conversion: once, cached, complete, timed


@pytest.mark.slow
def test_conversion_runs_once_per_checkpoint_is_marked_complete_and_timed(reshard):
    out, outputs = reshard["out"], reshard["outputs"]
    for source in ("zero1", "zero2", "zero3", "zero2_bf16", "zero3_one"):
        checkpoint = _checkpoint(out, source)
        converted = re.findall(rf"checkpoint: converted {re.escape(str(checkpoint))} \(ZeRO partitions\) into \S+ in (\d+\.\d+)s", outputs + reshard["verify"].output)
        assert len(converted) == 1, (source, converted)
        view = checkpoint / zero_bridge.VIEW_DIR
        info = json.loads((view / zero_bridge.VIEW_INFO).read_text())
        assert (view / zero_bridge.VIEW_MARKER).is_file() and info["seconds"] > 0 and (view / ".metadata").is_file()
        assert zero_bridge.current_view(checkpoint) == view
    # Later loads of the same checkpoint read the view (zero2: 2 -> DDP converted it; 2 -> 1, 2 -> 4 and DDP on 1 read it).
    assert outputs.count(f"checkpoint: reading {_checkpoint(out, 'zero2')} through") >= 3
    assert not list(_checkpoint(out, "zero2").glob(".tmp-*"))
    # The checkpoint itself is untouched: its index entry (meta.json's sha256) still vouches for it.
    from dist_train.checkpoint import CheckpointIndex

    index = CheckpointIndex(out / "zero2" / "checkpoints")
    assert all(index.problem(entry) is None for entry in index.entries)


def test_a_view_made_from_other_files_is_not_read(tmp_path):
    step = tmp_path / "step-00000001"
    (step / zero_bridge.ZERO_TAG).mkdir(parents=True)
    (step / zero_bridge.ZERO_TAG / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    view = step / zero_bridge.VIEW_DIR
    view.mkdir()
    (view / zero_bridge.VIEW_INFO).write_text(json.dumps({"source_files": [["mp_rank_00_model_states.pt", 10]]}))
    assert zero_bridge.current_view(step) is None  # no COMPLETE: a conversion that did not finish
    (view / zero_bridge.VIEW_MARKER).write_text("done\n")
    assert zero_bridge.current_view(step) == view
    (step / zero_bridge.ZERO_TAG / "mp_rank_00_model_states.pt").write_bytes(b"y" * 11)  # the ZeRO files changed since
    assert zero_bridge.current_view(step) is None


# ---------------------------------------------------------------- export and eval of a ZeRO checkpoint


@pytest.mark.slow
def test_export_reads_the_view_or_the_partitions_alike_with_the_optimizer_state(reshard, tmp_path):
    out = reshard["out"]
    truth = _truth(reshard, "zero2")
    converted, original = _checkpoint(out, "zero2"), _checkpoint(out, "zero2", 6)  # step 6 was never converted
    assert zero_bridge.current_view(converted) is not None and zero_bridge.current_view(original) is None
    assert cli.main(["export", str(converted), "--out", str(tmp_path / "m.pt"), "--tutorial-dict", str(tmp_path / "t.pt")]) == 0
    model, tutorial = torch.load(tmp_path / "m.pt"), torch.load(tmp_path / "t.pt")
    assert all(torch.equal(model[k], truth["model"][k]) for k in truth["model"])
    names = list(truth["model"])  # the tutorial's parameter order: torch.optim's ids 0..N-1
    for i, name in enumerate(names):
        assert torch.equal(tutorial["optimizer_state_dict"]["state"][i]["exp_avg_sq"], truth["optimizer"]["state"][name]["exp_avg_sq"])
    assert cli.main(["export", str(original), "--out", str(tmp_path / "m6.pt")]) == 0
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        deepspeeds = get_fp32_state_dict_from_zero_checkpoint(str(original), tag="zero")
    exported = torch.load(tmp_path / "m6.pt")
    assert all(torch.equal(exported[k], v.float()) for k, v in deepspeeds.items())
    assert zero_bridge.current_view(original) is None  # export wrote nothing beside the checkpoint


@pytest.mark.slow
def test_eval_of_a_two_process_zero3_checkpoint_on_one_process_matches_the_trainers_eval(reshard, capsys):
    run = reshard["out"] / "zero3"
    capsys.readouterr()
    assert cli.main(["eval", f"checkpoint={run}"]) == 0  # its newest, step 6; one process, here
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())["eval"]
    assert report["optimizer_step"] == 6 and report["eval/accuracy"] == pytest.approx(summary["eval/accuracy"], abs=1e-12)
    assert report["eval/loss"] == pytest.approx(summary["eval/loss"], rel=1e-6)


# ---------------------------------------------------------------- the command


@pytest.mark.slow
def test_verify_resume_command_prints_the_table_and_passes(reshard):
    verify = reshard["verify"]
    assert verify.returncode == 0, verify.output[-4000:]
    text = verify.stdout
    assert "resumed on 2 process(es), strategy.name=deepspeed ZeRO-3, micro batch 8" in text
    for part, count in (("model: fp32 weights, buffers", 6), ("optimizer state (moments, step counts)", 18)):
        assert re.search(rf"{re.escape(part)}\s+{count}\s+{count}\s+-", text), text
    assert "losses: resumed vs reference (3 process(es), strategy.name=deepspeed ZeRO-3, micro batch 8); rtol 1e-05" in text
    assert re.search(r"^\s+4\s+\S+\s+\S+\s+\S+\s+\S+$", text, re.M) and "verify-resume: OK: state bit-identical; losses" in text


def test_compare_state_names_the_first_tensor_that_differs():
    saved = {"model": {"a": torch.zeros(3), "b": torch.ones(2)}, "optimizer": {"state": {"a": {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}}
    loaded_model = {"a": torch.zeros(3), "b": torch.tensor([1.0, 1.0 + 2**-23])}
    loaded_optimizer = {"state": {"a": {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}
    report = compare_state(saved, loaded_model, loaded_optimizer)
    assert not report.identical
    assert report.rows[0] == {"part": "model: fp32 weights, buffers", "compared": 2, "identical": 1, "first_difference": "b: max |difference| 1.19e-07"}
    loaded_optimizer["state"]["a"]["exp_avg"] = torch.zeros(3, dtype=torch.float64)
    assert compare_state(saved, saved["model"], loaded_optimizer).rows[1]["first_difference"] == "a.exp_avg: torch.float32[3] in the checkpoint, torch.float64[3] loaded"


def test_compare_losses_is_bitwise_or_within_rtol_and_needs_every_step():
    assert compare_losses({4: 1.0, 5: 2.0}, {4: 1.0, 5: 2.0}, 0)[1]
    assert not compare_losses({4: 1.0}, {4: 1.0 + 1e-12}, 0)[1]
    assert compare_losses({4: 1.0}, {4: 1.0 + 1e-12}, 1e-9)[1]
    assert not compare_losses({4: 1.0, 5: 2.0}, {4: 1.0}, 1e-3)[1]  # the resumed run stopped short


def test_micro_batch_is_fitted_to_the_world_size_with_the_global_batch_fixed():
    assert [fitting_micro_batch(48, 8, world) for world in (1, 2, 3, 4, 5)] == [8, 8, 8, 6, 8]  # 5: none fits, refused later


# ---------------------------------------------------------------- DeepSpeed behaviours the bridge works around


@pytest.mark.slow
def test_deepspeed_creates_optimizer_state_at_the_first_step_and_the_bridge_creates_it_itself(reshard):
    pins = reshard["found"]["pins"]
    # If these change, DeepSpeed initialises its state at setup again and zero_bridge._create_optimizer_state can go.
    assert pins["set_state_before_first_step_zero2"] == "TypeError: argument of type 'NoneType' is not iterable"
    assert pins["set_state_before_first_step_zero3"] == "KeyError: 'exp_avg'"
    _assert_same_state(_truth(reshard, "zero2"), _loaded(reshard, "zero2_1"), "moments set before the first step")


@pytest.mark.slow
def test_deepspeed_sets_only_the_master_weight_and_the_bridge_sets_the_module_weight(reshard):
    assert reshard["found"]["pins"]["set_master_leaves_module_weight"] is True
    # bf16: the module computes with bf16 copies of the masters; the first loss after the load is the source run's own.
    assert _losses(reshard, "zero2_bf16_1")[4] == _continuation(reshard, "zero2_bf16")[4]


@pytest.mark.slow
def test_deepspeeds_loader_still_refuses_another_world_size_so_the_bridge_loads_instead(reshard):
    assert "Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not currently supported" in reshard["found"]["pins"]["own_loader_other_world_size"]


@pytest.mark.slow
def test_universal_checkpoint_still_cannot_convert_sgd_momentum_so_it_is_not_used(reshard):
    # DeepSpeed #8608: ds_to_universal reads Adam's state by name. dist_train's default optimizer is SGD with momentum.
    assert reshard["found"]["pins"]["universal_conversion_of_sgd"] == "KeyError: 'exp_avg'"
    truth, loaded = _truth(reshard, "zero1"), _loaded(reshard, "zero1_1")
    assert set(truth["optimizer"]["state"]["linear_relu_stack.0.weight"]) == {"momentum_buffer"}
    _assert_same_state(truth, loaded, "ZeRO-1 SGD momentum 2 -> 1")


@pytest.mark.slow
def test_zero3_full_setter_reads_past_the_end_on_the_last_rank_and_the_bridge_cuts_the_piece_itself(reshard):
    by_rank = reshard["found"]["pins_four"]["set_master_zero3_uneven_by_rank"]
    assert by_rank[:3] == ["", "", ""] and "exceeds dimension size" in by_rank[3], by_rank
    _assert_same_state(_truth(reshard, "zero3"), _loaded(reshard, "zero3_4"), "ZeRO-3 2 -> 4 (10 biases over 4 ranks)")


# ---------------------------------------------------------------- what cannot carry over


def test_fp16_loss_scale_does_not_cross_strategies_or_world_sizes_and_says_so_in_one_line():
    meta = {"strategy": "deepspeed", "world_size": 2, "config": {"train": {"precision": "fp16"}, "strategy": {"deepspeed": {"zero_stage": 2}}}}
    with pytest.raises(CheckpointError) as error:
        zero_bridge.refuse_loss_scale_crossing(Path("ck"), meta, "bf16")
    message = str(error.value)
    assert "\n" not in message and "the fp16 loss scale does not carry" in message
    assert "resume it with strategy.name=deepspeed strategy.deepspeed.zero_stage=2 train.precision=fp16 on 2 processes" in message
    zero_bridge.refuse_loss_scale_crossing(Path("ck"), {**meta, "config": {"train": {"precision": "bf16"}}}, "fp32")  # no fp16: fine


def test_resume_table_refuses_neither_strategy_nor_zero_stage():
    from dist_train.checkpoint.resume_semantics import semantics_of

    assert semantics_of("strategy.name")[0] == "applied" and semantics_of("strategy.deepspeed.zero_stage")[0] == "applied"
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("Changing a key on resume") : readme.index("The refused keys are")]
    assert "strategy.deepspeed.zero_stage" not in table.split("| refused")[1].split("\n")[0]
