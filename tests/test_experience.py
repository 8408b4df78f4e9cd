"""The everyday experience (issue 17): what a run leaves in its directory, what the terminal shows, eval of
any checkpoint, and the Python API. Multi-process runs are shared through module fixtures."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from .procs import REPO, assert_same_parameters, clean_env, dist_train, final_model, free_port, run, worker

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]


def on_terminal(cmd: list[str], timeout: float = 240) -> tuple[int, str]:
    """Run `cmd` with stdin/stdout/stderr on a pseudo-terminal (as a user's shell would); (exit status, text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a new pty is 0x0; tqdm would draw nothing
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=clean_env({"COLUMNS": "120"}), start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"timed out: {' '.join(cmd)}\n{b''.join(chunks).decode(errors='replace')[-3000:]}")
        return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass


def visible_lines(text: str) -> list[str]:
    """What each terminal line ends up showing: the text after its last carriage return."""
    return [line.split("\r")[-1] for line in text.replace("\r\n", "\n").split("\n")]


# ---------------------------------------------------------------- a 2-process run on a terminal


@pytest.fixture(scope="module")
def terminal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("terminal") / "run"
    cmd = [*TORCHRUN, "--master_port", str(free_port()), "-m", "dist_train", "train", "configs/cnn_digits.yaml",
           "train.epochs=1", "train.log_interval=3", "checkpoint.interval_steps=10", f"output_dir={out}"]  # fmt: skip
    status, text = on_terminal(cmd)
    assert status == 0, text[-3000:]
    return out, text


def test_log_lines_are_never_glued_to_the_progress_bar(terminal_run):
    _, text = terminal_run
    assert "%|" in text  # a bar was drawn (the workers saw a terminal)
    step_lines = [line for line in visible_lines(text) if re.search(r"step +\d+(/\d+)? \| epoch", line)]
    assert len(step_lines) >= 7
    for line in step_lines:
        assert line.startswith("step"), f"log line glued to a bar: {line!r}"
        assert "%|" not in line and "it/s" not in line


def test_log_lines_carry_step_total_elapsed_and_eta_and_eval_lines_their_step(terminal_run):
    _, text = terminal_run
    lines = visible_lines(text)
    step_lines = [line for line in lines if line.startswith("step ")]
    assert all(re.search(r"step +\d+/22 \|.* elapsed \d\d:\d\d \| eta \d\d:\d\d", line) for line in step_lines), step_lines
    assert any(line.startswith("eval at step 22:") for line in lines)
    assert any(re.match(r"checkpoint: saved .*step-00000010 \(\d+\.\ds\)", line) for line in lines)
    assert any(line.startswith("model: CNN: 28,938 parameters (28,938 trainable, 0 frozen)") for line in lines)
    # The resolved config goes to config.yaml; the terminal shows what differs from the preset.
    assert not any(line.startswith("resolved config") for line in lines)
    assert "  train.epochs: 10 -> 1" in lines


def test_the_run_directory_holds_logs_history_and_a_picture(terminal_run):
    out, text = terminal_run
    console = (out / "logs" / "console.log").read_text()
    assert "done: 22 optimizer steps" in console and "step 21/22" in console and "%|" not in console
    assert (out / "logs" / "rank-0.log").exists() and (out / "logs" / "rank-1.log").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9, 12, 15, 18, 21, 22]
    assert rows[-1]["eval/accuracy"] == json.loads((out / "summary.json").read_text())["eval"]["eval/accuracy"]
    from PIL import Image

    with Image.open(out / "curves.png") as picture:
        picture.load()
        assert picture.width > 600 and picture.height > 200


# ---------------------------------------------------------------- the Python API: own model, dataset, metric


@pytest.fixture(scope="module")
def api_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("api")
    straight, resumed = base / "straight", base / "resumed"
    worker("api_train.py", [str(straight)])
    stopped = worker("api_train.py", [str(resumed), "train.stop_at_step=7"], check=False)
    assert (resumed / "checkpoints" / "step-00000007" / "COMPLETE").exists(), stopped.output[-3000:]
    worker("api_train.py", [str(resumed), "train.resume=auto"])
    return straight, resumed


def test_python_api_trains_a_model_object_on_a_users_dataset_and_resumes_exactly(api_runs):
    straight, resumed = api_runs
    assert_same_parameters(final_model(straight), final_model(resumed))
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["optimizer_steps"] == 18 and summary["world_size"] == 2
    assert summary["eval"]["eval/correct"] == summary["eval"]["eval/accuracy"] > 0.9  # the user's metric, exact


def test_metrics_history_has_strictly_increasing_steps_across_a_stop_and_resume(api_runs):
    straight, resumed = api_runs
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 18
    console = (resumed / "logs" / "console.log").read_text()
    assert console.count("--- ") == 2 and "stopped on request at optimizer step 7" in console and "resumed from" in console


def test_plot_draws_two_runs_into_one_picture(api_runs, terminal_run, tmp_path):
    picture = tmp_path / "both.png"
    result = dist_train(["plot", str(api_runs[1]), str(terminal_run[0]), "--out", str(picture)])
    assert "wrote" in result.stdout
    from PIL import Image

    with Image.open(picture) as image:
        assert image.width > 600


