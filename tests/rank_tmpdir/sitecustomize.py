"""On PYTHONPATH, Python imports this at start-up in every process: a process started by torchrun (LOCAL_RANK
set) gets a temp folder of its own, /tmp/rank-LOCAL_RANK, as a launcher or site prolog that sets TMPDIR per
task does. The ranks of one node then see different temp folders (the launcher itself is left alone)."""

import os

if os.environ.get("LOCAL_RANK") is not None:
    os.environ["TMPDIR"] = f"/tmp/rank-{os.environ['LOCAL_RANK']}"
    os.makedirs(os.environ["TMPDIR"], exist_ok=True)
