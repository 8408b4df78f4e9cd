"""Start-up (issue 16): a run imports what it uses, and nothing optional before its first optimizer step.
torch.distributed.checkpoint was imported with the DDP strategy by every run, saving or not."""

from __future__ import annotations

import json

from tests.procs import REPO, worker

# Imported only when configured (or, for matplotlib, to draw the curves after training).
NOT_BEFORE_THE_FIRST_STEP = ("deepspeed", "wandb", "tensorboard", "torch.utils.tensorboard", "torchvision", "torch.distributed.checkpoint", "matplotlib")


def test_a_run_without_checkpoints_reaches_its_first_step_without_optional_imports(tmp_path):
    record = tmp_path / "first_step.json"
    worker(
        "first_step_imports.py",
        [record, REPO / "configs" / "cnn_digits.yaml", f"output_dir={tmp_path / 'run'}", "data.source=digits", "train.max_steps=2",
         "checkpoint.interval_steps=0", "checkpoint.save_at_end=false"],
        nproc=1,
        timeout=300,
    )  # fmt: skip
    modules = json.loads(record.read_text())["modules"]
    imported = sorted(m for m in modules if m in NOT_BEFORE_THE_FIRST_STEP or m.startswith(tuple(f"{n}." for n in NOT_BEFORE_THE_FIRST_STEP)))
    assert imported == [], f"imported before the first optimizer step: {imported[:10]}"
