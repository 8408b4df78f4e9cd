"""Per-step overhead: dist_train against the compute limit, the tutorial loop and Accelerate, side by side.

Every contender is a fresh process (under torchrun for 2 processes), run on a pseudo-terminal so progress
bars draw as they do for a user, trains the same model on the same data (scikit-learn's digits resized to
28x28, in memory), fp32, batch 64 per rank, Adam, and reports the time of every optimizer step's end:

  limit       the hand loop over pre-built tensor batches (under DDP: the same DDP wrapper): the compute limit
  tutorial    the tutorial's loop over a DataLoader(TensorDataset, shuffle=True), printing the loss every 100 batches
  accelerate  the same loop through Accelerate (prepare + accelerator.backward)
  dist_train  `dist-train train` with its defaults: progress bar and log lines on
  no_bar      the same with train.progress_bar=false

Contenders run in interleaved rounds (a shuffled order per round), so drift on a shared machine hits them
alike; each round pairs dist_train's samples/s with every other contender's. Reported: median samples/s,
the median paired ratio to each contender with its min..max over the rounds, the rounds dist_train was
slower in, extra ms per step over the compute limit, start-up (process start to the end of the first
optimizer step) and peak RSS.

Whole-process timings swing here, so `calibrate` also measures in-process: inside one dist_train run,
every 10th step is followed by a block of 5 compute-limit steps (the hand-written step over pre-built
batches, on dist_train's own model, optimizer and DDP wrapper), and both step times are compared over the
same seconds.

  python benchmarks/bench_overhead.py [--rounds 8] [--ddp-rounds 6] [--models cnn mlp] [--procs 1 2]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import random
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CONTENDERS = ("limit", "tutorial", "accelerate", "dist_train", "no_bar")
BATCH = 64  # per rank
EPOCHS = {"cnn": 10, "mlp": 40}  # 1 process: 22 steps/epoch; 2 processes: 11 (twice the epochs, the same steps)
WARMUP_FRACTION = 0.1
TRAIN_SAMPLES = 1438  # dist_train's digits split: 1,797 samples, 20% held out
CALIBRATE_EVERY, CALIBRATE_BLOCK = 10, 5


# ------------------------------------------------------------------ the contenders (child processes)


class Clock:
    """Step-end times of one contender; rank 0 writes them (and start-up, peak RSS) to --result."""

    def __init__(self, result: str) -> None:
        self.result = result
        self.t0 = float(os.environ["BENCH_T0"])  # the parent's time.time() just before it started the process
        self.stamps: list[float] = []
        self.first_step_wall = 0.0
        self.extra: dict[str, Any] = {}

    def step_done(self) -> None:
        now = time.perf_counter()
        if not self.stamps:
            self.first_step_wall = time.time()
        self.stamps.append(now)

    def write(self, samples_per_step: int) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        n = len(self.stamps)
        warm = max(10, int(n * WARMUP_FRACTION))
        seconds = self.stamps[-1] - self.stamps[warm - 1]
        Path(self.result).write_text(json.dumps({
            "steps": n,
            "timed_steps": n - warm,
            "samples_per_s": (n - warm) * samples_per_step / seconds,
            "ms_per_step": seconds / (n - warm) * 1000,
            "startup_s": self.first_step_wall - self.t0,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **self.extra,
        }))


def digits_28x28() -> tuple[Any, Any]:
    """What dist_train's data.source=digits trains on: 1,438 images, float in [0, 1], resized bilinearly."""
    import torch
    from sklearn.datasets import load_digits
    from torch.nn import functional as F

    bunch = load_digits()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round()).float().div_(255.0).unsqueeze(1)
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False).contiguous()
    return images[:TRAIN_SAMPLES], torch.from_numpy(bunch.target[:TRAIN_SAMPLES]).long()


def tutorial_model(name: str) -> Any:
    from dist_train.models.tutorial import CNN, MLP  # torch-only module: layer for layer the tutorials' nets

    return {"cnn": CNN, "mlp": MLP}[name]()


def process_group() -> tuple[int, int]:
    """(rank, world size); a gloo group under torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), world
    return 0, 1


def hand_setup(model_name: str, world: int) -> tuple[Any, Any]:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    module = tutorial_model(model_name)
    model = DistributedDataParallel(module) if world > 1 else module
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def prebuilt_batches(X: Any, y: Any, rank: int, world: int, epochs: int) -> list[tuple[Any, Any]]:
    """This rank's slice of every global batch, every epoch, built before the clock starts."""
    import torch

    batches = []
    global_batch = BATCH * world
    for epoch in range(epochs):
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(X) - global_batch + 1, global_batch):
            idx = order[start + rank * BATCH : start + (rank + 1) * BATCH]
            batches.append((X[idx].contiguous(), y[idx].contiguous()))
    return batches


