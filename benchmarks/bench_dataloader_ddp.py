"""Why loops through a DataLoader looked slower under DDP: the same loop, in one process per rank, over
pre-built batches and over the tutorial's DataLoader in alternating blocks of 10 steps, so both are timed in
the same seconds on the same model. Prints each source's fetch time and whole-step time per step.

  python benchmarks/bench_dataloader_ddp.py [--models cnn mlp] [--blocks 40]      (starts 2 gloo processes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_overhead as overhead  # noqa: E402 (the overhead benchmark's data, models and loops)

BLOCK = 10


def measure(model_name: str, blocks: int, result: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = overhead.process_group()
    X, y = overhead.digits_28x28()
    model, optimizer = overhead.hand_setup(model_name, world)
    model.train()
    prebuilt = iter(overhead.prebuilt_batches(X, y, rank, world, blocks))
    loader = overhead.tutorial_loader(X, y, rank, world)

    def from_loader() -> Iterator[Any]:
        epoch = 0
        while True:
            if world > 1:
                loader.sampler.set_epoch(epoch)
            epoch += 1
            yield from loader

    sources = {"pre-built batches": prebuilt, "DataLoader": from_loader()}
    fetch: dict[str, list[float]] = {name: [] for name in sources}
    step: dict[str, list[float]] = {name: [] for name in sources}
    for block in range(blocks):
        for name in (list(sources) if block % 2 else list(sources)[::-1]):
            for _ in range(BLOCK):
                start = time.perf_counter()
                X_batch, y_batch = next(sources[name])
                fetched = time.perf_counter()
                overhead.hand_step(model, optimizer, X_batch, y_batch)
                fetch[name].append(fetched - start)
                step[name].append(time.perf_counter() - start)
    if rank == 0:
        warm = 2 * BLOCK
        Path(result).write_text(json.dumps({
            name: {
                "fetch_ms": statistics.median(fetch[name][warm:]) * 1e3,
                "step_ms_median": statistics.median(step[name][warm:]) * 1e3,
                "step_ms_mean": statistics.fmean(step[name][warm:]) * 1e3,
            }
            for name in sources
        }))
    if world > 1:
        dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"])
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        measure(args.worker, args.blocks, args.result)
        sys.stdout.flush()
        os._exit(0)

    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench_dataloader_ddp_") as tmp:
        for model in args.models:
            result = Path(tmp) / f"{model}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.procs),
                   __file__, "--worker", model, "--blocks", str(args.blocks), "--result", str(result)]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
            rows[model] = json.loads(result.read_text())
    print(f"{args.procs} processes, DDP over gloo, 1 thread each; blocks of {BLOCK} steps alternating; ms per step (median)")
    print(f"{'model':<6}{'source':<19}{'fetch':>8}{'step':>8}{'mean':>8}")
    for model, sources in rows.items():
        for name, r in sources.items():
            print(f"{model:<6}{name:<19}{r['fetch_ms']:>8.3f}{r['step_ms_median']:>8.3f}{r['step_ms_mean']:>8.3f}")
        pre, dl = sources["pre-built batches"], sources["DataLoader"]
        print(f"{'':<6}{'DataLoader extra':<19}{dl['fetch_ms'] - pre['fetch_ms']:>8.3f}{dl['step_ms_median'] - pre['step_ms_median']:>8.3f}{dl['step_ms_mean'] - pre['step_ms_mean']:>8.3f}")
    out = HERE / "results" / "dataloader_ddp.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
