"""`dist-train export`: a checkpoint (DCP or DeepSpeed, fp32 master weights) -> the tutorial's plain files.

  OUT                 model.state_dict() with the tutorial's keys: `model.load_state_dict(torch.load(OUT))`
  --tutorial-dict P   the tutorial's general checkpoint: {epoch, model_state_dict, optimizer_state_dict, loss},
                      whose optimizer_state_dict loads with `optimizer.load_state_dict` (parameter ids, not names)
                      and whose loss is the last train loss logged up to the checkpoint (the run's metrics.jsonl)

The tutorial's loop continues with a constant LR (it has no scheduler), so the optimizer state's `lr` is the
run's optim.lr (its peak), not the schedule's last value: at the end of a cosine run that is 0.0, and the
tutorial's `optimizer.load_state_dict(...)`-and-continue would not move (TUTORIAL_LR_NOTE).

Reads in one process with no process group, whatever world size wrote the checkpoint, and unpickles
nothing but tensors and plain values (see checkpoint.py).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import CheckpointError, find_checkpoint, read_meta
from .files import atomic_write

TUTORIAL_LR_NOTE = (
    "its optimizer_state_dict's lr is the run's optim.lr (the peak), not where the LR schedule ended (0.0 after a "
    "cosine schedule): the tutorial's loop continues at a constant LR"
)


def export_checkpoint(checkpoint: str, out: str, tutorial_dict_path: Optional[str] = None) -> int:
    from .observe.runlog import filter_known_warnings

    filter_known_warnings()
    path = find_checkpoint(checkpoint, Path(checkpoint), key="checkpoint")
    if path is None:
        raise CheckpointError(f"{checkpoint}: no complete checkpoint found")
    meta = read_meta(path)
    model_state, optimizer_state = load_full_checkpoint(path, meta)
    out_path = Path(out)
    atomic_write(out_path, lambda f: torch.save(model_state, f))
    num_params = sum(v.numel() for v in model_state.values() if isinstance(v, torch.Tensor))
    print(f"wrote {out_path}: {len(model_state)} tensors, {num_params} values, from {path} (step {meta['step']})", flush=True)
    if tutorial_dict_path:
        tutorial, said = tutorial_dict(path, meta, model_state, optimizer_state)
        atomic_write(tutorial_dict_path, lambda f: torch.save(tutorial, f))
        print(f"wrote {tutorial_dict_path}: {said}", flush=True)
    return 0


def tutorial_dict(path: Path, meta: dict, model_state: dict, optimizer_state: Optional[dict]) -> tuple[dict, str]:
    """The tutorial's general checkpoint of the step directory `path`, and a line saying what it holds."""
    from .observe.tracking import read_history

    # The run directory's metrics.jsonl (OUTPUT_DIR/checkpoints/step-N/ -> OUTPUT_DIR): the loss logged last
    # at or before this step. A step directory copied out of its run has none.
    logged = [row for row in read_history(path.parent.parent) if row.get("train/loss") is not None and row["step"] <= meta["step"]]
    loss = logged[-1]["train/loss"] if logged else None
    said = f"epoch {meta.get('epoch')}, model_state_dict, " + (
        f"loss {loss:.6g} (train/loss logged at step {logged[-1]['step']})" if logged else f"loss None (no logged train loss in {path.parent.parent})"
    )
    if optimizer_state is not None:
        peak = meta.get("config", {}).get("optim", {}).get("lr")
        groups = [{**group, "lr": peak} if peak is not None else group for group in optimizer_state["param_groups"]]
        optimizer_state = {**optimizer_state, "param_groups": groups}
        said += f", optimizer_state_dict ({TUTORIAL_LR_NOTE}: lr {peak})"
    else:
        said += ", optimizer_state_dict None (the checkpoint holds no optimizer state)"
    tutorial = {"epoch": meta.get("epoch"), "model_state_dict": model_state, "optimizer_state_dict": optimizer_state, "loss": loss}
    return tutorial, said


def load_full_checkpoint(path: Path, meta: dict) -> tuple[dict, Optional[dict]]:
    """(model state_dict, optimizer state_dict in torch.optim's id-keyed layout or None)."""
    state = load_full_state(path, meta)
    optimizer = state.get("optimizer")
    return dict(state["model"]), (optimizer_by_ids(optimizer) if optimizer else None)


def load_full_state(path: Path, meta: dict, use_view: bool = True) -> dict:
    """The whole checkpoint in this process, by parameter name: {model, optimizer: {state, param_groups},
    scheduler, ...}. A DeepSpeed checkpoint is read from its converted view when it has one (and `use_view`),
    else its ZeRO partitions are put together in memory (strategies/zero_bridge.py; nothing is written)."""
    from .strategies.base import written_format
    from .strategies.dcp import load_dcp_full

    if written_format(meta) == "deepspeed":
        from .strategies import zero_bridge  # noqa: PLC0415 (its files need DeepSpeed, an optional backend)

        view = zero_bridge.current_view(path) if use_view else None
        if view is not None:
            return load_dcp_full(view)
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's unpickling prints its accelerator
            return zero_bridge.consolidate(path)
    state = load_dcp_full(path)
    if "model" not in state:
        raise CheckpointError(f"checkpoint {path} holds no model state (keys: {sorted(state)}); not a dist_train DCP checkpoint")
    return state


def optimizer_by_ids(state: dict) -> dict:
    """DCP keeps optimizer state by parameter name; `torch.optim.Optimizer.load_state_dict` wants the ids
    0..N-1 in param-group order (the order the optimizer was built with)."""
    ids: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        params = []
        for name in group["params"]:
            ids.setdefault(name, len(ids))
            params.append(ids[name])
        groups.append({**group, "params": params})
    per_param = {ids[name]: value for name, value in state.get("state", {}).items() if name in ids}
    return {"state": per_param, "param_groups": groups}

