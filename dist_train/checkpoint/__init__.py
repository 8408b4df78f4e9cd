"""Everything a checkpoint is, and nothing of any backend.

  checkpointer.py      step-N directories written atomically, the index, retention, resume (the backend
                       writes its own files into the directory it is handed)
  lineage.py           a run directory belongs to one run: run.json, run.lock, what a new start may do
  resume_semantics.py  what each config key does when a run resumes with another value
  safe_load.py         no checkpoint file runs code: the scan before a library unpickles one
"""

from ..errors import CheckpointError
from .checkpointer import (
    COMPLETE_MARKER,
    INDEX_FILE,
    META_FILE,
    TMP_PREFIX,
    TRASH_PREFIX,
    CheckpointIndex,
    Checkpointer,
    complete_checkpoints,
    find_checkpoint,
    read_meta,
    step_dir_name,
)

__all__ = [
    "COMPLETE_MARKER", "INDEX_FILE", "META_FILE", "TMP_PREFIX", "TRASH_PREFIX", "CheckpointError", "CheckpointIndex",
    "Checkpointer", "complete_checkpoints", "find_checkpoint", "read_meta", "step_dir_name",
]  # fmt: skip
