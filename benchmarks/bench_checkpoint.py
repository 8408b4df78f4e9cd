"""Checkpoint timing for ResNet-18 + Adam (model and optimizer state, ~134 MB): save and load MB/s,
synchronous vs asynchronous save (how long the training loop is blocked, and how long until the
checkpoint is complete on disk), on 1 and 2 processes (gloo on CPU, NCCL when CUDA is there).

An asynchronous save blocks the loop twice: in save() (taking the state dict, side files) and, if the
background copy to the staging buffers is not done by then, at the next optimizer step. Both count in
"blocked s": after each save the benchmark runs one real training step and times that wait. The memory
cost is the staging buffers (kept and reused across saves): their size, and the growth of this
process's resident memory over the saves.

The ZeRO part (when DeepSpeed is installed; --no-zero skips it): a ZeRO-2 checkpoint of the same model and optimizer written by
2 processes; in interleaved rounds, DeepSpeed's own load of it on those 2 processes (a plain resume) against
its conversion, by the same 2 processes, into the DCP view that a resume on another world size or strategy reads
(strategies/zero_bridge.py; done once per checkpoint). The goal: the conversion costs at most two plain loads.

  python benchmarks/bench_checkpoint.py [--nproc 1,2] [--repeats 3] [--dir /tmp/bench_ckpt] [--no-zero | --zero-only]

Prints a table and writes benchmarks/results/checkpoint.json. Each process count runs under torchrun
(a plain process for 1); the numbers are medians over the repeats (the ZeRO part also shows min-max).
"""

from __future__ import annotations

import argparse
import importlib.util
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(directory: Path, repeats: int) -> dict:
    """One process of the run: build the real strategy + Checkpointer and time save / async save / load."""
    import torch

    from dist_train.checkpoint import Checkpointer
    from dist_train.config import batch_arithmetic, load_config
    from dist_train.distributed.environment import detect_environment
    from dist_train.distributed.groups import GroupNeeds, ProcessGroups
    from dist_train.models import build_model
    from dist_train.optim import build_optimizer, build_scheduler
    from dist_train.strategies import build_strategy

    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env, GroupNeeds(alone=True, background_checkpoint=True), 600)
    try:
        results: dict = {"world_size": dist_env.world_size, "device": str(dist_env.torch_device)}
        for mode in ("sync", "async"):
            cfg = load_config(None, ["model.name=resnet18", f"output_dir={directory / mode}", f"checkpoint.async_save={'true' if mode == 'async' else 'false'}",
                                     f"checkpoint.keep_latest={repeats + 1}", "optim.name=adam", f"train.global_batch_size={2 * dist_env.world_size}", "train.micro_batch_size=2"])
            strategy = build_strategy(cfg, groups, batch_arithmetic(cfg.train, dist_env.world_size))
            torch.manual_seed(0)
            strategy.setup_module(build_model(cfg.model))
            optimizer = build_optimizer(cfg.optim, strategy.unwrapped_model)
            strategy.setup_optimizer(optimizer, build_scheduler(cfg.optim, optimizer, 100))
            inputs = torch.randn(2, 3, 32, 32, device=strategy.device)

            def forward_backward() -> None:
                strategy.backward(strategy.model(inputs).sum(), True)

            # One real step so Adam's state (exp_avg, exp_avg_sq) exists and is saved.
            forward_backward()
            strategy.optimizer_step()
            checkpointer = Checkpointer(cfg, dist_env, strategy)
            blocked, in_save, complete, load = [], [], [], []
            rss_before = _rss_bytes()
            for step in range(1, repeats + 1):
                strategy.barrier()
                start = time.perf_counter()
                path = checkpointer.save(step, {})
                saved = time.perf_counter()
                # Training goes on: the next step's forward/backward overlaps the background copy; the
                # optimizer step may not start before it is done.
                forward_backward()
                waited = time.perf_counter()
                strategy.finish_staging()
                blocked.append(saved - start + time.perf_counter() - waited)
                in_save.append(saved - start)
                strategy.optimizer_step()
                checkpointer.wait()
                # A synchronous save is complete when save() returns; an asynchronous one by the end of wait(),
                # an upper bound since its write overlapped the training step.
                complete.append(saved - start if mode == "sync" else time.perf_counter() - start)
                strategy.barrier()
                start = time.perf_counter()
                checkpointer.resume(str(path), {})
                strategy.barrier()
                load.append(time.perf_counter() - start)
            size = _dir_bytes(path) if dist_env.is_main else 0
            results[mode] = {
                "size_mb": size / 1e6,
                "blocked_s": statistics.median(blocked),
                "blocked_in_save_s": statistics.median(in_save),
                "staged_mb": strategy.staged_bytes() / 1e6 if mode == "async" else 0.0,
                "rss_growth_mb": (_rss_bytes() - rss_before) / 1e6,
                "complete_s": statistics.median(complete),
                "load_s": statistics.median(load),
            }
            strategy.teardown()
        return results
    finally:
        groups.teardown()


