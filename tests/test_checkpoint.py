"""Checkpoints on real 2-process gloo runs: bitwise resume, resume across world sizes, a save killed
mid-write, export + eval, and refusal of checkpoints that do not fit.

One set of runs (module fixture) serves several tests, to keep CI time down:
  a    2 processes, straight through 2 epochs (22 steps), synchronous saves every 4 steps
  b    the same, asynchronous saves, stopped after step 5 (epoch 0) and step 15 (epoch 1), resumed each time
  d    resumes b's step 5 on 1 process (2 -> 1), async saves, trains to the end
  e    resumes d's step 12 (epoch 1) on 2 processes (1 -> 2), trains to the end
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from dist_train import cli
from dist_train.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    complete_checkpoints,
    find_checkpoint,
    read_meta,
)
from dist_train.strategies.dcp import load_dcp_full
from dist_train.config import ConfigError, load_config
from dist_train.data import GlobalBatchPlan, load_source
from dist_train.data.transforms import adapt_images
from dist_train.distributed.environment import detect_environment
from dist_train.export import export_checkpoint
from dist_train.models import build_model, model_spec
from dist_train.run import start_process_groups
from dist_train.trainer import Trainer
from tests.procs import dist_train, worker

CONFIG = """\
# mlp on digits: global batch 128 = micro 32 x 2 ranks x 2 accumulation (1 process: x 4); 11 steps/epoch
model: {name: mlp}
data: {source: digits}
optim: {name: adam, lr: 0.002, schedule: cosine, warmup_steps: 3}
train: {global_batch_size: 128, micro_batch_size: 32, epochs: 2, log_interval: 11, progress_bar: false}
checkpoint: {interval_steps: 4, keep_latest: 10}
"""
STEPS_PER_EPOCH = 11
TOTAL_STEPS = 22


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}/").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _flat(value, f"{prefix}{i}/").items()}
    return {prefix: tree}


def _assert_identical(a: dict, b: dict, what: str) -> None:
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{what}: {key} differs"
        else:
            assert a[key] == b[key], f"{what}: {key} = {a[key]!r} vs {b[key]!r}"


def _step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    config = root / "mlp_digits.yaml"
    config.write_text(CONFIG)
    train = ["train", str(config)]
    a, b, d, e = root / "a", root / "b", root / "d", root / "e"
    dist_train([*train, f"output_dir={a}"], nproc=2, timeout=300)
    async_b = [*train, f"output_dir={b}", "checkpoint.async_save=true", "train.resume=auto"]
    stops = [dist_train([*async_b, f"train.stop_at_step={step}"], nproc=2, timeout=300, check=False) for step in (5, 15)]
    finish = dist_train(async_b, nproc=2, timeout=300)
    worker("ckpt_resume_probe.py", [d / "probe", config, f"output_dir={d}", f"train.resume={_step_dir(b, 5)}", "checkpoint.async_save=true"], nproc=1, timeout=300)
    worker("ckpt_resume_probe.py", [e / "probe", config, f"output_dir={e}", f"train.resume={_step_dir(d, 12)}"], nproc=2, timeout=300)
    return {"config": config, "a": a, "b": b, "d": d, "e": e, "stops": stops, "finish": finish}


# ---------------------------------------------------------------- exact resume, same world size


@pytest.mark.slow
def test_stop_and_resume_is_bitwise_identical_to_a_straight_run(runs):
    first, second = runs["stops"]
    # A planned stop (train.stop_at_step) is not a failure: exit 0, torchrun reports no ChildFailedError.
    assert first.returncode == 0 and "stopped on request at optimizer step 5 (train.stop_at_step" in first.output
    assert "ChildFailedError" not in first.output
    assert "resumed from" in second.output and "step-00000005 at optimizer step 5, epoch 0" in second.output
    assert "stopped on request at optimizer step 15" in second.output
    assert "step-00000015 at optimizer step 15, epoch 1" in runs["finish"].output
    a, b = runs["a"], runs["b"]
    # Every checkpoint both runs wrote, including b's asynchronous ones taken while training went on.
    for step in (4, 8, 12, 16, 20, 22):
        _assert_identical(load_dcp_full(_step_dir(a, step)), load_dcp_full(_step_dir(b, step)), f"step {step}")
        assert json.loads((_step_dir(a, step) / "trainer.json").read_text())["data"] == json.loads((_step_dir(b, step) / "trainer.json").read_text())["data"]
    _assert_identical(torch.load(a / "model.pt"), torch.load(b / "model.pt"), "model.pt")
    final = load_dcp_full(_step_dir(b, 22))
    assert final["scheduler"]["last_epoch"] == TOTAL_STEPS and final["optimizer"]["state"]["linear_relu_stack.0.weight"]["step"].item() == TOTAL_STEPS
    meta = read_meta(_step_dir(b, 15))
    assert (meta["step"], meta["epoch"], meta["world_size"], meta["async_save"]) == (15, 1, 2, True)
    assert meta["config"]["train"]["stop_at_step"] == 15
    progress = json.loads((_step_dir(b, 15) / "trainer.json").read_text())["progress"]
    assert (progress["optimizer_step"], progress["epoch"], progress["samples_seen"]) == (15, 1, 15 * 128)
    assert progress["micro_step"] == 15 * 2  # per rank: 2 micro-batches per optimizer step
    assert not list((b / "checkpoints").glob(".tmp-*"))


# ---------------------------------------------------------------- other world sizes


def _expected_step_inputs(config: Path, epoch: int, first_step: int) -> list[torch.Tensor]:
    cfg = load_config(config)
    spec = model_spec(cfg.model)
    train = load_source(cfg.data, spec).train
    plan = GlobalBatchPlan(len(train), cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
    order = plan.epoch_order(epoch)
    gbs = cfg.train.global_batch_size
    return [adapt_images(train.inputs[order[s * gbs : (s + 1) * gbs]], spec.input_shape) for s in range(first_step, plan.steps_per_epoch)]


def _check_probe(probe_dir: Path, world_size: int, checkpoint: Path, config: Path, saved_world_size: int) -> None:
    probes = [torch.load(probe_dir / f"rank-{r}.pt") for r in range(world_size)]
    saved = load_dcp_full(checkpoint)
    step = read_meta(checkpoint)["step"]
    epoch, first_step = divmod(step, STEPS_PER_EPOCH)
    for rank, probe in enumerate(probes):
        assert probe["checkpoint"] == str(checkpoint) and probe["optimizer_step"] == step and probe["epoch"] == epoch
        _assert_identical(probe["model"], saved["model"], f"model on rank {rank}")
        _assert_identical(probe["optimizer_state"], saved["optimizer"]["state"], f"optimizer state on rank {rank}")
        if rank < saved_world_size:
            expected_rng = torch.load(checkpoint / f"rank-{rank}.state.pt", weights_only=True)["rng"]["torch"]
        else:  # a rank that did not exist keeps its fresh seed (train.seed + rank)
            expected_rng = torch.Generator().manual_seed(0 + rank).get_state()
        assert torch.equal(probe["rng"], expected_rng), f"rank {rank} RNG"
    # The rest of the epoch, each remaining sample once, in the order of the global plan.
    expected = _expected_step_inputs(config, epoch, first_step)
    assert all(len(p["steps"]) == len(expected) for p in probes)
    for s, want in enumerate(expected):
        got = torch.cat([p["steps"][s] for p in probes])
        assert torch.equal(got, want), f"step {first_step + s} of epoch {epoch}"


@pytest.mark.slow
def test_resume_two_processes_into_one(runs):
    _check_probe(runs["d"] / "probe", 1, _step_dir(runs["b"], 5), runs["config"], saved_world_size=2)
    summary = json.loads((runs["d"] / "summary.json").read_text())
    assert summary["optimizer_steps"] == TOTAL_STEPS and summary["world_size"] == 1 and summary["grad_accum_steps"] == 4
    assert summary["eval"]["eval/accuracy"] > 0.5
    assert read_meta(_step_dir(runs["d"], 12))["world_size"] == 1


@pytest.mark.slow
def test_resume_one_process_into_two(runs):
    _check_probe(runs["e"] / "probe", 2, _step_dir(runs["d"], 12), runs["config"], saved_world_size=1)
    summary = json.loads((runs["e"] / "summary.json").read_text())
    assert summary["optimizer_steps"] == TOTAL_STEPS and summary["world_size"] == 2
    assert summary["eval"]["eval/accuracy"] > 0.5


# ---------------------------------------------------------------- export and eval


@pytest.mark.slow
def test_export_loads_into_the_tutorial_model_with_the_trainers_accuracy(runs, tmp_path, capsys):
    b = runs["b"]
    assert export_checkpoint(str(b), str(tmp_path / "model.pt"), str(tmp_path / "tutorial.pt")) == 0
    cfg = load_config(runs["config"])
    spec = model_spec(cfg.model)
    model = build_model(cfg.model)
    model.load_state_dict(torch.load(tmp_path / "model.pt"))  # the tutorial's own line
    _assert_identical(model.state_dict(), torch.load(b / "model.pt"), "exported vs trainer's model.pt")

    tutorial = torch.load(tmp_path / "tutorial.pt")
    assert set(tutorial) == {"epoch", "model_state_dict", "optimizer_state_dict", "loss"} and tutorial["epoch"] == 2
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    optimizer.load_state_dict(tutorial["optimizer_state_dict"])
    saved = load_dcp_full(_step_dir(b, TOTAL_STEPS))["optimizer"]["state"]
    for i, (name, _) in enumerate(model.named_parameters()):
        assert torch.equal(optimizer.state_dict()["state"][i]["exp_avg"], saved[name]["exp_avg"])

    test = load_source(cfg.data, spec).test
    model.eval()
    with torch.no_grad():
        predictions = model(adapt_images(test.inputs, spec.input_shape)).argmax(dim=1)
    accuracy = (predictions == test.targets).double().mean().item()
    trainer_accuracy = json.loads((b / "summary.json").read_text())["eval"]["eval/accuracy"]
    assert accuracy == pytest.approx(trainer_accuracy, abs=1e-12)

    capsys.readouterr()
    assert cli.main(["eval", str(runs["config"]), f"checkpoint={b}"]) == 0  # one process: runs right here
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["checkpoint"] == str(_step_dir(b, TOTAL_STEPS)) and report["optimizer_step"] == TOTAL_STEPS
    assert report["eval/accuracy"] == pytest.approx(trainer_accuracy, abs=1e-12)


# ---------------------------------------------------------------- a save killed mid-write


@pytest.mark.slow
def test_rank_killed_during_save_leaves_previous_checkpoint_and_resume_auto_uses_it(runs, tmp_path):
    out = tmp_path / "killed"
    overrides = [str(runs["config"]), f"output_dir={out}", "checkpoint.interval_steps=2"]
    killed = worker("ckpt_kill_during_save.py", ["1", "2", *overrides], nproc=2, timeout=240, check=False)
    assert killed.returncode != 0
    checkpoints = out / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step-00000002"]
    partial = checkpoints / ".tmp-step-00000004"
    assert partial.is_dir() and list(partial.glob("*.distcp")) and not (partial / COMPLETE_MARKER).exists()
    assert find_checkpoint("auto", out) == _step_dir(out, 2)

    resumed = dist_train(["train", *overrides, "train.resume=auto", "train.stop_at_step=3"], nproc=1, timeout=240, check=False)
    assert f"resumed from {_step_dir(out, 2)} at optimizer step 2" in resumed.output, resumed.output[-3000:]
    assert "stopped on request at optimizer step 3" in resumed.output
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step-00000002", "step-00000003"]
    assert not list(checkpoints.glob(".tmp-*"))  # the next save removed the partial one


# ---------------------------------------------------------------- one process, in this process: refusal and bookkeeping

SMALL = ["model.name=two_layer_net", "data.source=random", "data.num_samples=80", "train.global_batch_size=16", "train.micro_batch_size=16", "train.progress_bar=false"]


def _trainer(out: Path, *overrides: str) -> Trainer:
    cfg = load_config(None, [*SMALL, f"output_dir={out}", *overrides])
    return Trainer.build(cfg, start_process_groups(cfg, detect_environment()))


def test_checkpoint_of_another_model_is_refused_naming_the_key(runs, tmp_path):
    with pytest.raises(ConfigError, match=r"written with model.name=mlp, this run has model.name=two_layer_net") as info:
        _trainer(tmp_path / "x").checkpointer.resume(str(runs["a"]), {})
    assert "set model.name=mlp" in str(info.value)


def test_same_named_model_with_other_shapes_is_refused_naming_the_parameter(tmp_path, monkeypatch):
    def user_model(version: str, hidden: int) -> None:
        package = tmp_path / version
        package.mkdir()
        (package / "usernet.py").write_text(
            "from torch import nn\n"
            f"class Net(nn.Sequential):\n    def __init__(self):\n        super().__init__(nn.Linear(1000, {hidden}), nn.ReLU(), nn.Linear({hidden}, 10))\n"
        )
        monkeypatch.syspath_prepend(str(package))
        sys.modules.pop("usernet", None)

    model = ["model.name=usernet:Net", "model.input_shape=[1000]", "model.task=regression", "model.num_classes=10"]
    user_model("v1", 8)
    first = _trainer(tmp_path / "run", *model)
    first.checkpointer.save(1, first.stateful())
    user_model("v2", 12)  # the user edited the model's code, its name stayed
    second = _trainer(tmp_path / "run", *model)
    with pytest.raises(CheckpointError, match=r"'0.weight' has shape \[8, 1000\] in the checkpoint and \[12, 1000\] in this model"):
        second.checkpointer.resume("auto", second.stateful())


def test_keep_latest_incomplete_directories_and_explicit_paths(tmp_path):
    trainer = _trainer(tmp_path / "run", "checkpoint.keep_latest=2")
    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3):
        trainer.checkpointer.save(step, trainer.stateful())
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step-00000002", "step-00000003"]
    # A newer directory without the marker (a crash between rename and marker cannot happen, but a copy can).
    incomplete = _step_dir(tmp_path / "run", 9)
    incomplete.mkdir()
    (incomplete / "meta.json").write_text(json.dumps({"step": 9}))
    assert find_checkpoint("auto", tmp_path / "run") == _step_dir(tmp_path / "run", 3)
    with pytest.raises(CheckpointError, match="incomplete"):
        find_checkpoint(str(incomplete), tmp_path)
    assert find_checkpoint("auto", tmp_path / "empty") is None  # resume=auto with nothing: fresh start
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        trainer.checkpointer.resume(str(tmp_path / "missing"), trainer.stateful())


def test_interval_seconds_and_async_save_on_one_process(tmp_path):
    # Time-based saves are agreed at log steps (one all-gather there, no collective or host sync per step).
    due = _trainer(tmp_path / "due", "checkpoint.interval_seconds=1e-9", "checkpoint.async_save=true", "checkpoint.save_at_end=false", "train.log_interval=2", "train.epochs=2", "train.max_steps=5")
    due.fit()
    assert [p.name for p in complete_checkpoints(tmp_path / "due" / "checkpoints")] == ["step-00000002", "step-00000004", "step-00000005"]
    assert read_meta(_step_dir(tmp_path / "due", 2))["async_save"] is True
    not_due = _trainer(tmp_path / "not_due", "checkpoint.interval_seconds=3600", "checkpoint.save_at_end=false", "train.log_interval=2", "train.epochs=2", "train.max_steps=5")
    not_due.fit()
    assert complete_checkpoints(tmp_path / "not_due" / "checkpoints") == []


WIDE_NET = [
    "model.name=tests.nets:DropoutBatchNormNet", "model.kwargs={width: 512}", "model.input_shape=[1,8,8]", "model.task=classification",
    "data.source=digits", "optim.name=adam", "optim.lr=0.003", "train.global_batch_size=32", "train.micro_batch_size=16",
    "train.max_steps=6", "train.log_interval=3", "train.progress_bar=false", "checkpoint.interval_steps=1", "checkpoint.keep_latest=10",
]  # fmt: skip


def test_async_checkpoint_holds_the_step_it_was_taken_at_while_training_goes_on(tmp_path):
    # An asynchronous save copies the state in a background thread while the loop runs on: the next
    # micro-batches' forwards rewrite BatchNorm's running statistics and the next optimizer step the weights
    # and Adam's moments. Every checkpoint must still equal the synchronous run's at its step. The net is
    # wide (~4 MB of state) so the copy is still running when the next step starts.
    runs = {}
    for mode in ("sync", "async"):
        cfg = load_config(None, [*WIDE_NET, f"output_dir={tmp_path / mode}", f"checkpoint.async_save={mode == 'async'}"])
        trainer = Trainer.build(cfg, start_process_groups(cfg, detect_environment()))
        try:
            trainer.fit()
        finally:
            trainer.close()
        runs[mode] = tmp_path / mode
    for step in range(1, 7):
        sync, written_async = load_dcp_full(_step_dir(runs["sync"], step)), load_dcp_full(_step_dir(runs["async"], step))
        assert sync["optimizer"]["state"]["head.weight"]["step"].item() == step
        _assert_identical(sync, written_async, f"step {step}")


def test_async_save_copies_the_state_before_the_next_optimizer_step_changes_it(tmp_path):
    # The tightest schedule the loop allows: the optimizer step right after save() returns, while the
    # background copy of the wide net's ~4 MB state has just begun (without the wait in optimizer_step this
    # fails: the checkpoint holds Adam's step count of the step after).
    from torch.distributed.checkpoint.state_dict import get_state_dict

    cfg = load_config(None, [*WIDE_NET, f"output_dir={tmp_path}", "checkpoint.async_save=true"])
    trainer = Trainer.build(cfg, start_process_groups(cfg, detect_environment()))
    strategy, batch = trainer.strategy, torch.randn(16, 1, 8, 8)

    def forward_backward() -> None:
        strategy.backward(strategy.model(batch).logsumexp(1).mean(), True)

    try:
        forward_backward()
        strategy.optimizer_step()  # Adam's moments exist
        for step in range(1, 6):
            forward_backward()
            model_state, optim_state = get_state_dict(strategy.unwrapped_model, strategy.optimizer)
            expected = {"model": {k: v.clone() for k, v in model_state.items()}, "state": {k: {n: t.clone() for n, t in v.items()} for k, v in optim_state["state"].items()}}
            path = trainer.checkpointer.save(step, trainer.stateful())
            strategy.optimizer_step()
            strategy.model(batch)  # a training forward: rewrites BatchNorm's running statistics
            trainer.checkpointer.wait()
            saved = load_dcp_full(path)
            assert not torch.equal(saved["model"]["head.weight"], strategy.unwrapped_model.head.weight.detach())  # training went on
            _assert_identical(expected, {"model": saved["model"], "state": saved["optimizer"]["state"]}, f"step {step}")
    finally:
        trainer.close()


def test_loading_refuses_pickled_code_in_dcp_metadata(tmp_path):
    trainer = _trainer(tmp_path / "run")
    path = trainer.checkpointer.save(1, trainer.stateful())

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="refusing to load"):
        trainer.checkpointer.resume(str(path), trainer.stateful())
    with pytest.raises(CheckpointError, match="refusing to load"):
        export_checkpoint(str(path), str(tmp_path / "model.pt"))
    assert not (tmp_path / "pwned").exists()
