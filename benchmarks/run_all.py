"""Runs every benchmark in turn (each prints its table and writes JSON to benchmarks/results/).

Run on a quiet machine: the numbers are ratios against baselines measured in the same run, but a busy
machine still adds noise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_overhead.py", "bench_step_parts.py", "bench_dataloader_ddp.py", "bench_loader.py", "bench_checkpoint.py", "bench_memory.py"]


def main() -> int:
    failed = []
    for script in SCRIPTS:
        print(f"\n=== {script}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script)]).returncode != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
