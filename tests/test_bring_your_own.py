"""Bringing your own script, checkpoints and images (issue 25): the Python API under torchrun (the same data
on every rank, a config error in one line from the main process), the tutorial's checkpoint dict round trip
through its own loop, and the small things a new user trips on (an image folder without images, grayscale
files, `dist-train train` alone, the choices in the help, a misspelt key, the stop line)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_train.cli import main as cli_main
from dist_train.config import ConfigError, load_config
from dist_train.data import load_source
from dist_train.data.transforms import adapt_images
from dist_train.export import export_checkpoint
from dist_train.models import build_model, model_spec
from dist_train.observe.tracking import read_history
from tests.hand_loop import tutorial_continue
from tests.procs import REPO, clean_env, free_port, kill_group, run

# ---------------------------------------------------------------- the Python API under torchrun

API_SCRIPT = """
import os, sys
import torch
from torch import nn
from torch.utils.data import TensorDataset
import dist_train

rank = os.environ["RANK"]
features = torch.randn(64, 4)  # unseeded: every process draws its own
labels = torch.zeros(64, dtype=torch.long)
parts = dict(model=lambda: nn.Linear(4, 2), train_dataset=TensorDataset(features[:48], labels[:48]), eval_dataset=TensorDataset(features[48:], labels[48:]))
config = {"train": {"global_batch_size": 16, "micro_batch_size": 8, "max_steps": 2}, "output_dir": sys.argv[1]}
try:
    dist_train.train(config, **parts)
except dist_train.ConfigError as e:  # a Python caller gets the exception
    print(f"rank {rank} caught: {e}", flush=True)
