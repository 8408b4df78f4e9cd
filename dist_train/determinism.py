"""`train.deterministic=true`: bitwise-repeatable kernels, strictly on CPU, as far as CUDA allows on GPUs."""

from __future__ import annotations

import os
from typing import Optional

import torch

CUDA_NOTE = (
    "deterministic: CUDA ops without a deterministic kernel (e.g. ResNet-18's adaptive average-pool backward, "
    "pytorch#149130) warn instead of failing, and those ops may differ between runs"
)


def use_deterministic_algorithms(device: torch.device) -> Optional[str]:
    """Switch torch to deterministic kernels for `device`; returns a note for the console, or None.

    On CPU every op the tutorial models use has a deterministic kernel, so an op without one is an error.
    On CUDA some (adaptive average-pool backward, scatter-add with duplicates, ...) have none, and raising
    would make `train.deterministic=true` unusable for ResNet-18: those warn, the rest stay deterministic.
    """
    on_cuda = device.type == "cuda"
    if on_cuda:
        # cuBLAS needs a fixed workspace to be deterministic; set before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=on_cuda)
    return CUDA_NOTE if on_cuda else None
