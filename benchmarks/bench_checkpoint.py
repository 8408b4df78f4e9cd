"""Checkpoint timing for ResNet-18 + Adam (model and optimizer state, ~134 MB): save and load MB/s,
synchronous vs asynchronous save (how long the training loop is blocked, and how long until the
checkpoint is complete on disk), on 1 and 2 processes (gloo on CPU, NCCL when CUDA is there).

  python benchmarks/bench_checkpoint.py [--nproc 1,2] [--repeats 3] [--dir /tmp/bench_ckpt]

Prints a table and writes benchmarks/results/checkpoint.json. Each process count runs under torchrun
(a plain process for 1); the numbers are medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(directory: Path, repeats: int) -> dict:
    """One process of the run: build the real strategy + Checkpointer and time save / async save / load."""
    import torch

    from dist_train.checkpoint import Checkpointer
    from dist_train.config import batch_arithmetic, load_config
    from dist_train.env import backend_for, destroy_process_group, detect_environment, init_process_group
    from dist_train.models import build_model
    from dist_train.optim import build_optimizer, build_scheduler
    from dist_train.strategies import build_strategy

    dist_env = detect_environment()
    init_process_group(dist_env, backend_for(dist_env, None), 600)
    try:
        results: dict = {"world_size": dist_env.world_size, "device": str(dist_env.torch_device)}
        for mode in ("sync", "async"):
            cfg = load_config(None, ["model.name=resnet18", f"output_dir={directory / mode}", f"checkpoint.async_save={'true' if mode == 'async' else 'false'}",
                                     f"checkpoint.keep_latest={repeats + 1}", "optim.name=adam", f"train.global_batch_size={2 * dist_env.world_size}", "train.micro_batch_size=2"])
            strategy = build_strategy(cfg, dist_env, batch_arithmetic(cfg.train, dist_env.world_size))
            torch.manual_seed(0)
            strategy.setup_module(build_model(cfg.model))
            optimizer = build_optimizer(cfg.optim, strategy.unwrapped_model)
            strategy.setup_optimizer(optimizer, build_scheduler(cfg.optim, optimizer, 100))
            # One real step so Adam's state (exp_avg, exp_avg_sq) exists and is saved.
            loss = strategy.model(torch.randn(2, 3, 32, 32, device=strategy.device)).sum()
            strategy.backward(loss, True)
            strategy.optimizer_step()
            checkpointer = Checkpointer(cfg, dist_env, strategy)
            blocked, complete, load = [], [], []
            for step in range(1, repeats + 1):
                strategy.barrier()
                start = time.perf_counter()
                path = checkpointer.save(step, {})
                blocked.append(time.perf_counter() - start)
                checkpointer.wait()
                complete.append(time.perf_counter() - start)
                strategy.barrier()
                start = time.perf_counter()
                checkpointer.resume(str(path), {})
                strategy.barrier()
                load.append(time.perf_counter() - start)
            size = _dir_bytes(path) if dist_env.is_main else 0
            results[mode] = {
                "size_mb": size / 1e6,
                "blocked_s": statistics.median(blocked),
                "complete_s": statistics.median(complete),
                "load_s": statistics.median(load),
            }
            strategy.teardown()
        return results
    finally:
        destroy_process_group()


def run_worker(args: argparse.Namespace) -> None:
    results = measure(Path(args.dir), args.repeats)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.json).write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", default="1,2", help="process counts to compare, e.g. 1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary directory)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return

    rows = []
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        for nproc in [int(n) for n in args.nproc.split(",")]:
            out = base / f"np{nproc}"
            shutil.rmtree(out, ignore_errors=True)
            json_path = base / f"np{nproc}.json"
            worker = [__file__, "--worker", "--dir", str(out), "--repeats", str(args.repeats), "--json", str(json_path)]
            if nproc == 1:
                cmd = [sys.executable, *worker]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *worker]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            rows.append({"nproc": nproc, **json.loads(json_path.read_text())})
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)

    header = f"{'procs':>5} {'mode':>5} {'size MB':>8} {'save s':>7} {'save MB/s':>9} {'blocked s':>9} {'load s':>7} {'load MB/s':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        for mode in ("sync", "async"):
            r = row[mode]
            print(
                f"{row['nproc']:>5} {mode:>5} {r['size_mb']:>8.1f} {r['complete_s']:>7.3f} {r['size_mb'] / r['complete_s']:>9.1f} "
                f"{r['blocked_s']:>9.3f} {r['load_s']:>7.3f} {r['size_mb'] / r['load_s']:>9.1f}"
            )
    print("save s = until the checkpoint is complete on disk; blocked s = time the training loop waits in save()")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {RESULTS / 'checkpoint.json'}")


if __name__ == "__main__":
    main()