# ---------------------------------------------------------------- errors once, before anything long


def test_a_config_error_under_torchrun_is_said_once_before_any_long_output():
    cmd = [*TORCHRUN, "--master_port", str(free_port()), "-m", "dist_train", "train", "configs/cnn_digits.yaml", "train.global_batch_size=100"]
    status, text = on_terminal(cmd, timeout=120)
    assert status != 0
    lines = visible_lines(text)
    errors = [i for i, line in enumerate(lines) if "config error" in line]
    assert len(errors) == 1, text
    assert errors[0] < 8, text  # only torchrun's 4-line OMP notice may come first


# ---------------------------------------------------------------- ZeRO-3: no warning flood; eval on 1 process


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3") / "run"
    result = dist_train(["train", "configs/mlp_digits.yaml", "strategy.name=deepspeed", "strategy.deepspeed.zero_stage=3", "train.max_steps=30",
                         "train.log_interval=10", f"output_dir={out}"], nproc=2)  # fmt: skip
    return out, result


def test_zero3_prints_no_deprecation_flood(zero3_run):
    _, result = zero3_run
    assert not [line for line in result.output.splitlines() if "deprecat" in line.lower()], result.output[-3000:]
    assert len(result.output.splitlines()) < 40


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    dist_train(["train", "configs/mlp_digits.yaml", "strategy.name=fsdp2", "train.max_steps=10", f"output_dir={out}"], nproc=2)
    return out


@pytest.mark.parametrize("target", ["run dir", "model.pt"])
def test_eval_of_a_2_process_zero3_checkpoint_on_1_process_without_strategy_flags(zero3_run, target):
    out, _ = zero3_run
    _eval_matches_training(out, target)


def test_eval_of_a_2_process_fsdp2_checkpoint_on_1_process_without_strategy_flags(fsdp2_run):
    _eval_matches_training(fsdp2_run, "run dir")


def _eval_matches_training(out: Path, target: str) -> None:
    trained = json.loads((out / "summary.json").read_text())["eval"]
    path = out if target == "run dir" else out / "model.pt"
    result = dist_train(["eval", f"checkpoint={path}"])
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["optimizer_step"] == json.loads((out / "summary.json").read_text())["optimizer_steps"]
    assert measured["eval/accuracy"] == pytest.approx(trained["eval/accuracy"], abs=1e-12)
    assert measured["eval/loss"] == pytest.approx(trained["eval/loss"], rel=1e-6)
    assert "torch.distributed is disabled" not in result.output


def test_eval_errors_speak_of_checkpoint(tmp_path, capsys):
    from dist_train.cli import main

    assert main(["eval", f"checkpoint={tmp_path / 'nothing'}"]) != 0
    err = capsys.readouterr().err
    assert "checkpoint=" in err and "train.resume" not in err
    torch.save({}, tmp_path / "model.pt")  # a weights file with no config.yaml beside it
    assert main(["eval", f"checkpoint={tmp_path / 'model.pt'}"]) == 2
    assert "also give the CONFIG it was trained with" in capsys.readouterr().err


def test_the_console_script_imports_a_model_module_from_the_current_directory(tmp_path):
    (tmp_path / "mymodels.py").write_text("from torch import nn\nclass Tiny(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(64, 10)\n    def forward(self, x):\n        return self.fc(x.flatten(1))\n")
    script = Path(sys.executable).parent / "dist-train"
    result = run([script, "train", str(REPO / "configs" / "mlp_digits.yaml"), "model.name=mymodels:Tiny", "model.input_shape=[1,8,8]", "model.task=classification",
                  "data.source=digits", "train.max_steps=2", "output_dir=out"], cwd=tmp_path, env={"PYTHONPATH": str(REPO)})  # fmt: skip
    assert "done: 2 optimizer steps" in result.stdout


# ---------------------------------------------------------------- accelerate asked for N, started 1


def test_accelerate_asked_for_two_processes_but_starting_one_is_refused_in_one_line(tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {"HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}  # no default accelerate config of the machine's user
    result = run([accelerate, "launch", "--quiet", "--num_processes", "2", "-m", "dist_train", "train", "configs/cnn_digits.yaml",
                  f"output_dir={tmp_path / 'out'}"], env=env, check=False, timeout=120)  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in result.output.splitlines() if line.startswith("dist-train:")]
    assert len(lines) == 1 and "launch error: accelerate launch was asked for several processes" in lines[0]
    assert "configs/accelerate/ddp.yaml" in lines[0] and not (tmp_path / "out" / "checkpoints").exists()


def test_a_multi_cpu_accelerate_environment_is_told_apart_from_a_real_single_process_launch():
    from dist_train.distributed.environment import LaunchError, detect_environment

    multi_cpu = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(LaunchError, match="asked for several processes"):
        detect_environment(multi_cpu)
    single = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True"}
    assert detect_environment(single).world_size == 1