dist_train.train(config, "train.epohcs=2", **parts)  # uncaught: ends the script as the CLI would
print("not reached", flush=True)
"""


@pytest.mark.slow
def test_python_api_under_torchrun_refuses_different_data_per_rank_and_an_uncaught_config_error_is_one_line(tmp_path):
    script = tmp_path / "mine.py"
    script.write_text(API_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    result = run([*torchrun, str(script), str(tmp_path / "run")], cwd=tmp_path, env={"PYTHONPATH": str(REPO)}, timeout=300, check=False)
    for rank in (0, 1):
        assert f"rank {rank} caught: train_dataset differs between ranks (rank 1's length or samples are not rank 0's)" in result.stdout, result.output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("dist-train:")]
    assert len(errors) == 1 and errors[0].startswith("dist-train: config error: unknown config key 'train.epohcs'; did you mean train.epochs?"), result.stderr[-3000:]
    # No rank's traceback (torchrun's own ChildFailedError report follows); the worker exited as the CLI does.
    assert "not reached" not in result.stdout and "[rank" not in result.output and "ConfigError" not in result.output, result.output[-3000:]
    assert re.search(r"exitcode\s*: 2 ", result.output), result.output[-3000:]


def test_python_api_raises_a_config_error_for_the_caller(monkeypatch):
    import dist_train

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # train() wraps it for an uncaught error; restored after
    with pytest.raises(ConfigError, match="did you mean train.epochs"):
        dist_train.train(None, "train.epohcs=2")


# ---------------------------------------------------------------- the tutorial dict round trip

TUTORIAL_RUN = ["data.source=digits", "optim.name=adam", "optim.lr=0.002", "optim.schedule=cosine", "optim.warmup_steps=2", "train.max_steps=22",
                "train.epochs=1", "train.log_interval=5", "train.progress_bar=false"]  # fmt: skip


@pytest.fixture(scope="module")
def tutorial_export(tmp_path_factory):
    """A cosine run to its end (its LR is 0.0 there), exported with --tutorial-dict."""
    from dist_train.run import train

    out = tmp_path_factory.mktemp("tutorial")
    assert train(str(REPO / "configs" / "mlp_digits.yaml"), [*TUTORIAL_RUN, f"output_dir={out / 'run'}"]) == 0
    assert export_checkpoint(str(out / "run"), str(out / "model.pt"), str(out / "tutorial.pt")) == 0
    return out


@pytest.mark.slow
def test_the_tutorial_dict_holds_the_last_logged_loss_and_the_peak_lr(tutorial_export):
    tutorial = torch.load(tutorial_export / "tutorial.pt", weights_only=True)
    logged = [row for row in read_history(tutorial_export / "run") if "train/loss" in row]
    assert logged[-1]["step"] == 22 and tutorial["loss"] == logged[-1]["train/loss"]  # step 22: the epoch's last, logged
    assert logged[-1]["train/lr"] == 0.0  # where the cosine schedule ended
    assert {group["lr"] for group in tutorial["optimizer_state_dict"]["param_groups"]} == {0.002}  # optim.lr, the peak


@pytest.mark.slow
def test_the_tutorials_own_loop_continues_from_the_tutorial_dict_and_makes_progress(tutorial_export):
    cfg = load_config(REPO / "configs" / "mlp_digits.yaml", TUTORIAL_RUN)
    spec = model_spec(cfg.model)
    test = load_source(cfg.data, spec).test

    def eval_loss(state: dict) -> float:
        model = build_model(cfg.model)
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(adapt_images(test.inputs, spec.input_shape)), test.targets).item()

    loaded = torch.load(tutorial_export / "tutorial.pt", weights_only=True)
    losses, state = tutorial_continue("mlp_digits.yaml", TUTORIAL_RUN, tutorial_export / "tutorial.pt", batch_size=64, steps=22)
    assert losses[0] == pytest.approx(loaded["loss"], rel=0.5)  # it starts where the run ended (another batch)
    # With lr 0.0 (the cosine schedule's end) the weights would not move at all.
    assert eval_loss(state) < eval_loss(loaded["model_state_dict"]) - 0.05, (eval_loss(state), eval_loss(loaded["model_state_dict"]))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.slow
def test_model_weights_takes_a_tutorial_dict_and_says_it_leaves_its_optimizer_state(tutorial_export, tmp_path, capsys):
    from dist_train.run import train

    weights = tutorial_export / "tutorial.pt"
    assert train(str(REPO / "configs" / "mlp_digits.yaml"), [*TUTORIAL_RUN, "train.max_steps=1", f"model.weights={weights}", f"output_dir={tmp_path / 'run'}"]) == 0
    model_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model: "))
    assert f"weights loaded from {weights}, a tutorial checkpoint dict (epoch 1, loss " in model_line, model_line
    assert "its model_state_dict; its optimizer_state_dict is not used, as a fresh start builds the optimizer and the LR schedule from optim.*" in model_line


@pytest.mark.slow
def test_train_resume_of_a_tutorial_dict_or_weights_file_says_to_use_model_weights(tutorial_export, tmp_path):
    from dist_train.run import train

    def said(file: Path) -> str:
        return (
            f"train.resume={file} is a file (a tutorial checkpoint dict or a state_dict?), not a dist_train checkpoint: a step-N "
            f"directory or an output_dir; to start a run from its weights, set model.weights={file} instead"
        )

    for file in (tutorial_export / "tutorial.pt", tutorial_export / "model.pt"):  # the CLI says a ConfigError in one line
        with pytest.raises(ConfigError) as error:
            train(str(REPO / "configs" / "mlp_digits.yaml"), [*TUTORIAL_RUN, f"train.resume={file}", f"output_dir={tmp_path / file.stem}"])
        assert str(error.value) == said(file)


# ---------------------------------------------------------------- image folders


def _images(root: Path, mode: str, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (10, 12) if mode == "L" else (10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(root / name / f"{i}.png")
    return root


def test_image_folder_without_images_names_its_empty_folders(tmp_path, capsys):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    _images(tmp_path / "imgs", "L", classes=("dog",))
    assert cli_main(["data", "prepare", "--source", "image_folder", "--root", str(tmp_path / "imgs"), "--out", str(tmp_path / "out")]) == 2
    assert f"dist-train: config error: --root {tmp_path / 'imgs'} has class folders without images: {tmp_path / 'imgs' / 'cat'}; put png/" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3)])
def test_prepare_keeps_grayscale_files_as_one_channel_and_says_which(tmp_path, capsys, mode, channels):
    root = _images(tmp_path / "imgs", mode)
    assert cli_main(["data", "prepare", "--source", "image_folder", "--root", str(root), "--out", str(tmp_path / "out"), "--image-size", "16"]) == 0
    said = capsys.readouterr().out
    kept = "all grayscale: kept as 1 channel" if channels == 1 else "in colour (or some are): written as 3 channels (RGB)"
    assert f"image_folder: 8 images, {kept}, resized to 16x16 (--image-size)" in said, said
    manifest = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert manifest["shape"] == [channels, 16, 16], manifest


# ---------------------------------------------------------------- the command line and the config


def test_train_without_arguments_asks_for_the_config_only(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().endswith("error: the following arguments are required: config"), err


def test_help_lists_the_choices_of_optim_name_and_optim_schedule(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog
    assert "optim.name (default 'sgd'; one of sgd | adam | adamw):" in out
    assert "optim.schedule (default 'constant'; one of constant | cosine | linear | step | warmup_lr | warmup_decay_lr):" in out


@pytest.mark.parametrize(
    "override, suggestion",
    [("train.max_step=5", "train.max_steps"), ("train.maxsteps=5", "train.max_steps"), ("trian.max_steps=5", "train.max_steps"),
     ("data.shufle=false", "data.shuffle"), ("strategy.deepspeed.stage=3", "strategy.deepspeed.zero_stage"),
     ("optim.warmup=3", "optim.warmup_type or optim.warmup_steps"), ("output=x", "output_dir")],
)  # fmt: skip
def test_an_unknown_key_suggests_the_nearest(override, suggestion):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert f"; did you mean {suggestion}? known keys here: " in str(error.value)


@pytest.mark.slow
def test_ctrl_c_says_how_to_continue(tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    cmd = [sys.executable, "-m", "dist_train", "train", "configs/mlp_digits.yaml", "data.source=digits", "train.epochs=50", "train.log_interval=1", "train.progress_bar=false", f"output_dir={out}"]
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, env=clean_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not re.search(r"^step +1/", log.read_text(), re.M) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        kill_group(proc)
    text = log.read_text()
    assert "dist-train: received SIGINT; saving a checkpoint at the next step boundary and stopping (continue later with train.resume=auto)" in text
    stopped = re.search(r"dist-train: interrupted: stopped on request at optimizer step (\d+); checkpoint saved under \S+ \(.*\); to continue, run the same command with train.resume=auto", text)
    assert stopped, text[-3000:]
    assert (out / "checkpoints" / f"step-{int(stopped.group(1)):08d}" / "COMPLETE").is_file()
