"""The torch.distributed.checkpoint (DCP) format, shared by the DDP and FSDP2 strategies.

Both save `get_state_dict(model, optimizer)` under the same keys (the tutorial's parameter names), as plain
tensors (DDP) or sharded DTensors (FSDP2); DCP records global shapes, so either loads into the other on any
world size. Loading never unpickles arbitrary objects: DCP's pickled `.metadata` goes through an allow-list
unpickler and its non-tensor items load with `weights_only=True`.

An asynchronous save (`checkpoint.async_save`) blocks the loop only for `get_state_dict`: a background
thread copies the state into host buffers that are kept and reused across saves (pinned on CUDA), and
DCP writes that copy from another thread. Until the copy is done the parameters and the optimizer state
must not change, so `optimizer_step` first waits for it (`finish_staging`); buffers (BatchNorm running
statistics), which every training forward rewrites, are cloned before the save returns.

torch.distributed.checkpoint is imported only when a checkpoint is saved or loaded: a run that saves
nothing does not need it (its own modules cost ~0.1 s; the sympy and DTensor imports beneath it come
anyway, since torch.optim's first `add_param_group` imports torch._dynamo).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError
from .base import require_dcp_files, written_format


class DCPCheckpointing:
    """Checkpoint I/O for a strategy whose model and optimizer `get_state_dict` understands.

    Mixed into a Strategy: uses its `unwrapped_model`, `optimizer`, `scheduler`, `scaler`, `device`, `groups`."""

    checkpoint_format = "dcp"
    _stager: Any = None  # DCP's DefaultStager: owns the host buffers an asynchronous save copies into
    _staging: Any = None  # Future of the copy in flight: done once the state may change again

    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.unwrapped_model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def _async_state(self) -> dict:
        """The state for a background copy. Buffers are cloned now: the next training forward rewrites
        BatchNorm's running statistics in place (and DDP broadcasts rank 0's over them) before the optimizer
        step that waits for the copy. They are small; parameters and optimizer state change only in that step."""
        state = self._dcp_state()
        buffer_names = {name for name, _ in self.unwrapped_model.named_buffers()}
        state["model"] = {k: v.detach().clone() if k in buffer_names and isinstance(v, torch.Tensor) else v for k, v in state["model"].items()}
        if self.device.type == "cuda":
            # The stager copies on a side stream of its own that never waits for the compute stream: until the
            # clones above (and the optimizer step before them) have run, it would copy what is not there yet.
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            ready.synchronize()
        return state

    def _staging_options(self) -> Any:
        from torch.distributed.checkpoint.staging import StagingOptions

        cuda = self.device.type == "cuda"
        # Pinned host memory makes the device-to-host copy fast and lets it run on a side stream
        # (non-blocking); both need CUDA. Shared memory serves only DCP's process-based writer: the
        # writer here is a thread of this process, and on CPU shared memory made staging slower.
        return StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=cuda)

    def finish_staging(self) -> None:
        """Block until an asynchronous save has copied the state it saves (a no-op when none is copying).
        Called before anything writes parameters or optimizer state: the optimizer step, a load."""
        staging, self._staging = self._staging, None
        if staging is not None:
            staging.result()

    def save_checkpoint(self, directory: Path, background: bool = False) -> Optional[Any]:
        """Model/optimizer/scheduler/scaler with DCP. In the background (checkpoint.async_save) the state is
        copied to host buffers and written by background threads: returns the Future of the write (else None)."""
        import torch.distributed.checkpoint as dcp

        if not background:
            dcp.save(self._dcp_state(), checkpoint_id=str(directory))
            return None
        self.finish_staging()  # the Checkpointer finishes one save before the next; this keeps the buffers safe regardless
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager

            self._stager = DefaultStager(self._staging_options())
        response = dcp.async_save(self._async_state(), checkpoint_id=str(directory), process_group=self.groups.checkpoint, async_stager=self._stager)
        self._staging = response.staging_completion
        return response.upload_completion

    def staged_bytes(self) -> int:
        """Host memory an asynchronous save keeps for its copy: the size of this rank's state tensors."""
        return _tensor_bytes(self._dcp_state())

    def close_staging(self) -> None:
        """Free the staging buffers (after the last save: an asynchronous one still writing is waited for)."""
        self.finish_staging()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def load_checkpoint(self, directory: Path, meta: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        self.finish_staging()
        source = self._dcp_source(directory, meta)
        state = self._dcp_state()
        check_model_fits(source, state["model"])
        try:
            dcp.load(state, storage_reader=_safe_reader(source), planner=_safe_planner())
        except CheckpointError:
            raise
        except _dcp_failures() as e:  # DCP raises a CheckpointException (a BaseException) wrapping per-rank tracebacks
            raise CheckpointError(_dcp_failure(directory, e, "does not fit this model/optimizer")) from None
        set_state_dict(self.unwrapped_model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])

    def _dcp_source(self, directory: Path, meta: dict) -> Path:
        """Where the DCP files of a checkpoint are: its own directory, or for a DeepSpeed checkpoint the view
        of it by parameter name, converted once (strategies/zero_bridge.py)."""
        if written_format(meta) != "deepspeed":
            return require_dcp_files(directory, meta)
        from .zero_bridge import dcp_view, refuse_loss_scale_crossing

        refuse_loss_scale_crossing(directory, meta, self.train.precision)
        return dcp_view(directory, self.groups)

    def full_training_state(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        self.finish_staging()
        # Collective for sharded (FSDP2) state; with cpu_offload only the main process keeps the result.
        model, optimizer = get_state_dict(self.unwrapped_model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dist_env.is_main:
            optimizer = {**optimizer, "scheduler": self.scheduler.state_dict()}
        return model, optimizer

    def teardown(self) -> None:
        self.close_staging()
        super().teardown()  # type: ignore[misc]


def _tensor_bytes(tree: Any) -> int:
    """Bytes of the tensors in a nested state dict; a sharded DTensor counts this rank's shard."""
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        return local.numel() * local.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


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


def check_model_fits(directory: Path, model_state: dict) -> None:
    """Name the parameter that differs (missing, unexpected or another shape) before DCP fails opaquely."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {
        fqn[len("model.") :]: list(md.size)
        for fqn, md in read_dcp_metadata(directory).state_dict_metadata.items()
        if fqn.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    current = {k: list(v.shape) for k, v in model_state.items() if isinstance(v, torch.Tensor)}
    where = f"checkpoint {directory} does not fit this model (model.*)"
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
    except _dcp_failures() as e:  # DCP wraps per-rank failures (a missing shard file, a refused pickle) in one exception
        raise CheckpointError(_dcp_failure(directory, e, "cannot be read")) from None
    return state


def _dcp_failures() -> tuple[type[BaseException], ...]:
    """Evaluated in the `except` clause, once DCP is imported anyway (importing it here would cost every run)."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover
        return (Exception,)
    return (Exception, CheckpointException)


_DAMAGE = ("EOFError", "UnpicklingError", "PytorchStreamReader", "unexpected EOF", "invalid load key", "failed finding central directory")


def _dcp_failure(directory: Path, error: BaseException, otherwise: str) -> str:
    """One line for a failed DCP read: damaged files are named as such, anything else as `otherwise`."""
    text = str(error).strip()
    first = text.splitlines()[-1] if text else type(error).__name__
    if any(marker in text for marker in _DAMAGE):
        files = ", ".join(sorted(p.name for p in Path(directory).glob("*.distcp"))) or "its .distcp files"
        return (
            f"checkpoint {directory} is damaged: a tensor file ({files}) cannot be read ({first}); resume from an "
            "earlier step-N directory with train.resume=PATH, or start over with train.start_over=true"
        )
    return f"checkpoint {directory} {otherwise}: {first}"


