"""On PYTHONPATH, Python imports this at start-up in every process: rank 0 then starts two seconds after the
other ranks, as on a loaded node (the launcher itself has no RANK and is not delayed)."""

import os
import time

if os.environ.get("RANK") == "0":
    time.sleep(2.0)
