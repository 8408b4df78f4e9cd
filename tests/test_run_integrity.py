"""Run integrity: a checkpoint folder belongs to one run, restarts move forward, nothing non-finite or
inexact is saved, and outputs are atomic and owned.

Each test names the situation of the run-integrity issue it covers (1-9). Real processes: the CLI as a user
runs it (plain process or torchrun), real DCP checkpoints on disk.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import INDEX_FILE, TRASH_PREFIX, complete_checkpoints, read_meta
from dist_train.strategies.dcp import load_dcp_full
from dist_train.config import load_config
from dist_train.distributed.environment import detect_environment
from dist_train.checkpoint.lineage import LOCK_FILE, RUN_FILE, ResumePlan, RunInfo, acquire_lock
from dist_train.run import start_process_groups
from dist_train.trainer import RNGState, Trainer
from tests.procs import dist_train, worker

MLP = """\
# mlp on in-memory digits: global batch 64 = micro 32 x 1 rank x 2 accumulation; 22 steps/epoch
model: {name: mlp}
data: {source: digits}
optim: {name: sgd, lr: 0.01}
train: {global_batch_size: 64, micro_batch_size: 32, epochs: 1, log_interval: 2, progress_bar: false}
checkpoint: {interval_steps: 2, keep_latest: 1}
"""

EXACT = """\
# dropout + BatchNorm net streamed from the digits shards: global batch 32 = micro 8 x 2 ranks x 2 accumulation
# (1 process: x 4 accumulation)
model: {name: "tests.nets:DropoutBatchNormNet", input_shape: [1, 8, 8], task: classification}
data: {source: shards, path: data/digits}
optim: {name: adam, lr: 0.003}
train: {global_batch_size: 32, micro_batch_size: 8, epochs: 1, max_steps: 8, log_interval: 4, progress_bar: false}
checkpoint: {interval_steps: 4, keep_latest: 5}
"""


def _step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def _names(out: Path) -> list[str]:
    return [p.name for p in complete_checkpoints(out / "checkpoints")]


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("dist-train: ") and "error" in line]


@pytest.fixture(scope="module")
def mlp_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "mlp.yaml"
    path.write_text(MLP)
    return path


# ---------------------------------------------------------------- 1. lineage: the same preset run twice


@pytest.mark.slow
def test_same_preset_twice_is_refused_then_start_over_keeps_both_and_restart_resumes_its_own_run(mlp_config, tmp_path):
    out = tmp_path / "run"
    train = ["train", str(mlp_config), f"output_dir={out}"]
    dist_train([*train, "train.max_steps=4"])
    assert _names(out) == ["step-00000004"]
    first_run = json.loads((out / RUN_FILE).read_text())["run_id"]
    config_before = (out / "config.yaml").read_text()

    again = dist_train([*train, "train.max_steps=2", "optim.lr=0.05"], check=False)
    assert again.returncode == 2
    assert _error_lines(again.output) == [
        f"dist-train: config error: output_dir={out} already holds checkpoints and model.pt and summary.json of run "
        f"{first_run}; set train.resume=auto to continue it, choose another output_dir, or set train.start_over=true "
        f"to move them to {out / 'previous'}/ and start a new run"
    ]
    assert "Traceback" not in again.output
    assert _names(out) == ["step-00000004"] and (out / "config.yaml").read_text() == config_before  # nothing written

    second = dist_train([*train, "train.max_steps=2", "optim.lr=0.05", "train.start_over=true"])
    assert "train.start_over: moved the outputs of run" in second.output
    moved = list((out / "previous").glob(f"{first_run}-*"))
    assert len(moved) == 1 and _names(moved[0]) == ["step-00000004"] and (moved[0] / "model.pt").is_file()
    assert _names(out) == ["step-00000002"]  # keep_latest=1 kept the checkpoint it had just written
    second_run = json.loads((out / RUN_FILE).read_text())["run_id"]
    assert second_run != first_run and read_meta(_step_dir(out, 2))["run_id"] == second_run

    restarted = dist_train([*train, "train.max_steps=3", "optim.lr=0.05"], env={"TORCHELASTIC_RESTART_COUNT": "1"})
    assert f"resumed from {_step_dir(out, 2)} at optimizer step 2" in restarted.output
    assert _names(out) == ["step-00000003"]


def test_retention_and_auto_resume_see_only_their_own_run_and_never_delete_the_new_checkpoint(tmp_path):
    out = tmp_path / "shared"
    cfg = load_config(None, [*SMALL, f"output_dir={out}", "checkpoint.keep_latest=1"])
    env = start_process_groups(cfg, detect_environment())
    older = Trainer.build(cfg, env, RunInfo("older", "f", ResumePlan()))
    for step in (6, 8):
        older.checkpointer.save(step, older.stateful())
    newer = Trainer.build(cfg, env, RunInfo("newer", "f", ResumePlan("auto")))
    newer.checkpointer.save(2, newer.stateful())
    assert _names(out) == ["step-00000008", "step-00000002"]  # the index's order: the order they were written
    resumed = Trainer.build(cfg, env, RunInfo("newer", "f", ResumePlan("auto")))
    path, _ = resumed.checkpointer.resume(resumed.checkpointer.run.resume, resumed.stateful())
    assert path == _step_dir(out, 2) and resumed.progress.optimizer_step == 0


def test_an_edited_meta_json_neither_orders_nor_deletes_and_interrupted_purges_are_finished(tmp_path, capsys):
    out = tmp_path / "run"
    trainer = _trainer(out, "checkpoint.keep_latest=1")
    trainer.checkpointer.save(1, trainer.stateful())
    meta_file = _step_dir(out, 1) / "meta.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "step": 999}))
    trainer.checkpointer.save(2, trainer.stateful())
    assert _names(out) == ["step-00000002"]  # step 2 kept; the edited step-1 is not trusted (and not deleted)
    assert _step_dir(out, 1).is_dir()
    index = json.loads((out / "checkpoints" / INDEX_FILE).read_text())
    assert [e["step"] for e in index["entries"]] == [1, 2]

    # A purge interrupted between its rename and the end of its rmtree leaves a .trash- directory.
    trash = out / "checkpoints" / f"{TRASH_PREFIX}step-00000000"
    (trash / "sub").mkdir(parents=True)
    again = _trainer(out, "train.resume=auto")
    path, _ = again.checkpointer.resume("auto", again.stateful())
    assert path == _step_dir(out, 2) and not trash.exists()


# ---------------------------------------------------------------- 2. nothing non-finite is saved


@pytest.mark.slow
def test_a_diverged_run_saves_nothing_non_finite_keeps_the_good_checkpoints_and_a_restart_does_not_loop(mlp_config, tmp_path):
    train = ["train", str(mlp_config), "checkpoint.interval_steps=3", "train.log_interval=4", "checkpoint.keep_latest=2"]
    # The case: from the start, step 3 (an interval step, not a log step) is non-finite.
    fresh = dist_train([*train, f"output_dir={tmp_path / 'fresh'}", "optim.lr=1.0e+6"], check=False)
    assert fresh.returncode == 3
    assert _error_lines(fresh.output) == [
        "dist-train: error: training diverged: the loss or gradient norm became non-finite at optimizer step 3; "
        "nothing non-finite was saved (no checkpoint was saved). Lower optim.lr or set train.grad_clip, then resume "
        "with train.resume=auto (or a step-N path)"
    ]
    assert _names(tmp_path / "fresh") == []

    out = tmp_path / "run"
    dist_train([*train, f"output_dir={out}", "train.stop_at_step=6"], check=False)
    assert _names(out) == ["step-00000003", "step-00000006"]
    diverged = dist_train([*train, f"output_dir={out}", "optim.lr=1.0e+6", "train.resume=auto"], check=False)
    assert diverged.returncode == 3
    bad_step = int(re.search(r"non-finite at optimizer step (\d+)", diverged.output).group(1))
    assert bad_step > 6 and "the newest checkpoint is step 6" in diverged.output
    assert _names(out) == ["step-00000003", "step-00000006"]  # the good checkpoints survive keep_latest=2
    for name in _names(out):
        state = load_dcp_full(out / "checkpoints" / name)["model"]
        assert all(torch.isfinite(v).all() for v in state.values()), name
    assert json.loads((out / RUN_FILE).read_text())["diverged_at_step"] == bad_step

    restart = dist_train([*train, f"output_dir={out}", "optim.lr=1.0e+6"], env={"TORCHELASTIC_RESTART_COUNT": "1"}, check=False)
    assert restart.returncode == 2 and f"diverged at optimizer step {bad_step}; a restart would train into it again" in restart.output
    assert "optimizer steps planned" not in restart.output  # refused before training


@pytest.mark.slow
def test_fp16_steps_skipped_in_a_row_are_divergence_not_success(mlp_config, tmp_path):
    out = tmp_path / "fp16"
    result = dist_train(
        ["train", str(mlp_config), f"output_dir={out}", "optim.lr=1.0e+6", "train.precision=fp16", "train.max_consecutive_skipped_steps=5", "checkpoint.interval_steps=0"],
        check=False,
    )
    assert result.returncode == 3, result.output[-2000:]
    assert re.search(r"training diverged: (the fp16 loss scaler skipped \d+ optimizer steps in a row|the loss or gradient norm became non-finite)", result.output)
    assert "done:" not in result.output and not (out / "model.pt").exists()


# ---------------------------------------------------------------- 3. restarts move forward


@pytest.mark.slow
def test_a_restart_of_a_job_started_from_an_explicit_checkpoint_resumes_its_newest(mlp_config, tmp_path):
    source, out = tmp_path / "source", tmp_path / "run"
    dist_train(["train", str(mlp_config), f"output_dir={source}", "train.max_steps=2"])
    train = ["train", str(mlp_config), f"output_dir={out}", f"train.resume={_step_dir(source, 2)}", "checkpoint.keep_latest=3"]
    first = dist_train([*train, "train.stop_at_step=6"], check=False)
    assert f"resumed from {_step_dir(source, 2)} at optimizer step 2" in first.output
    assert _names(out) == ["step-00000004", "step-00000006"]
    restart = dist_train([*train, "train.max_steps=8"], env={"TORCHELASTIC_RESTART_COUNT": "1"})
    assert f"resumed from {_step_dir(out, 6)} at optimizer step 6" in restart.output
    assert json.loads((out / RUN_FILE).read_text())["parent"] == str(_step_dir(source, 2))


# ---------------------------------------------------------------- 4 + 5. dropout and BatchNorm: exact, and one model


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    config = root / "exact.yaml"
    config.write_text(EXACT)
    straight, resumed, single = root / "straight", root / "resumed", root / "single"
    dist_train(["train", str(config), f"output_dir={straight}"], nproc=2)
    stop = dist_train(["train", str(config), f"output_dir={resumed}", "train.stop_at_step=4"], nproc=2, check=False)
    finish = dist_train(["train", str(config), f"output_dir={resumed}", "train.resume=auto"], nproc=2)
    dist_train(["train", str(config), f"output_dir={single}"], nproc=1)
    return {"config": config, "straight": straight, "resumed": resumed, "single": single, "stop": stop, "finish": finish}


@pytest.mark.slow
def test_dropout_and_batchnorm_resume_is_bitwise(exact_runs):
    assert "stopped on request at optimizer step 4" in exact_runs["stop"].output
    assert "at optimizer step 4, epoch 0" in exact_runs["finish"].output
    straight, resumed = exact_runs["straight"], exact_runs["resumed"]
    a, b = torch.load(straight / "model.pt"), torch.load(resumed / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_a, full_b = load_dcp_full(_step_dir(straight, 8)), load_dcp_full(_step_dir(resumed, 8))
    for name, value in full_a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], full_b["optimizer"]["state"][name]["exp_avg"]), name


@pytest.mark.slow
def test_dropout_two_ranks_by_two_micro_batches_equal_one_process_by_four(exact_runs):
    two, one = torch.load(exact_runs["straight"] / "model.pt"), torch.load(exact_runs["single"] / "model.pt")
    parameters = [name for name, _ in torch.nn.Module.named_parameters(_model(exact_runs["config"]))]
    for name in parameters:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_batchnorm_eval_checkpoint_and_model_pt_describe_the_same_model(exact_runs):
    straight = exact_runs["straight"]
    model_pt = torch.load(straight / "model.pt")
    checkpoint = load_dcp_full(_step_dir(straight, 8))["model"]
    assert model_pt.keys() == checkpoint.keys()
    for key in model_pt:  # running_mean / running_var / num_batches_tracked included
        assert torch.equal(model_pt[key], checkpoint[key]), key
    summary = json.loads((straight / "summary.json").read_text())
    cfg = load_config(exact_runs["config"], [f"output_dir={straight / 'eval'}"])
    trainer = Trainer.build(cfg, start_process_groups(cfg, detect_environment()))
    trainer.strategy.unwrapped_model.load_state_dict(model_pt)
    metrics = trainer.evaluate()  # one process, the whole test split, from model.pt alone
    assert metrics["eval/accuracy"] == summary["eval"]["eval/accuracy"]
    assert metrics["eval/loss"] == pytest.approx(summary["eval"]["eval/loss"], rel=1e-6)


def _model(config: Path) -> torch.nn.Module:
    from dist_train.models import build_model

    return build_model(load_config(config).model)


# ---------------------------------------------------------------- 6. declared resume semantics


@pytest.mark.slow
def test_a_changed_lr_on_resume_takes_effect_and_is_logged_and_a_refused_key_names_both_values(mlp_config, tmp_path):
    out = tmp_path / "run"
    train = ["train", str(mlp_config), f"output_dir={out}", "tracking.tensorboard.enabled=true", "train.max_steps=8"]
    dist_train([*train, "train.stop_at_step=4"], check=False)
    resumed = dist_train([*train, "optim.lr=0.05", "train.resume=auto"])
    assert "resume: optim.lr: 0.01 -> 0.05 (applied" in resumed.output
    assert re.search(r"step +6/\d+ \| epoch 0 \| loss [0-9.]+ \| lr 5\.000e-02", resumed.output)
    from tests.test_tracking import scalars

    lr = scalars(out / "tensorboard")["train/lr"]
    assert lr[2] == pytest.approx(0.01) and lr[4] == pytest.approx(0.01) and lr[6] == pytest.approx(0.05) and lr[8] == pytest.approx(0.05)
    assert load_config(out / "config.yaml").optim.lr == 0.05

    refused = dist_train([*train, "train.seed=1", "train.resume=auto"], check=False)
    assert refused.returncode == 2
    assert _error_lines(refused.output) == [
        f"dist-train: config error: checkpoint {_step_dir(out, 8)} was written with train.seed=0, this run has train.seed=1; "
        "a resume cannot change it (the data order of every epoch is a function of the seed): set train.seed=0, "
        "or start a new run in another output_dir"
    ]


def test_every_config_key_has_declared_resume_semantics():
    from dist_train.config import all_keys
    from dist_train.checkpoint.resume_semantics import APPLIED, REFUSED, REPLANNED, semantics_of

    for key in all_keys():
        assert semantics_of(key)[0] in (APPLIED, REPLANNED, REFUSED), key


# ---------------------------------------------------------------- 7. no hang after an async save


@pytest.mark.slow
def test_wait_after_an_async_save_finalized_on_one_rank_only_does_not_hang(tmp_path):
    result = worker("async_wait_mismatch.py", [tmp_path / "run"], nproc=2, timeout=120)
    assert "rank 0: wait and all_reduce agree" in result.output and "rank 1: wait and all_reduce agree" in result.output
    assert _names(tmp_path / "run") == ["step-00000001"]


# ---------------------------------------------------------------- 8. outputs atomic and owned


@pytest.mark.slow
def test_the_end_of_run_checkpoint_is_written_before_the_final_evaluation(tmp_path):
    out = tmp_path / "run"
    model = ["model.name=tests.nets:FailsInEvaluation", "model.input_shape=[1,8,8]", "model.task=classification"]
    result = dist_train(["train", "configs/mlp_digits.yaml", "data.source=digits", f"output_dir={out}", "train.max_steps=3", "train.progress_bar=false", *model], check=False)
    assert result.returncode != 0 and "a bad label in the test split" in result.output
    assert _names(out) == ["step-00000003"]


def test_model_pt_is_replaced_atomically_when_writing_fails(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _trainer(out, "train.max_steps=2").fit()
    good = torch.load(out / "model.pt")
    real_save = torch.save

    def disk_full_halfway(obj, f, *args, **kwargs):
        f.write(b"\x80\x02partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_halfway)
    with pytest.raises(OSError, match="No space left"):
        _trainer(out, "train.max_steps=2", "train.resume=auto").fit()
    monkeypatch.setattr(torch, "save", real_save)
    again = torch.load(out / "model.pt")
    assert all(torch.equal(good[k], again[k]) for k in good)
    assert not [p for p in out.iterdir() if p.name.startswith(".model.pt")]  # no temporary left behind


@pytest.mark.slow
def test_a_second_job_on_a_locked_output_dir_is_refused_and_a_stale_lock_is_taken_over(mlp_config, tmp_path):
    out = tmp_path / "run"
    fd = acquire_lock(out)  # this test process plays the first job
    try:
        refused = dist_train(["train", str(mlp_config), f"output_dir={out}", "train.max_steps=2"], check=False)
    finally:
        os.close(fd)
    assert refused.returncode == 2
    assert f"output_dir={out} is in use by another job (host {os.uname().nodename}, pid {os.getpid()}," in refused.output
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written

    (out / LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": 999999, "started_at": "long ago"}))
    dist_train(["train", str(mlp_config), f"output_dir={out}", "train.max_steps=2"])
    assert _names(out) == ["step-00000002"]


# ---------------------------------------------------------------- 9. the smaller items


def test_yaml_1_1_floats_are_numbers(tmp_path):
    assert load_config(None, ["optim.lr=3e-4"]).optim.lr == 3e-4
    preset = tmp_path / "preset.yaml"
    preset.write_text("optim: {lr: 1e-3}\n")
    assert load_config(preset).optim.lr == 1e-3


def test_max_steps_without_epochs_trains_max_steps(tmp_path):
    summary = _trainer(tmp_path / "run", "train.epochs=0", "train.max_steps=5").fit()
    assert summary["optimizer_steps"] == 5


def test_a_micro_batch_that_lost_samples_weighs_its_loss_by_the_samples_it_kept(tmp_path):
    trainer = _trainer(tmp_path / "run", "data.skip_bad_samples=true", "optim.lr=1.0", "train.global_batch_size=16", "train.micro_batch_size=8")
    model = trainer.strategy.unwrapped_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    full = (torch.randn(8, 1000, generator=generator), torch.randn(8, 10, generator=generator))
    short = (torch.randn(3, 1000, generator=generator), torch.randn(3, 10, generator=generator))  # 5 samples skipped
    trainer.data.train.step_samples_kept = 11  # what the streaming loader agrees over the ranks for this step
    trainer._optimizer_step([full, short], trainer._new_window())
    reference = _model_like(trainer)
    reference.load_state_dict(before)
    inputs, targets = torch.cat([full[0], short[0]]), torch.cat([full[1], short[1]])
    torch.nn.functional.mse_loss(reference(inputs), targets).backward()  # the mean over the 11 samples used
    for name, param in reference.named_parameters():
        torch.testing.assert_close(model.state_dict()[name], before[name] - param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_rng_state_holds_only_this_ranks_own_device():
    state = RNGState(torch.device("cpu")).state_dict()
    assert "cuda" not in state
    RNGState(torch.device("cpu")).load_state_dict({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8})  # an older checkpoint: ignored on CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_state_on_cuda_is_one_generator_and_loads_with_fewer_visible_devices():
    device = torch.device("cuda", 0)
    state = RNGState(device).state_dict()
    assert torch.equal(state["cuda"], torch.cuda.get_rng_state(device))
    RNGState(device).load_state_dict(state)
    RNGState(device).load_state_dict({**state, "cuda": [state["cuda"]]})  # older list form, one visible GPU


# ---------------------------------------------------------------- helpers

SMALL = ["model.name=two_layer_net", "data.source=random", "data.num_samples=80", "train.global_batch_size=16", "train.micro_batch_size=16", "train.progress_bar=false"]


def _trainer(out: Path, *overrides: str) -> Trainer:
    cfg = load_config(None, [*SMALL, f"output_dir={out}", *overrides])
    return Trainer.build(cfg, start_process_groups(cfg, detect_environment()))


def _model_like(trainer: Trainer) -> torch.nn.Module:
    from dist_train.models import build_model

    return build_model(trainer.cfg.model)

