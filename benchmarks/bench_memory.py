"""Per-process memory and throughput of ResNet-18 + Adam under DDP, FSDP2 and DeepSpeed ZeRO 1/2/3.

  python benchmarks/bench_memory.py [--strategies ddp,fsdp2,1,2,3] [--steps 4] [--nprocs 1,2]

Each strategy runs the real trainer (`Trainer.build` + `fit`) under torchrun on the digits at 32x32 with
the whole network trained (no frozen backbone), global batch 32 = micro 8 x 2 ranks x 2 accumulation.
Per process it reports:
  Adam moments      exp_avg + exp_avg_sq held on this rank: what ZeRO-1 divides by the world size
  fp32 master       the optimizer's own fp32 copy of its partition (ZeRO keeps one beside the module's
                    weights even in fp32; DDP steps the weights themselves)
  weights           the module's parameters resident on this rank (ZeRO-3, FSDP2: its shard)
  gradients         the gradient a rank holds for its trainable parameters during a step (DDP: whole,
                    FSDP2: its shard after the reduce-scatter); not measured for ZeRO ("-")
  peak RSS          the process's high-water mark (ru_maxrss), and that peak above the RSS measured after
                    imports, before the model exists (every run imports DeepSpeed and torch._inductor
                    first, so the baseline is the same for DDP and ZeRO)
  CUDA peak         torch.cuda.max_memory_allocated, when the processes run on GPUs
  samples/s         median over the steps after the first (the trainer's own per-step figure)
Prints a table and writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
MB = 2**20


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


def _state_breakdown(strategy) -> dict:
    """MB this rank holds of: Adam's moments, the optimizer's own fp32 master copy (ZeRO keeps one beside the
    module's weights, partitioned), and the module's weights (ZeRO-3: this rank's partition)."""
    import torch

    def local(t):  # FSDP2's DTensors report global sizes; this rank holds its shard
        return t.to_local() if hasattr(t, "to_local") else t

    optimizer = strategy.optimizer
    while hasattr(optimizer, "optimizer"):  # ZeRO wraps the torch optimizer, whose params become flat partitions
        optimizer = optimizer.optimizer
    module = strategy.unwrapped_model
    module_storages = {local(p).untyped_storage().data_ptr() for p in module.parameters() if p.numel()}
    moments = sum(local(t).numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor) and t.dim())
    masters = sum(
        local(p).numel() * p.element_size() for g in optimizer.param_groups for p in g["params"]
        if p.numel() and local(p).untyped_storage().data_ptr() not in module_storages
    )
    weights = sum(local(p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in module.parameters())
    grads = float("nan") if strategy.name == "deepspeed" else sum(local(p).numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return {"optimizer_moments_mb": moments / MB, "master_copy_mb": masters / MB, "weights_mb": weights / MB, "gradients_mb": grads / MB}


def measure(strategy: str, steps: int, out: Path) -> dict:
    """One process of one run."""
    import torch

    # Same imports for every run: DeepSpeed's first engine pulls in torch._inductor (~hundreds of MB of RSS).
    import deepspeed  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401

    from dist_train.config import load_config
    from dist_train.distributed.environment import detect_environment
    from dist_train.distributed.groups import GroupNeeds, ProcessGroups
    from dist_train.observe.tracking import Tracker
    from dist_train.trainer import Trainer

    class StepRates(Tracker):
        def __init__(self) -> None:
            self.rates: list[float] = []

        def log(self, metrics, step):
            if "train/samples_per_second" in metrics:
                self.rates.append(metrics["train/samples_per_second"])

    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env, GroupNeeds(alone=True, background_checkpoint=True), 600)
    overrides = [
        "model.name=resnet18", "model.image_size=32", "data.source=digits", "optim.name=adam", "optim.lr=0.001",
        "train.global_batch_size=32", "train.micro_batch_size=8", f"train.max_steps={steps}", "train.log_interval=1",
        "train.progress_bar=false", "checkpoint.save_at_end=false", f"output_dir={out / strategy}",
    ]
    if strategy in ("ddp", "fsdp2"):
        overrides += [f"strategy.name={strategy}"]
    else:
        overrides += ["strategy.name=deepspeed", f"strategy.deepspeed.zero_stage={strategy}"]
    try:
        baseline = _rss_mb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer.build(load_config(None, overrides), groups)
        trainer.tracker = rates = StepRates()
        try:
            trainer.fit()
            breakdown = _state_breakdown(trainer.strategy)
        finally:
            trainer.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        result = {
            "strategy": strategy if strategy in ("ddp", "fsdp2") else f"zero{strategy}",
            "rank": dist_env.global_rank,
            "device": dist_env.device,
            **breakdown,
            "peak_rss_mb": peak,
            "peak_rss_above_baseline_mb": peak - baseline,
            "samples_per_second": statistics.median(rates.rates[1:] or rates.rates),
        }
        if torch.cuda.is_available():
            result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / MB
    finally:
        groups.teardown()
    (out / f"{strategy}.rank{dist_env.global_rank}.json").write_text(json.dumps(result))
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(strategy: str, steps: int, nproc: int, out: Path, timeout: float) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, "--worker", strategy, "--steps", str(steps), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # Its own session, so a hang is killed whole (torchrun and both ranks) rather than left behind.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise SystemExit(f"{strategy} timed out after {timeout:.0f}s:\n{stderr[-3000:]}") from None
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} failed (exit {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return [json.loads((out / f"{strategy}.rank{rank}.json").read_text()) for rank in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="ddp,fsdp2,1,2,3", help="comma list of ddp, fsdp2 and ZeRO stages")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--nprocs", default="1,2", help="comma list of process counts")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        measure(args.worker, args.steps, Path(args.out))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for nproc in [int(n) for n in args.nprocs.split(",")]:
            for strategy in args.strategies.split(","):
                per_rank = run_one(strategy, args.steps, nproc, Path(tmp) / str(nproc), args.timeout)
                row = {key: max(r[key] for r in per_rank) for key in per_rank[0] if key.endswith(("_mb",))}
                row.update(strategy=per_rank[0]["strategy"], nproc=nproc, device=per_rank[0]["device"], samples_per_second=statistics.median(r["samples_per_second"] for r in per_rank))
                rows.append(row)
                print(f"  {row['strategy']} x {nproc}: done", flush=True)

    cuda = any("cuda_peak_mb" in r for r in rows)
    columns = [("Adam moments", "optimizer_moments_mb"), ("fp32 master", "master_copy_mb"), ("weights", "weights_mb"), ("gradients", "gradients_mb"),
               ("peak RSS", "peak_rss_mb"), ("RSS > base", "peak_rss_above_baseline_mb")] + ([("CUDA peak", "cuda_peak_mb")] if cuda else [])
    print(f"ResNet-18 + Adam on {rows[0]['device'].split(':')[0]}; MB per process (max over ranks):")
    print(f"{'strategy':9} {'procs':>5}" + "".join(f" {title:>13}" for title, _ in columns) + f" {'samples/s':>10}")
    for r in rows:
        print(f"{r['strategy']:9} {r['nproc']:5d}" + "".join(f" {r.get(key, float('nan')):13.1f}" for _, key in columns) + f" {r['samples_per_second']:10.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2))
    print(f"wrote {RESULTS / 'memory.json'}")


if __name__ == "__main__":
    main()