def measure_zero(directory: Path, repeats: int) -> dict:
    """2 processes: a ZeRO-2 checkpoint, then rounds of (DeepSpeed's own load, conversion to the DCP view)."""
    import shutil as _shutil

    import torch

    from dist_train.checkpoint import Checkpointer
    from dist_train.config import batch_arithmetic, load_config
    from dist_train.distributed.environment import detect_environment
    from dist_train.distributed.groups import GroupNeeds, ProcessGroups
    from dist_train.models import build_model
    from dist_train.optim import build_optimizer, build_scheduler
    from dist_train.strategies import build_strategy, zero_bridge

    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env, GroupNeeds(alone=True), 600)

    def zero_strategy(stage: int):
        cfg = load_config(None, ["model.name=resnet18", f"output_dir={directory / f'zero{stage}'}", "optim.name=adam", "strategy.name=deepspeed",
                                 f"strategy.deepspeed.zero_stage={stage}", f"train.global_batch_size={2 * dist_env.world_size}", "train.micro_batch_size=2"])
        strategy = build_strategy(cfg, groups, batch_arithmetic(cfg.train, dist_env.world_size))
        torch.manual_seed(0)
        strategy.setup_module(build_model(cfg.model))
        optimizer = build_optimizer(cfg.optim, strategy.unwrapped_model)
        strategy.setup_optimizer(optimizer, build_scheduler(cfg.optim, optimizer, 100))
        return cfg, strategy

    try:
        cfg, strategy = zero_strategy(2)
        strategy.backward(strategy.model(torch.randn(2, 3, 32, 32)).sum(), True)
        strategy.optimizer_step()
        checkpointer = Checkpointer(cfg, dist_env, strategy)
        path = checkpointer.save(1, {})
        cfg3, other_stage = zero_strategy(3)  # loads the ZeRO-2 checkpoint by name, through the view
        by_name = Checkpointer(cfg3, dist_env, other_stage)
        load, convert, load_by_name = [], [], []
        for _ in range(repeats):
            strategy.barrier()
            start = time.perf_counter()
            checkpointer.resume(str(path), {})
            strategy.barrier()
            load.append(time.perf_counter() - start)
            if dist_env.is_main:
                _shutil.rmtree(path / zero_bridge.VIEW_DIR, ignore_errors=True)
                os.sync()  # the previous round's writes are not this one's cost
            strategy.barrier()
            start = time.perf_counter()
            zero_bridge.dcp_view(path, groups)  # what the first resume on another world size or strategy does
            strategy.barrier()
            convert.append(time.perf_counter() - start)
            start = time.perf_counter()
            by_name.resume(str(path), {})
            strategy.barrier()
            load_by_name.append(time.perf_counter() - start)
        other_stage.teardown()
        strategy.teardown()
        size = _dir_bytes(path / "zero") if dist_env.is_main else 0
        return {"world_size": dist_env.world_size, "size_mb": size / 1e6, "load_s": load, "convert_s": convert, "load_by_name_s": load_by_name}
    finally:
        groups.teardown()