def hand_step(model: Any, optimizer: Any, X: Any, y: Any) -> Any:
    from torch.nn import functional as F

    loss = F.cross_entropy(model(X), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def run_limit(model_name: str, clock: Clock) -> int:
    rank, world = process_group()
    X, y = digits_28x28()
    model, optimizer = hand_setup(model_name, world)
    model.train()
    for X_batch, y_batch in prebuilt_batches(X, y, rank, world, EPOCHS[model_name] * world):
        hand_step(model, optimizer, X_batch, y_batch)
        clock.step_done()
    return BATCH * world


def tutorial_loader(X: Any, y: Any, rank: int, world: int) -> Any:
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    dataset = TensorDataset(X, y)
    if world == 1:
        return DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, drop_last=True)
    return DataLoader(dataset, batch_size=BATCH, sampler=sampler, drop_last=True)


def run_tutorial(model_name: str, clock: Clock) -> int:
    rank, world = process_group()
    X, y = digits_28x28()
    model, optimizer = hand_setup(model_name, world)
    dataloader = tutorial_loader(X, y, rank, world)
    model.train()
    for epoch in range(EPOCHS[model_name] * world):
        if world > 1:
            dataloader.sampler.set_epoch(epoch)
        for batch, (X_batch, y_batch) in enumerate(dataloader):
            loss = hand_step(model, optimizer, X_batch, y_batch)
            clock.step_done()
            if batch % 100 == 0 and rank == 0:
                print(f"loss: {loss.item():>7f}  [{(batch + 1) * len(X_batch):>5d}/{len(X):>5d}]")
    return BATCH * world


