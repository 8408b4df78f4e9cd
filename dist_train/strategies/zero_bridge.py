"""DeepSpeed ZeRO state by parameter name: a ZeRO checkpoint on another world size, stage or strategy.

DeepSpeed's own loader refuses a checkpoint of another data-parallel size ("Automatic adjustment of ZeRO's
optimizer state partitioning with a new world size is not currently supported", DeepSpeed #3810). Its answer,
the universal checkpoint (`ds_to_universal` + `checkpoint.load_universal`), is not used here: its conversion
and its ZeRO-3 loader know only Adam's state names (an SGD-with-momentum run, dist_train's default, fails with
KeyError 'exp_avg': DeepSpeed #8608, tests/test_zero_reshard.py pins it), and its ZeRO-3 loader has resumed
from wrong weights (#6691, #7601). It also serves only DeepSpeed, where a bridge to DCP serves every strategy.

So the partitions are put back together per parameter name, by slicing alone (no arithmetic, so bit for bit):
fp32 master weights, every per-element optimizer state (Adam's exp_avg/exp_avg_sq, SGD's momentum_buffer),
the step counts, the param groups' hyperparameters, the LR scheduler, buffers. The result is the layout DDP
and FSDP2 save with DCP (strategies/dcp.py), written once beside the ZeRO files as `<step dir>/as-dcp/`:

  as-dcp/.metadata, *.distcp   {model, optimizer, scheduler, scaler, deepspeed (the engine's step counters)}
  as-dcp/conversion.json       what it was made from (stage, partitions, the zero/ files and their sizes), how long it took
  as-dcp/COMPLETE              written last: a view without it is never read

DDP and FSDP2 load the view as their own checkpoint; DeepSpeed on any world size and stage loads it (or a
DDP/FSDP2 checkpoint, which needs no conversion) with `load_into_engine`, through DeepSpeed's
`safe_set_full_*` API. The view lives inside the step directory and is written by the strategy that reads it,
not by the Checkpointer: it is part of that checkpoint's life (retention, `previous/` and `start_over` move or
delete it with its checkpoint, never orphaned), and only a strategy knows what its format can be turned into
(the Checkpointer stays backend-agnostic). Every rank of the job puts together and writes a share of the
parameters under a temporary name (fsynced); the main process marks it complete and renames it, like a
checkpoint. A view whose source files changed since is made again.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..checkpoint.safe_load import refuse_code_in_pickles
from ..config import upgrade_saved_config
from ..errors import CheckpointError
from ..files import fsync_dir, write_synced

ZERO_TAG = "zero"  # DeepSpeed's files live in <step dir>/zero/ (its "tag"): one fixed tag, no `latest` file
VIEW_DIR = "as-dcp"
VIEW_MARKER = "COMPLETE"
VIEW_INFO = "conversion.json"
# Optimizer-state keys that only say how a step is computed, not what it computes: a view of a DDP run built
# with fused kernels (fp16 on CUDA) must not switch DeepSpeed's CPU optimizer to them.
_IMPLEMENTATION_KEYS = frozenset({"params", "foreach", "fused", "capturable", "differentiable"})


# ---------------------------------------------------------------- reading DeepSpeed's files


def _read_zero_file(path: Path) -> Any:
    """One of DeepSpeed's files, after the scan that refuses code in its pickle (checkpoint/safe_load.py).
    It holds DeepSpeed's own classes (LossScaler, ZeroStageEnum, fragment_address), which torch's
    weights_only loader refuses, so the scan is what keeps it from running code."""
    refuse_code_in_pickles([path])
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # lazily: the module weights in it are never read


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _zero_files(step_dir: Path) -> tuple[list[Path], list[Path]]:
    zero_dir = step_dir / ZERO_TAG
    model_files = sorted(zero_dir.glob("*model_states.pt"), key=_natural)
    optim_files = sorted(zero_dir.glob("*optim_states.pt"), key=_natural)
    if not model_files or not optim_files:
        raise CheckpointError(f"{step_dir} has no DeepSpeed ZeRO files under {ZERO_TAG}/; not a strategy.name=deepspeed checkpoint")
    return model_files, optim_files


def _source_listing(step_dir: Path) -> list[list]:
    return [[f.name, f.stat().st_size] for f in sorted((step_dir / ZERO_TAG).glob("*.pt"))]


# ---------------------------------------------------------------- partitions -> parameters


def consolidate(step_dir: Path, share: Optional[tuple[int, int]] = None) -> dict:
    """The whole training state of a ZeRO-1/2/3 step directory by parameter name, in DCP's layout:
    {model, optimizer: {state: {name: {key: value}}, param_groups: [... params: [names]]}, scheduler, scaler,
    deepspeed: {global_steps, global_samples, skipped_steps}}. No process group needed.

    `share=(k, n)`: only the k-th of n disjoint shares of the parameters (about equal in size; the rest of the
    state with share 0), so n processes put a checkpoint together in parallel, each reading only its share
    (the files are memory-mapped)."""
    step_dir = Path(step_dir)
    model_files, optim_files = _zero_files(step_dir)
    model_states = [_read_zero_file(f) for f in model_files]
    partitions = [_read_zero_file(f)["optimizer_state_dict"] for f in optim_files]
    stage, world_size = _stage_and_partitions(partitions[0], len(partitions))
    if len(partitions) != world_size:
        raise CheckpointError(
            f"checkpoint {step_dir} was written by {world_size} processes but {ZERO_TAG}/ holds {len(partitions)} optimizer "
            "partition files; it is damaged: resume from an earlier step-N directory"
        )
    shapes = {name: torch.Size(shape) for group in model_states[0]["param_shapes"] for name, shape in group.items()}
    wanted = set(shapes) if share is None else _shares(shapes, share[1])[share[0]]
    if stage <= 2:
        per_name, groups = _merge_zero12(partitions, model_states[0]["param_shapes"], step_dir, wanted)
    else:
        per_name, groups = _merge_zero3(partitions, shapes, world_size, step_dir, wanted)
    model = {name: per_name[name].pop("fp32") for name in shapes if name in wanted}
    for alias, source in model_states[0].get("shared_params", {}).items():
        if source in model:
            model[alias] = model[source].clone()
    state = {"model": model, "optimizer": {"state": {name: value for name, value in per_name.items() if value}}}
    if share is None or share[0] == 0:
        first = model_states[0]
        model.update(_buffers_and_frozen(model_states, stage, world_size))
        state["optimizer"]["param_groups"] = groups
        state.update(
            scheduler=first.get("lr_scheduler") or {},
            scaler={},
            deepspeed={key: first.get(key) for key in ("global_steps", "global_samples", "skipped_steps")},
        )
    return state


def _shares(shapes: dict[str, torch.Size], count: int) -> list[set[str]]:
    """The parameters cut into `count` shares of about equal size: the largest first, each to the lightest share."""
    shares: list[set[str]] = [set() for _ in range(count)]
    sizes = [0] * count
    for name in sorted(shapes, key=lambda n: (-shapes[n].numel(), n)):
        lightest = sizes.index(min(sizes))
        shares[lightest].add(name)
        sizes[lightest] += shapes[name].numel()
    return shares


def _stage_and_partitions(partition: dict, files: int) -> tuple[int, int]:
    if "zero_stage" not in partition:
        raise CheckpointError("the optimizer files under zero/ hold no ZeRO stage: not a ZeRO-1/2/3 checkpoint (DeepSpeed's BF16_Optimizer layout is not read)")
    counts = partition.get("partition_count")
    if counts is None:  # ZeRO-3 does not record it: one file per partition
        return int(partition["zero_stage"]), files
    return int(partition["zero_stage"]), max(counts) if isinstance(counts, list) else int(counts)


def _merge_zero12(partitions: list[dict], param_shapes: list[dict], step_dir: Path, wanted: set[str]) -> tuple[dict, list]:
    """ZeRO-1/2: rank r owns one contiguous slice of each param group's flat fp32 buffer, and its
    `param_slice_mappings` say where each parameter's fragment lies in that slice (alignment padding
    between parameters included); a parameter is its fragments in rank order. The optimizer state of a
    slice is laid out like the slice (padded at the end of the last rank's, which no fragment reaches)."""
    pieces: dict[str, dict[str, list]] = {}
    scalars: dict[str, dict] = {}
    for partition in partitions:
        base = partition["base_optimizer_state"]
        if not isinstance(base, dict):
            raise CheckpointError(
                f"checkpoint {step_dir} was written with zero_optimization.elastic_checkpoint=true, which keeps no optimizer "
                "hyperparameters; resume it on its own world size and ZeRO stage"
            )
        for group_index, mapping in enumerate(partition["param_slice_mappings"]):
            flat = partition["single_partition_of_fp32_groups"][group_index]
            state = base["state"].get(group_index, {})
            elementwise = {k: v for k, v in state.items() if _is_elementwise(v, flat)}
            for name, address in mapping.items():
                if name not in wanted:
                    continue
                entry = pieces.setdefault(name, {})
                for key, vector in (("fp32", flat), *elementwise.items()):
                    entry.setdefault(key, []).append(vector.narrow(0, address.start, address.numel))
                scalars.setdefault(name, {k: v for k, v in state.items() if k not in elementwise})
    shapes = {name: shape for group in param_shapes for name, shape in group.items()}
    per_name = {name: {**_clones(scalars.get(name, {})), **_joined(pieces.get(name, {}), shapes[name], name, step_dir)} for name in shapes if name in wanted}
    groups = [{**group, "params": list(param_shapes[i])} for i, group in enumerate(partitions[0]["base_optimizer_state"]["param_groups"])]
    return per_name, groups


def _merge_zero3(partitions: list[dict], shapes: dict[str, torch.Size], world_size: int, step_dir: Path, wanted: set[str]) -> tuple[dict, list]:
    """ZeRO-3: every parameter is cut into `world_size` equal pieces (the last padded), and rank r's flat
    buffer is its piece of each parameter in turn; the optimizer state of a sub-group is laid out like
    its flat buffer. A parameter is its pieces in rank order, cut to its size."""
    flats = [list(p["fp32_flat_groups"]) for p in partitions]
    states = [p["optimizer_state_dict"]["state"] for p in partitions]
    sizes = [flat.numel() for flat in flats[0]]
    keys = [k for k, v in states[0].get(0, {}).items() if _is_elementwise(v, flats[0][0])]
    vectors = {"fp32": [_joined_groups(f) for f in flats]}
    for key in keys:
        vectors[key] = [_joined_groups([rank_states[g][key] for g in range(len(sizes))]) for rank_states in states]
    per_name: dict[str, dict] = {}
    sub_group_of: dict[str, int] = {}
    offset = 0
    for name, shape in shapes.items():
        piece = math.ceil(shape.numel() / world_size)
        sub_group = next(g for g in range(len(sizes)) if offset < sum(sizes[: g + 1]))
        sub_group_of[name] = sub_group
        if name not in wanted:
            offset += piece
            continue
        scalars = {k: v for k, v in states[0].get(sub_group, {}).items() if k not in keys}
        joined = {key: torch.cat([v.narrow(0, offset, piece) for v in vecs]).narrow(0, 0, shape.numel()).view(shape) for key, vecs in vectors.items()}
        per_name[name] = {**_clones(scalars), **joined}
        offset += piece
    if offset != sum(sizes):
        raise CheckpointError(f"checkpoint {step_dir}: the ZeRO-3 partitions hold {sum(sizes)} values per rank, the parameters need {offset}; it is damaged")
    groups = []
    for group in partitions[0]["optimizer_state_dict"]["param_groups"]:
        members = set(group["params"])
        groups.append({**group, "params": [name for name in shapes if sub_group_of[name] in members]})
    return per_name, groups


def _joined_groups(vectors: list[torch.Tensor]) -> torch.Tensor:
    """One vector of a rank's sub-groups (one sub-group, the usual case, is not copied: the pieces are cut from it)."""
    return vectors[0] if len(vectors) == 1 else torch.cat(vectors)


def _is_elementwise(value: Any, flat: torch.Tensor) -> bool:
    """A state tensor with one value per element of the flat buffer (the padded length, or the lean one)."""
    return torch.is_tensor(value) and value.dim() == 1 and value.numel() >= flat.numel()


def _clones(values: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in values.items()}


def _joined(pieces: dict[str, list], shape: torch.Size, name: str, step_dir: Path) -> dict:
    out = {}
    for key, parts in pieces.items():
        whole = torch.cat(parts)
        if whole.numel() != shape.numel():
            raise CheckpointError(f"checkpoint {step_dir}: the ZeRO partitions of '{name}' add up to {whole.numel()} values, its shape {list(shape)} needs {shape.numel()}; it is damaged")
        out[key] = whole.view(shape)
    return out


def _buffers_and_frozen(model_states: list[dict], stage: int, world_size: int) -> dict:
    """Buffers (kept whole on every rank) in fp32 as the tutorial has them, and frozen parameters, which
    ZeRO keeps out of its optimizer: whole under ZeRO-1/2, cut like ZeRO-3's trainable ones under ZeRO-3."""
    first = model_states[0]
    out = {k: (v.float() if v.is_floating_point() else v).clone() for k, v in first["module"].items() if k in set(first.get("buffer_names", []))}
    for name, shape in (first.get("frozen_param_shapes") or {}).items():
        if stage <= 2:
            value = first["frozen_param_fragments"][name]
        else:
            value = torch.cat([state["frozen_param_fragments"][name] for state in model_states]).narrow(0, 0, torch.Size(shape).numel())
        out[name] = value.float().view(shape).clone()
    return out


# ---------------------------------------------------------------- the view beside the checkpoint


def view_path(step_dir: Path) -> Path:
    return Path(step_dir) / VIEW_DIR


def current_view(step_dir: Path) -> Optional[Path]:
    """The complete view of this checkpoint, made from the files that are there now; else None."""
    view = view_path(step_dir)
    try:
        info = json.loads((view / VIEW_INFO).read_text())
    except (OSError, ValueError):
        return None
    if not (view / VIEW_MARKER).is_file() or info.get("source_files") != _source_listing(Path(step_dir)):
        return None
    return view


def dcp_view(step_dir: Path, groups: Any) -> Path:
    """Collective: the view of a DeepSpeed checkpoint, converted now if there is none. Every rank puts together
    and writes a share of the parameters (DCP, one file per rank: the step directory is on storage every rank
    sees, as any checkpoint a job resumes from), so n processes convert in about 1/n of one's time; the main
    process then marks the view complete. Every rank raises the same error."""
    step_dir, env = Path(step_dir), groups.dist_env
    together = bool(groups.active and env.distributed)
    present = groups.broadcast_from_main(str(current_view(step_dir) or "") if env.is_main else None)
    if present:
        if env.is_main:
            print(f"checkpoint: reading {step_dir} through {present} (converted earlier)", flush=True)
        return Path(present)
    start = time.perf_counter()
    tmp = step_dir / f".tmp-{VIEW_DIR}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted conversion's; nobody writes before the agreement below
    share = (env.global_rank, env.world_size) if together else None
    state, problem = None, None
    try:
        state = consolidate(step_dir, share)
    except Exception as e:  # every rank must hear of it before the collective save
        problem = str(e) if isinstance(e, CheckpointError) else f"converting {step_dir} failed: {type(e).__name__}: {e}"
    problems = [problem]
    if together:
        import torch.distributed as dist

        problems = [None] * env.world_size
        dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise CheckpointError(first)
    _save_view(state, tmp, together)
    outcome: Any = None
    if env.is_main:
        try:
            outcome = ("ok", str(_complete_view(tmp, step_dir, time.perf_counter() - start)))
            print(f"checkpoint: converted {step_dir} (ZeRO partitions) into {outcome[1]} in {time.perf_counter() - start:.2f}s, once: later loads read it", flush=True)
        except OSError as e:
            outcome = ("error", f"marking the converted copy of checkpoint {step_dir} complete failed: {e}")
    outcome = groups.broadcast_from_main(outcome)
    if outcome[0] == "error":
        raise CheckpointError(outcome[1])
    return Path(outcome[1])


def _save_view(state: dict, tmp: Path, together: bool) -> None:
    """DCP's files of the view; a failure (a full disk) raises on every rank, as any DCP save."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is, without a group
        warnings.simplefilter("ignore", UserWarning)
        # fsyncs its files; two writer threads overlap one file's fsync with the next one's writing (0.51 -> 0.42 s, 141 MB)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), thread_count=2), no_dist=not together)


def _complete_view(tmp: Path, step_dir: Path, seconds: float) -> Path:
    """Main process, once every rank's files are written: what it was made from, the marker, the rename."""
    info = {"source_files": _source_listing(step_dir), "seconds": round(seconds, 3), "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_synced(tmp / VIEW_INFO, json.dumps(info, indent=1))
    write_synced(tmp / VIEW_MARKER, f"converted from {step_dir / ZERO_TAG}\n")
    fsync_dir(tmp)
    view = view_path(step_dir)
    if view.exists():  # made from other files (or incomplete): moved aside, never half-replaced
        trash = step_dir / f".trash-{VIEW_DIR}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(view, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, view)
    fsync_dir(step_dir)
    return view


def refuse_loss_scale_crossing(directory: Path, meta: dict, precision_now: str) -> None:
    """fp16's dynamic loss scale is kept differently by DeepSpeed and by torch's GradScaler, and DeepSpeed runs
    fp16 only on CUDA, where this bridge is untested: a load by parameter name refuses fp16 on either side
    (DeepSpeed's own loader, same world size, stage and precision, keeps its loss scale)."""
    then = upgrade_saved_config(meta.get("config", {}))
    precision_then = then.get("train", {}).get("precision", "fp32")
    if "fp16" not in (precision_then, precision_now):
        return
    stage = then.get("strategy", {}).get("deepspeed", {}).get("zero_stage")
    own = f"strategy.name={meta.get('strategy')}" + (f" strategy.deepspeed.zero_stage={stage}" if meta.get("strategy") == "deepspeed" else "")
    raise CheckpointError(
        f"checkpoint {directory} (train.precision={precision_then}, {own}, {meta.get('world_size')} processes) cannot be loaded "
        f"by parameter name under train.precision={precision_now}: the fp16 loss scale does not carry across strategies, world sizes "
        f"or ZeRO stages; resume it with {own} train.precision={precision_then} on {meta.get('world_size')} processes"
    )


# ---------------------------------------------------------------- parameters -> a DeepSpeed engine


def _flat_partitions(zero: Any) -> Iterator[tuple[torch.Tensor, list]]:
    """(this rank's flat fp32 buffer, the module parameters it holds) per group of DeepSpeed's optimizer.
    Attribute names of DeepSpeed 0.19 (tests/test_zero_reshard.py notices a rename)."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3 (one entry per sub-group)
        return zip(zero.fp32_partitioned_groups_flat, zero.fp16_groups)
    if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return zip(zero.single_partition_of_fp32_groups, zero.bit16_groups)
    raise CheckpointError(f"DeepSpeed's {type(zero).__name__} is not a ZeRO-1/2/3 optimizer; a checkpoint of another world size or strategy cannot be loaded into it")


def full_shape(param: torch.Tensor) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # a ZeRO-3 parameter is an empty placeholder


def load_into_engine(engine: Any, state: dict, source: str) -> None:
    """Collective: every rank calls it with the whole state (DCP's layout, the tutorial's names). Sets the
    fp32 masters and every optimizer state of this rank's partition, the module's (lower-precision) weights
    from the masters, buffers, the param groups' hyperparameters and the LR scheduler."""
    module, zero = engine.module, engine.optimizer
    params = dict(module.named_parameters())
    check_fits(state["model"], {**{n: full_shape(p) for n, p in params.items()}, **{n: b.shape for n, b in module.named_buffers()}}, source)
    saved_state = state.get("optimizer", {}).get("state", {})
    if hasattr(zero, "checkpoint_event_prologue"):
        zero.checkpoint_event_prologue()  # ZeRO-3: every parameter partitioned, as engine.load_checkpoint does
    _create_optimizer_state(zero, params, saved_state, source)
    for name, param in params.items():
        _set_partition(param, state["model"][name].to(torch.float32))
        for key, value in saved_state.get(name, {}).items():
            if torch.is_tensor(value) and value.shape == full_shape(param):
                _set_partition(param, value.to(torch.float32), key)
    _module_weights_from_masters(zero, params, state["model"])
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(state["model"][name])
    if hasattr(zero, "checkpoint_event_epilogue"):
        zero.checkpoint_event_epilogue()  # ZeRO-3: persistent parameters gathered again from their partitions
    load_param_groups(zero.optimizer, state.get("optimizer", {}).get("param_groups", []), source)


def _set_partition(param: torch.Tensor, value: torch.Tensor, key: Optional[str] = None) -> None:
    """This rank's part of `value` into the fp32 master (key None) or the optimizer state `key` of `param`.
    Under ZeRO-3, DeepSpeed's full setters cut rank r's piece at r x piece of the unpadded value, so on the
    last rank of a parameter whose size the world size does not divide they read past its end (RuntimeError
    "start + length exceeds dimension size"; tests pin it): the piece is cut here from the padded value and
    set with the local setter."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param, safe_set_local_optimizer_state

    if not hasattr(param, "ds_id"):  # ZeRO-1/2: the full setters write this rank's fragment
        safe_set_full_fp32_param(param, value) if key is None else safe_set_full_optimizer_state(param, value, key)
        return
    import deepspeed.comm as ds_dist

    group = getattr(param, "ds_process_group", None)
    piece = param.ds_tensor.numel()
    flat = value.flatten()
    padded = torch.cat([flat, flat.new_zeros(piece * ds_dist.get_world_size(group=group) - flat.numel())])
    mine = padded.narrow(0, piece * ds_dist.get_rank(group=group), piece)
    safe_set_local_fp32_param(param, mine) if key is None else safe_set_local_optimizer_state(param, mine, key)


def _create_optimizer_state(zero: Any, params: dict, saved_state: dict, source: str) -> None:
    """DeepSpeed creates its optimizer's state at the first step (the step at init was removed in DeepSpeed
    #5104), so before it `safe_set_full_optimizer_state` has nowhere to write (tests pin this): create the state
    of each flat buffer with the checkpoint's keys, then link each parameter's view of it (ZeRO-1/2 link
    those views only after the first step)."""
    names = {id(p): n for n, p in params.items()}
    base = zero.optimizer
    for flat, members in _flat_partitions(zero):
        saved = [saved_state[names[id(p)]] for p in members if names[id(p)] in saved_state]
        if not saved:
            continue
        elementwise = [k for k, v in saved[0].items() if torch.is_tensor(v) and v.dim() > 0]
        scalars = {k: v for k, v in saved[0].items() if k not in elementwise}
        for other in saved[1:]:
            if any(not _same(other.get(k), v) for k, v in scalars.items()):
                raise CheckpointError(
                    f"checkpoint {source}: parameters that DeepSpeed steps as one group have different optimizer step counts "
                    f"({scalars} vs {({k: other.get(k) for k in scalars})}); DeepSpeed keeps one per group, so it cannot resume this exactly"
                )
        base.state[flat] = {**_clones(scalars), **{k: torch.zeros_like(flat) for k in elementwise}}
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state") and not getattr(zero, "_hp_optimizer_states_linked", True):
        zero._lazy_init_hp_params_optimizer_state()


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return torch.equal(a, b)
    return a == b


def _module_weights_from_masters(zero: Any, params: dict, model_state: dict) -> None:
    """The weights the module computes with, from the fp32 masters: `safe_set_full_fp32_param` sets only the
    masters (tests pin this), and the next forward would use the fresh engine's initial weights."""
    with torch.no_grad():
        if hasattr(zero, "fp16_partitioned_groups_flat"):  # ZeRO-3: each rank's partitions, as DeepSpeed's own loader
            for low, high in zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat):
                if low is not None and high.numel():
                    low.data.copy_(high.data)
            for sub_group, flat in enumerate(zero.fp16_partitioned_groups_flat):
                for partitioned, piece in zip(zero.fp16_partitioned_groups[sub_group], zero.unflatten(flat, zero.fp16_partitioned_groups[sub_group])):
                    partitioned.data = piece.data
            return
        for name, param in params.items():  # ZeRO-1/2: every rank holds the whole module
            param.data.copy_(model_state[name].to(param.dtype))


def load_param_groups(optimizer: torch.optim.Optimizer, saved_groups: list, source: str) -> None:
    """The checkpoint's hyperparameters (lr, betas, weight_decay, initial_lr, ...) into the optimizer's groups."""
    if not saved_groups:
        return
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint {source} has {len(saved_groups)} optimizer param groups, this optimizer has {len(optimizer.param_groups)}; it cannot be resumed here")
    for group, saved in zip(optimizer.param_groups, saved_groups):
        for key, value in saved.items():
            if key not in _IMPLEMENTATION_KEYS and key in group:
                group[key] = tuple(value) if isinstance(group[key], tuple) else value


def check_fits(saved_model: dict, current: dict[str, torch.Size], source: str) -> None:
    """Name the first parameter or buffer that is missing, unexpected or of another shape."""
    where = f"checkpoint {source} does not fit this model (model.*)"
    for name, shape in current.items():
        if name not in saved_model:
            raise CheckpointError(f"{where}: '{name}' is in this model but not in the checkpoint")
        if list(saved_model[name].shape) != list(shape):
            raise CheckpointError(f"{where}: '{name}' has shape {list(saved_model[name].shape)} in the checkpoint and {list(shape)} in this model")
    unexpected = sorted(set(saved_model) - set(current))
    if unexpected:
        raise CheckpointError(f"{where}: '{unexpected[0]}' is in the checkpoint but not in this model ({len(unexpected)} such keys)")


def engine_state(engine: Any, keep: bool) -> tuple[dict, dict]:
    """Collective: (fp32 masters and buffers, optimizer state by name) of a live engine, gathered from the
    partitions with DeepSpeed's `safe_get_full_*` API; filled in only where `keep` (the main process)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state") and not getattr(zero, "_hp_optimizer_states_linked", True) and any(zero.optimizer.state.values()):
        zero._lazy_init_hp_params_optimizer_state()  # ZeRO-1/2 link the views only at the first step (see above)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    model: dict = {}
    optimizer: dict = {}
    for flat, members in _flat_partitions(zero):
        flat_state = zero.optimizer.state.get(flat, {})
        for param in members:
            name = names[id(param)]
            master = safe_get_full_fp32_param(param)
            per_param = {}
            for key, value in flat_state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    per_param[key] = safe_get_full_optimizer_state(param, key)
                else:
                    per_param[key] = value.clone() if torch.is_tensor(value) else value
            if keep:
                model[name] = master.detach().to("cpu", copy=True).view(full_shape(param))
                optimizer[name] = {k: (v.detach().to("cpu", copy=True).view(full_shape(param)) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in per_param.items()}
    if keep:
        model.update({n: (b.float() if b.is_floating_point() else b).detach().clone() for n, b in engine.module.named_buffers()})
    return model, {"state": optimizer, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in zero.optimizer.param_groups]}