def run_worker(args: argparse.Namespace) -> None:
    if args.zero_worker:
        results = measure_zero(Path(args.dir), args.repeats)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.json).write_text(json.dumps(results))
        return
    results = measure(Path(args.dir), args.repeats)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.json).write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", default="1,2", help="process counts to compare, e.g. 1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary directory)")
    parser.add_argument("--no-zero", action="store_true", help="skip the ZeRO-2 conversion against DeepSpeed's own load")
    parser.add_argument("--zero-only", action="store_true", help="only the ZeRO part")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.zero_worker:
        run_worker(args)
        return

    rows: list = []
    zero: dict = {}
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        if args.zero_only or (not args.no_zero and importlib.util.find_spec("deepspeed") is not None):
            zero = _run_zero(base, args.repeats)
        for nproc in ([] if args.zero_only else [int(n) for n in args.nproc.split(",")]):
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

    if zero:
        _print_zero(zero)
    if not rows:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "checkpoint_zero.json").write_text(json.dumps(zero, indent=2))
        print(f"wrote {RESULTS / 'checkpoint_zero.json'}")
        return
    header = (
        f"{'procs':>5} {'mode':>5} {'size MB':>8} {'save s':>7} {'save MB/s':>9} {'blocked s':>9} {'of sync':>7} "
        f"{'staged MB':>9} {'RSS +MB':>7} {'load s':>7} {'load MB/s':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        for mode in ("sync", "async"):
            r = row[mode]
            print(
                f"{row['nproc']:>5} {mode:>5} {r['size_mb']:>8.1f} {r['complete_s']:>7.3f} {r['size_mb'] / r['complete_s']:>9.1f} "
                f"{r['blocked_s']:>9.3f} {r['blocked_s'] / row['sync']['blocked_s']:>7.1%} {r['staged_mb']:>9.1f} {r['rss_growth_mb']:>7.1f} "
                f"{r['load_s']:>7.3f} {r['size_mb'] / r['load_s']:>9.1f}"
            )
    print(
        "save s = until the checkpoint is complete on disk; blocked s = time the training loop waits (in save(), and for the\n"
        "background copy before the next optimizer step); staged MB = the host buffers that copy keeps (per process, reused\n"
        "across saves); RSS +MB = growth of the process's resident memory over the saves"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint.json").write_text(json.dumps({"rows": rows, "zero": zero} if zero else rows, indent=2))
    print(f"wrote {RESULTS / 'checkpoint.json'}")


def _run_zero(base: Path, repeats: int) -> dict:
    out = base / "zero"
    shutil.rmtree(out, ignore_errors=True)
    json_path = base / "zero.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, "--zero-worker",
           "--dir", str(out), "--repeats", str(repeats), "--json", str(json_path)]  # fmt: skip
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads(json_path.read_text())


def _print_zero(zero: dict) -> None:
    load, convert = zero["load_s"], zero["convert_s"]
    ratios = [c / l for c, l in zip(convert, load)]
    print(f"ZeRO-2 checkpoint of ResNet-18 + Adam ({zero['size_mb']:.0f} MB under zero/), written by {zero['world_size']} processes; {len(load)} interleaved rounds")
    print(f"  DeepSpeed's own load (2 processes)     median {statistics.median(load):.3f} s  (min {min(load):.3f}, max {max(load):.3f})")
    print(f"  conversion, same 2 processes (once)    median {statistics.median(convert):.3f} s  (min {min(convert):.3f}, max {max(convert):.3f})")
    print(f"  conversion / load, per round           median {statistics.median(ratios):.2f}x  (min {min(ratios):.2f}, max {max(ratios):.2f}); goal <= 2x")
    by_name = zero["load_by_name_s"]
    print(f"  then a ZeRO-3 load of it by name       median {statistics.median(by_name):.3f} s  (min {min(by_name):.3f}, max {max(by_name):.3f}), reading the view")
    print("Absolute times swing with the machine's load (shared); the ratios are per round, each round runs all three in turn.")


if __name__ == "__main__":
    main()