def run_accelerate(model_name: str, clock: Clock) -> int:
    import torch
    from accelerate import Accelerator
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    # On a machine without GPUs Accelerate runs multi-process only when told it is on CPU (what
    # `accelerate launch --cpu` sets); otherwise every process would train alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    X, y = digits_28x28()
    torch.manual_seed(0)
    model = tutorial_model(model_name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dataloader = DataLoader(TensorDataset(X, y), batch_size=BATCH, shuffle=True, drop_last=True)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    model.train()
    for epoch in range(EPOCHS[model_name] * accelerator.num_processes):
        dataloader.set_epoch(epoch)
        for batch, (X_batch, y_batch) in enumerate(dataloader):
            loss = F.cross_entropy(model(X_batch), y_batch)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            clock.step_done()
            if batch % 100 == 0 and accelerator.is_main_process:
                print(f"loss: {loss.item():>7f}  [{(batch + 1) * len(X_batch):>5d}/{len(X):>5d}]")
    return BATCH * accelerator.num_processes


def dist_train_args(model_name: str, world: int, out: str, progress_bar: bool) -> list[str]:
    return [
        "train", str(REPO / "configs" / f"{model_name}_digits.yaml"),
        "data.source=digits",
        "optim.name=adam", "optim.lr=0.001", "optim.schedule=constant",
        f"train.global_batch_size={BATCH * world}", f"train.micro_batch_size={BATCH}",
        f"train.epochs={EPOCHS[model_name] * world}",
        "train.eval_interval=1000000",  # evaluated once, after the timed loop, as the hand loops skip it
        f"train.progress_bar={'true' if progress_bar else 'false'}",
        f"output_dir={out}",
    ]


class Calibration:
    """Blocks of compute-limit steps between dist_train's steps, in the same process and the same seconds,
    on dist_train's own model and optimizer (its DDP wrapper under DDP): the hand-written step over pre-built
    batches. The same model matters: a second copy trained along another path ran up to 1 ms/step apart on
    the CNN here, in either direction, which swamped what the loop itself costs."""

    def __init__(self, trainer: Any) -> None:
        X, y = digits_28x28()
        self.batches = prebuilt_batches(X, y, trainer.dist_env.global_rank, trainer.dist_env.world_size, 2)
        self.model, self.optimizer = trainer.strategy.model, trainer.strategy.optimizer
        self.limit_steps: list[float] = []

    def block(self) -> float:
        start = time.perf_counter()
        for _ in range(CALIBRATE_BLOCK):
            X, y = self.batches[len(self.limit_steps) % len(self.batches)]
            step_start = time.perf_counter()
            hand_step(self.model, self.optimizer, X, y)
            self.limit_steps.append(time.perf_counter() - step_start)
        return time.perf_counter() - start


def run_dist_train(model_name: str, clock: Clock, progress_bar: bool = True, calibrate: bool = False) -> int:
    from dist_train import cli
    from dist_train.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = os.environ["BENCH_OUT"]  # the same directory on every rank
    optimizer_step = Trainer._optimizer_step
    calibration: list[Any] = [None]
    paused: list[float] = []  # per step: calibration time that followed it

    inside: list[float] = []  # per step: time inside Trainer._optimizer_step (the rest is the loop between steps)

    def timed_step(self: Trainer, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        optimizer_step(self, *args, **kwargs)
        clock.step_done()
        inside.append(clock.stamps[-1] - start)
        spent = 0.0
        if calibrate and len(clock.stamps) % CALIBRATE_EVERY == 0:
            if calibration[0] is None:
                calibration[0] = Calibration(self)
            spent = calibration[0].block()
        paused.append(spent)

    Trainer._optimizer_step = timed_step  # type: ignore[method-assign]
    extra = os.environ.get("BENCH_DIST_TRAIN_OVERRIDES", "").split()  # for experiments: e.g. strategy.hang_timeout_seconds=0
    status = cli.main(dist_train_args(model_name, world, out, progress_bar) + extra)
    if status != 0:
        raise SystemExit(f"dist-train exited {status}")
    if calibrate:
        # A step's interval starts after the calibration block that followed the step before it.
        steps = [b - a - block for a, b, block in zip(clock.stamps, clock.stamps[1:], paused)]
        warm = max(10, int(len(steps) * WARMUP_FRACTION))
        ours, limit = steps[warm:], calibration[0].limit_steps[CALIBRATE_BLOCK:]
        clock.extra["calibration"] = {
            "dist_train_ms": {"median": statistics.median(ours) * 1e3, "mean": statistics.fmean(ours) * 1e3},
            # The same steps split: inside the optimizer step (forward, backward, optimizer, bookkeeping) and
            # between steps (the loader's fetch, bar, log lines, stop and checkpoint checks).
            "dist_train_inside_step_ms": {"median": statistics.median(inside[warm + 1:]) * 1e3, "mean": statistics.fmean(inside[warm + 1:]) * 1e3},
            "limit_ms": {"median": statistics.median(limit) * 1e3, "mean": statistics.fmean(limit) * 1e3},
            "dist_train_steps": len(ours),
            "dist_train_step_ms": [round(t * 1e3, 4) for t in steps],  # every step after the first, warm-up included
            "limit_steps": len(limit),
        }
    return BATCH * world


def run_contender(args: argparse.Namespace) -> None:
    clock = Clock(args.result)
    runners: dict[str, Callable[[], int]] = {
        "limit": lambda: run_limit(args.model, clock),
        "tutorial": lambda: run_tutorial(args.model, clock),
        "accelerate": lambda: run_accelerate(args.model, clock),
        "dist_train": lambda: run_dist_train(args.model, clock),
        "no_bar": lambda: run_dist_train(args.model, clock, progress_bar=False),
        "calibrate": lambda: run_dist_train(args.model, clock, progress_bar=True, calibrate=True),
    }
    samples_per_step = runners[args.contender]()
    clock.write(samples_per_step)
    sys.stdout.flush()
    os._exit(0)  # as dist-train's console entry point leaves (no interpreter finalization), for all alike


# ------------------------------------------------------------------ the driver


def on_pty(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run cmd with stdin/stdout/stderr on a pseudo-terminal (tqdm draws as for a user); return (status, output)."""
    master, slave = pty.openpty()
    # A new terminal is 0x0, where tqdm draws nothing: give it a user's 40 x 160.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, start_new_session=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
            if time.monotonic() > deadline:
                proc.kill()
                break
    finally:
        os.close(master)
        status = proc.wait()
    return status, b"".join(chunks).decode(errors="replace")


def run_once(contender: str, model: str, procs: int, work: Path, timeout: float) -> dict:
    result = work / f"{contender}-{model}-{procs}-{time.monotonic_ns()}.json"
    worker = [__file__, "--contender", contender, "--model", model, "--result", str(result)]
    if procs == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *worker]
    threads = "2" if procs == 1 else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "BENCH_OUT": str(work / f"out-{result.stem}"), "BENCH_T0": repr(time.time())}
    status, output = on_pty(cmd, env, timeout)
    if status != 0 or not result.is_file():
        raise RuntimeError(f"{contender} {model} x{procs} exited {status}:\n{output[-3000:]}")
    return json.loads(result.read_text())


def summarise(rounds: list[dict[str, dict]], ours: str = "dist_train") -> dict:
    """Median samples/s per contender and paired per-round ratios of `ours` to each."""
    table: dict[str, Any] = {}
    for name in rounds[0]:
        rates = [r[name]["samples_per_s"] for r in rounds]
        ratios = [r[ours]["samples_per_s"] / r[name]["samples_per_s"] for r in rounds]
        table[name] = {
            "samples_per_s": statistics.median(rates),
            "samples_per_s_range": [min(rates), max(rates)],
            "ms_per_step": statistics.median(r[name]["ms_per_step"] for r in rounds),
            f"{ours}_ratio": statistics.median(ratios),
            f"{ours}_ratio_range": [min(ratios), max(ratios)],
            f"{ours}_slower_rounds": sum(x < 1 for x in ratios),
            f"{ours}_extra_ms_per_step": statistics.median(r[ours]["ms_per_step"] - r[name]["ms_per_step"] for r in rounds),
            "startup_s": statistics.median(r[name]["startup_s"] for r in rounds),
            "peak_rss_mib": statistics.median(r[name]["peak_rss_mib"] for r in rounds),
        }
    return table


def print_table(title: str, table: dict, rounds: int) -> None:
    print(f"\n{title} ({rounds} rounds; ratio = dist_train / contender, paired per round, median [min..max]; slower = rounds dist_train was slower)")
    print(f"{'contender':<11}{'samples/s':>10}{'ms/step':>9}{'ratio':>7}{'  [range]':<15}{'slower':>7}{'extra ms':>9}{'start s':>8}{'RSS MiB':>8}")
    for name, row in table.items():
        low, high = row["dist_train_ratio_range"]
        print(
            f"{name:<11}{row['samples_per_s']:>10.0f}{row['ms_per_step']:>9.2f}{row['dist_train_ratio']:>7.3f}  [{low:.3f}..{high:.3f}]"
            f"{row['dist_train_slower_rounds']:>5}/{rounds}{row['dist_train_extra_ms_per_step']:>9.3f}{row['startup_s']:>8.2f}{row['peak_rss_mib']:>8.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="rounds for 1 process")
    parser.add_argument("--ddp-rounds", type=int, default=6, help="rounds for 2 processes")
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"])
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS))
    parser.add_argument("--calibrations", type=int, default=3, help="in-process calibration runs per model and process count")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", default=str(RESULTS / "overhead.json"))
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        run_contender(args)
        return

    contenders = [c for c in args.contenders if c in CONTENDERS]
    if "dist_train" not in contenders:
        parser.error("--contenders must include dist_train (every ratio is paired against it)")
    report: dict[str, Any] = {"benchmark": "overhead", "batch_per_rank": BATCH, "contenders": contenders, "cases": []}
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        work = Path(tmp)
        for procs in args.procs:
            for model in args.models:
                rounds = []
                n_rounds = args.rounds if procs == 1 else args.ddp_rounds
                for r in range(n_rounds):
                    order = random.Random(r).sample(contenders, len(contenders))
                    rounds.append({name: run_once(name, model, procs, work, args.timeout) for name in order})
                    print(f"  {model} x{procs} round {r + 1}/{n_rounds}: " + "  ".join(f"{n} {rounds[-1][n]['samples_per_s']:.0f}" for n in contenders), flush=True)
                table = summarise([{n: rd[n] for n in contenders} for rd in rounds]) if rounds else {}
                calibrations = [run_once("calibrate", model, procs, work, args.timeout)["calibration"] for _ in range(args.calibrations)]
                title = f"{model.upper()}, {procs} process{'es (DDP, gloo, 1 thread each)' if procs > 1 else ' (2 threads)'}"
                if table:
                    print_table(title, table, n_rounds)
                for c in calibrations:
                    extra = (c["dist_train_ms"]["mean"] - c["limit_ms"]["mean"]) * 1e3
                    print(
                        f"  in-process: dist_train {c['dist_train_ms']['median']:.3f} ms/step median ({c['dist_train_ms']['mean']:.3f} mean; "
                        f"inside the optimizer step {c['dist_train_inside_step_ms']['median']:.3f} / {c['dist_train_inside_step_ms']['mean']:.3f}) vs "
                        f"compute limit {c['limit_ms']['median']:.3f} ({c['limit_ms']['mean']:.3f}): {extra:+.0f} us/step by the means"
                    )
                report["cases"].append({"model": model, "procs": procs, "rounds": rounds, "table": table, "calibration": calibrations})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    report["torch"] = torch.__version__
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
