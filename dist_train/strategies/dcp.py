"""The torch.distributed.checkpoint (DCP) format, shared by the DDP and FSDP2 strategies.

Both save `get_state_dict(model, optimizer)` under the same keys (the tutorial's parameter names), as plain
tensors (DDP) or sharded DTensors (FSDP2); DCP records global shapes, so either loads into the other on any
world size. Loading never unpickles arbitrary objects: DCP's pickled `.metadata` goes through an allow-list
unpickler and its non-tensor items load with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError


class DCPCheckpointing:
    """Checkpoint I/O for a strategy whose model and optimizer `get_state_dict` understands.

    Mixed into a Strategy: uses its `unwrapped_model`, `optimizer`, `scheduler`, `scaler`, `cfg`, `dist_env`."""

    checkpoint_format = "dcp"
    _checkpoint_group: Any = None

    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.unwrapped_model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def _async_group(self) -> Any:
        """A gloo group of the checkpoint's own: on the default group the save thread's collectives interleave
        with the training collectives and both sides wait forever (measured: the save thread sits in a
        broadcast while DDP sits in its all-reduce)."""
        import torch.distributed as dist

        if not self.dist_env.distributed:
            return None
        if self._checkpoint_group is None:
            timeout = datetime.timedelta(seconds=self.cfg.strategy.timeout_seconds)
            self._checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)  # collective: every rank saves at the same step
        return self._checkpoint_group

    def save_checkpoint(self, directory: Path) -> Optional[Any]:
        """Model/optimizer/scheduler/scaler with DCP. With checkpoint.async_save the state is staged to CPU here
        and written by a background thread: returns its Future (else None)."""
        import torch.distributed.checkpoint as dcp

        state = self._dcp_state()
        if self.cfg.checkpoint.async_save:
            return dcp.async_save(state, checkpoint_id=str(directory), process_group=self._async_group())
        dcp.save(state, checkpoint_id=str(directory))
        return None

    def load_checkpoint(self, directory: Path, meta: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not (Path(directory) / ".metadata").is_file():
            raise CheckpointError(
                f"checkpoint {directory} has no DCP files (strategy.name={meta.get('strategy')} wrote it); "
                f"resume it with strategy.name={meta.get('strategy')}, or `dist-train export` it and start from the weights"
            )
        state = self._dcp_state()
        check_model_fits(directory, state["model"], self.cfg.model.name)
        try:
            dcp.load(state, storage_reader=_safe_reader(directory), planner=_safe_planner())
        except CheckpointError:
            raise
        except Exception as e:  # DCP raises a CheckpointException wrapping per-rank tracebacks
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {directory} does not fit this model/optimizer: {first}") from None
        set_state_dict(self.unwrapped_model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its `.metadata`; allow only DCP's metadata dataclasses/enums and the few torch values they hold."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module.startswith("torch.distributed.checkpoint."):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which a DCP .metadata file never holds; refusing to load it")


_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


def _safe_reader(directory: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            with self.fs.create_stream(self._get_metadata_path(rank), "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(directory))


def _safe_load_bytes(planner: Any, read_item: Any, value: io.BytesIO) -> None:
    """DefaultLoadPlanner.load_bytes with weights_only=True (torch's own uses weights_only=False)."""
    from torch.distributed.checkpoint._traverse import set_element

    loaded = torch.load(value, weights_only=True)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], loaded)
    else:
        planner.state_dict[read_item.dest_index.fqn] = loaded


def _safe_planner(empty: bool = False) -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    base = _EmptyStateDictLoadPlanner if empty else DefaultLoadPlanner

    class SafeLoadPlanner(base):  # type: ignore[misc, valid-type]
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            _safe_load_bytes(self, read_item, value)

    return SafeLoadPlanner()


def read_dcp_metadata(directory: Path) -> Any:
    try:
        return _safe_reader(directory).read_metadata()
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"{directory}/.metadata is missing or unreadable ({e}); the checkpoint is damaged") from None


def check_model_fits(directory: Path, model_state: dict, model_name: str) -> None:
    """Name the parameter that differs (missing, unexpected or another shape) before DCP fails opaquely."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {
        fqn[len("model.") :]: list(md.size)
        for fqn, md in read_dcp_metadata(directory).state_dict_metadata.items()
        if fqn.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    current = {k: list(v.shape) for k, v in model_state.items() if isinstance(v, torch.Tensor)}
    where = f"checkpoint {directory} does not fit this model (model.name={model_name})"
    for key, shape in current.items():
        if key not in saved:
            raise CheckpointError(f"{where}: '{key}' is in this model but not in the checkpoint")
        if saved[key] != shape:
            raise CheckpointError(f"{where}: '{key}' has shape {saved[key]} in the checkpoint and {shape} in this model")
    unexpected = sorted(set(saved) - set(current))
    if unexpected:
        raise CheckpointError(f"{where}: '{unexpected[0]}' is in the checkpoint but not in this model ({len(unexpected)} such keys)")


def load_dcp_full(directory: Path) -> dict:
    """The whole DCP checkpoint in this process, without a process group: {model, optimizer, scheduler, scaler}."""
    # The private loader, as torch's own dcp_to_torch_save uses: the public `dcp.load` only fills keys the
    # caller already has, and the empty-state planner is how DCP rebuilds a state dict from the metadata.
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    read_dcp_metadata(directory)  # refuses unsafe metadata with its own message (DCP would wrap the error)
    state: dict = {}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            _load_state_dict(state, storage_reader=_safe_reader(directory), planner=_safe_planner(empty=True), no_dist=True)
    except Exception as e:  # DCP wraps per-rank failures (a missing shard file, a refused pickle) in one exception
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {directory} cannot be read: {first}") from None
    return state


