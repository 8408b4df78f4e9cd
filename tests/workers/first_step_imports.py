"""A real 1-process `dist-train train` run that records, at the end of its first optimizer step, the seconds
since the process started and which modules are imported by then.

    python tests/workers/first_step_imports.py OUT.json CONFIG [section.key=value ...]
"""

import json
import os
import sys
import time

from dist_train import cli
from dist_train.strategies.ddp import DDPStrategy


def _seconds_since_process_start() -> float:
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    out, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    step = DDPStrategy.optimizer_step
    seen: dict = {}

    def recording_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        if not seen:
            seen.update(seconds=_seconds_since_process_start(), modules=sorted(sys.modules))
        return result

    DDPStrategy.optimizer_step = recording_step
    started = time.perf_counter()
    code = cli.main(["train", config, *overrides])
    seen["run_seconds"] = time.perf_counter() - started
    with open(out, "w") as f:
        json.dump(seen, f)
    sys.exit(code)


if __name__ == "__main__":
    main()
