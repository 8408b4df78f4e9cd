"""No code from a checkpoint: scan a torch-saved file's pickle before anything unpickles it for real.

DeepSpeed's engine and its `zero_to_fp32` read their files with `torch.load(weights_only=False)`, which runs
whatever callable a crafted pickle names. `refuse_code_in_pickles` reads each file's pickle (the `data.pkl`
of torch's zip format) with an unpickler that builds nothing: every global the pickle names must be on an
allow-list of the types DeepSpeed checkpoints hold, and resolves to an inert stand-in; tensor storages are
not read at all. Anything else is refused with one line naming the file and the global, before DeepSpeed
opens the file.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable

from ..errors import CheckpointError

_STORAGES = {f"{kind}Storage" for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool", "ComplexFloat", "ComplexDouble")}
_DTYPES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool", "complex64", "complex128"}

# What DeepSpeed ZeRO 1-3 checkpoints (model states, optimizer partitions) and torch.save'd state hold.
ALLOWED_GLOBALS: set[tuple[str, str]] = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch.nn.parameter", "Parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),  # ZeRO-3's partitioned parameters
    ("torch", "Tensor"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
    ("torch.serialization", "_get_layout"),
    ("torch", "strided"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("argparse", "Namespace"),
    *{("torch", name) for name in _STORAGES},
    *{("torch", name) for name in _DTYPES},
}


class CodeInCheckpoint(CheckpointError):
    """A checkpoint file's pickle names a callable outside the allow-list; nothing of it was run."""


class _Inert:
    """Stands in for every allowed global: calling, building or filling it does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Inert":
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def add(self, value: Any) -> None:
        pass


class _ScanningUnpickler(pickle.Unpickler):
    def __init__(self, stream: io.BytesIO, source: str) -> None:
        super().__init__(stream)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return _Inert
        raise CodeInCheckpoint(
            f"checkpoint file {self.source} refers to {module}.{name}, which a checkpoint never holds: loading it "
            "would run that code, so it was not loaded. Do not use this checkpoint (resume from another step-N, or "
            "start over with train.start_over=true)"
        )

    def persistent_load(self, pid: Any) -> Any:
        return None  # a tensor storage: never read


def scan_torch_file(path: Path) -> None:
    """Raise CodeInCheckpoint unless every global in `path`'s pickle is allowed (nothing is executed)."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith(".pkl")]
            payloads = [(f"{path}:{n}", archive.read(n)) for n in pickles]
    else:  # torch's legacy (non-zip) format: a sequence of pickles; the first holds the structure
        payloads = [(str(path), path.read_bytes())]
    # The zip format has one pickle per .pkl; the legacy one starts with four (magic, protocol, system
    # info, the structure), and raw storage bytes follow them.
    count = 1 if zipfile.is_zipfile(path) else 4
    for source, data in payloads:
        stream = io.BytesIO(data)
        try:
            for _ in range(count):
                _ScanningUnpickler(stream, str(path)).load()
        except CodeInCheckpoint:
            raise
        except Exception as e:  # damaged, or not a pickle at all: say which file, not a deep traceback
            raise CodeInCheckpoint(f"checkpoint file {source} is damaged or not a torch file ({type(e).__name__}: {e}); resume from another step-N") from None


def refuse_code_in_pickles(files: Iterable[Path]) -> None:
    for path in files:
        scan_torch_file(path)
