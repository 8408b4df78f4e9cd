"""Experiment tracking (issue 7).

A 2-process job with W&B offline creates one run, read back from its `.wandb` file with W&B's own protobuf
classes; a resumed job continues that run with strictly increasing steps; TensorBoard holds the same
scalars; tracking failures never stop training; the API key is never written or printed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dist_train.config import Config, WandbConfig, load_config
from dist_train.distributed.environment import DistEnv
from dist_train.observe.tracking import (
    NullTracker,
    TensorBoardTracker,
    Tracker,
    TrackerGroup,
    WandbTracker,
    build_tracker,
    resolve_wandb_mode,
)
from dist_train.observe.wandb_offline import find_runs, read_run
from tests import procs

# Shaped like a real key (40+ word characters) so W&B would accept it; never valid anywhere.
FAKE_API_KEY = "dtfake_" + "k3y" * 14
TRAIN_KEYS = {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_second", "train/data_wait_fraction", "train/epoch",
              # several processes: the slowest rank and its skew (stragglers)
              "train/slowest_rank", "train/rank_skew", "train/slowest_rank_ms_per_step", "train/max_data_wait_ms_per_step"}
EVAL_KEYS = {"eval/loss", "eval/accuracy", "eval/samples"}
TRACKED = [
    "configs/cnn_digits.yaml",
    "optim.schedule=constant",
    "train.log_interval=1",
    "train.eval_interval=2",
    "train.progress_bar=false",
    "tracking.wandb.enabled=true",
    "tracking.wandb.mode=offline",
    "tracking.tensorboard.enabled=true",
]


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as TensorBoard itself reads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def console_losses(output: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step\s+(\d+)(?:/\d+)? \| epoch \d+ \| loss ([\d.]+)", output)}


# ---------------------------------------------------------------- real 2-process jobs


@pytest.fixture(scope="module")
def tracked_job(tmp_path_factory):
    """A 7-step job on 2 processes stopped after step 4 as a preemption would, then resumed to the end."""
    out = tmp_path_factory.mktemp("tracked")
    env = {"WANDB_API_KEY": FAKE_API_KEY}
    first_args = [*TRACKED, f"output_dir={out}", "train.max_steps=7", "train.stop_at_step=4"]
    first = procs.dist_train(["train", *first_args], nproc=2, timeout=240, env=env, check=False)
    # A planned stop exits 0 on every rank, so torchrun does not report it as a failure.
    assert first.returncode == 0 and "stopped on request at optimizer step 4 (train.stop_at_step" in first.stderr, first.output[-4000:]
    first_runs = find_runs(out / "wandb")
    second = procs.dist_train(["train", *TRACKED, f"output_dir={out}", "train.max_steps=7", "train.resume=auto"], nproc=2, timeout=240, env=env)
    return {"out": out, "first": first, "first_runs": first_runs, "first_args": first_args, "second": second}


@pytest.mark.slow
def test_two_process_job_creates_one_wandb_run_with_steps_keys_and_config(tracked_job):
    assert len(tracked_job["first_runs"]) == 1, tracked_job["first_runs"]
    run = read_run(tracked_job["first_runs"][0])
    assert run.steps == [1, 2, 3, 4]
    for row in run.history:
        expected = TRAIN_KEYS | (EVAL_KEYS if row["_step"] in (2, 4) else set())
        assert {k for k in row if not k.startswith("_")} == expected, row
    # The logged loss is the all-reduced one the console printed; the LR schedule is constant.
    printed = console_losses(tracked_job["first"].stdout)
    assert printed.keys() == {1, 2, 3, 4}
    for step, loss in run.series("train/loss").items():
        assert loss == pytest.approx(printed[step], abs=1e-4)
    assert set(run.series("train/lr").values()) == {0.002}
    assert run.config == load_config(TRACKED[0], tracked_job["first_args"][1:]).to_dict()
    assert run.display_name == Path(tracked_job["out"]).name and run.project == "dist_train"


@pytest.mark.slow
def test_resumed_job_continues_the_same_run_with_increasing_steps(tracked_job):
    out = tracked_job["out"]
    first_run = read_run(tracked_job["first_runs"][0])
    runs = find_runs(out / "wandb")
    assert len(runs) == 2 and runs[0] == tracked_job["first_runs"][0]
    resumed = read_run(runs[1])
    assert resumed.run_id == first_run.run_id
    assert "resumed from" in tracked_job["second"].stdout
    assert resumed.steps == [5, 6, 7]
    all_steps = first_run.steps + resumed.steps
    assert all(a < b for a, b in zip(all_steps, all_steps[1:]))
    assert set(resumed.series("eval/accuracy")) == {6, 7}  # every 2 steps, and the final eval
    assert resumed.config["train"]["max_steps"] == 7
    final_eval = (out / "summary.json").read_text()
    assert f'"eval/accuracy": {resumed.series("eval/accuracy")[7]}' in final_eval
    trainer_state = sorted((out / "checkpoints").glob("step-*/trainer.json"))[-1].read_text()
    assert f'"run_id": "{first_run.run_id}"' in trainer_state


@pytest.mark.slow
def test_tensorboard_holds_the_same_scalars_as_wandb(tracked_job):
    out = tracked_job["out"]
    logged: dict[str, dict[int, float]] = {}
    for run_dir in find_runs(out / "wandb"):
        for key in TRAIN_KEYS | EVAL_KEYS:
            logged.setdefault(key, {}).update(read_run(run_dir).series(key))
    board = scalars(out / "tensorboard")
    assert board.keys() == logged.keys()
    for key, series in logged.items():
        assert board[key].keys() == series.keys() == (set(range(1, 8)) if key in TRAIN_KEYS else {2, 4, 6, 7}), key
        for step, value in series.items():
            assert board[key][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, step)


@pytest.mark.slow
def test_api_key_is_never_written_or_printed(tracked_job):
    out = tracked_job["out"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any("tfevents" in p.name for p in files)
    leaked = [str(p) for p in files if FAKE_API_KEY.encode() in p.read_bytes()]
    assert leaked == []
    for result in (tracked_job["first"], tracked_job["second"]):
        assert FAKE_API_KEY not in result.output


@pytest.mark.slow
def test_wandb_unavailable_warns_once_and_training_finishes(tmp_path):
    # A `wandb` package that fails to import stands in for one that is not installed.
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named wandb (hidden by the test)')\n")
    out = tmp_path / "run"
    result = procs.dist_train(
        ["train", *TRACKED, f"output_dir={out}", "train.max_steps=3", "model.name=mlp"],
        nproc=1,
        timeout=180,
        env={"PYTHONPATH": f"{shadow.parent}:{procs.REPO}"},
    )
    warnings = [line for line in result.stderr.splitlines() if "W&B tracking failed" in line]
    assert len(warnings) == 1, result.stderr
    assert "training continues without W&B" in warnings[0] and "dist_train[tracking]" in warnings[0]
    assert (out / "summary.json").is_file() and not (out / "wandb").exists()
    assert set(scalars(out / "tensorboard")["train/loss"]) == {1, 2, 3}
    assert '"run_id"' not in (out / "checkpoints").joinpath("step-00000003", "trainer.json").read_text()


# ---------------------------------------------------------------- in-process: the group's guarantees


def _cfg(tmp_path: Path, **tracking: bool) -> Config:
    cfg = Config()
    cfg.output_dir = str(tmp_path)
    cfg.tracking.wandb.enabled = tracking.get("wandb", False)
    cfg.tracking.tensorboard.enabled = tracking.get("tensorboard", False)
    return cfg


def test_only_the_main_process_gets_real_trackers(tmp_path):
    cfg = _cfg(tmp_path, wandb=True, tensorboard=True)
    main = build_tracker(cfg, DistEnv())
    assert isinstance(main, TrackerGroup) and set(main.trackers) == {"history", "wandb", "tensorboard"}
    assert type(build_tracker(cfg, DistEnv(global_rank=1, local_rank=1, world_size=2, local_world_size=2))) is NullTracker
    # The plain metrics history is kept whatever the trackers: the end-of-run picture reads it.
    assert set(build_tracker(_cfg(tmp_path), DistEnv()).trackers) == {"history"}


def test_resume_never_logs_a_step_twice_and_tensorboard_hides_the_lost_tail(tmp_path):
    cfg = _cfg(tmp_path, tensorboard=True)
    first = build_tracker(cfg, DistEnv())
    first.start(cfg, 0)
    for step in (1, 2, 3, 4):
        first.log({"train/loss": float(step)}, step=step)
        if step == 2:
            first.log({"eval/loss": 0.5}, step=2)  # same step as a train log: kept
            checkpointed = first.state_dict()
    first.finish()  # steps 3 and 4 happened after the checkpoint: a crash loses them

    resumed = build_tracker(cfg, DistEnv())
    resumed.load_state_dict(checkpointed)
    resumed.start(cfg, 2)
    resumed.log({"eval/loss": 0.25}, step=2)  # re-evaluating the checkpoint's step: already logged
    for step in (3, 4):
        resumed.log({"train/loss": 10.0 * step}, step=step)
    resumed.finish()

    board = scalars(tmp_path / "tensorboard")
    assert board["eval/loss"] == {2: 0.5}
    assert board["train/loss"] == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}


class _FailsAtStep(Tracker):
    """A tracker whose backend breaks mid-run (a dependency double; the group is under test)."""

    name, key = "Flaky", "flaky"

    def __init__(self, fail_step: int) -> None:
        self.fail_step = fail_step
        self.steps: list[int] = []

    def log(self, metrics, step):
        if step == self.fail_step:
            raise ConnectionError("backend went away")
        self.steps.append(step)

    def state_dict(self):
        return {"run_id": "abc"}


def test_a_failing_tracker_is_dropped_with_one_warning(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    flaky = _FailsAtStep(fail_step=2)
    board = TensorBoardTracker(tmp_path / "tb")
    group = TrackerGroup([flaky, board])
    group.start(cfg, 0)
    for step in (1, 2, 3):
        group.log({"train/loss": 1.0 / step}, step=step)
    group.finish()
    assert flaky.steps == [1] and set(group.trackers) == {"tensorboard"}
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == ["dist_train: warning: Flaky tracking failed in log (ConnectionError: backend went away); training continues without Flaky"]
    assert set(scalars(tmp_path / "tb")["train/loss"]) == {1, 2, 3}
    assert group.state_dict()["flaky"] == {"run_id": "abc"}  # a later restart can still continue its run


def test_wandb_init_failure_is_a_warning(tmp_path, capsys):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    cfg = _cfg(tmp_path)
    group = TrackerGroup([WandbTracker(WandbConfig(enabled=True, mode="offline", dir=str(blocker / "sub")), str(tmp_path)), TensorBoardTracker(tmp_path / "tb")])
    group.start(cfg, 0)
    group.log({"train/loss": 1.0}, step=1)
    group.finish()
    assert set(group.trackers) == {"tensorboard"}
    assert "W&B tracking failed in start" in capsys.readouterr().err


def test_wandb_mode_is_offline_without_an_api_key(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_wandb_mode(None) == "offline"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_API_KEY}\n")  # `wandb login`
    assert resolve_wandb_mode(None) == "online"
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", FAKE_API_KEY)
    assert resolve_wandb_mode(None) == "online"
    assert resolve_wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_wandb_mode(None) == "offline"
