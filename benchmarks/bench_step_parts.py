"""What each piece of dist_train's per-step work costs, in microseconds, on the real objects of a run.

Builds the trainer of a 1-process CNN (or MLP) run (the overhead benchmark's configuration) and times every piece
that the loop runs per optimizer step besides the model's forward, the loss, backward and the optimizer's
own step (which the bare loop runs too), each in a tight loop, best median of several repeats, minus the
cost of an empty loop. A log step's extra work is timed separately: it runs once per train.log_interval.

  python benchmarks/bench_step_parts.py [--model cnn|mlp] [--repeat 7] [--number 2000]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def timed(fn: Callable[[], Any], number: int, repeat: int) -> float:
    """Median over `repeat` runs of `number` calls, in microseconds per call."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(runs)


def build_trainer(out: str, model: str = "cnn") -> Any:
    from dist_train.config import load_config
    from dist_train.distributed.environment import DistEnv
    from dist_train.distributed.groups import ProcessGroups
    from dist_train.trainer import Trainer

    cfg = load_config(REPO / "configs" / f"{model}_digits.yaml", [
        "data.source=digits", "optim.name=adam", "optim.lr=0.001", "optim.schedule=constant",
        "train.global_batch_size=64", "train.micro_batch_size=64", f"output_dir={out}",
    ])
    return Trainer.build(cfg, ProcessGroups.start(DistEnv()))


def parts(trainer: Any) -> dict[str, Callable[[], Any]]:
    """name -> one call of that piece, with the objects a real step uses."""
    from tqdm import tqdm

    from dist_train.batches import model_input, to_device

    strategy = trainer.strategy
    loader = trainer.data.train
    batch = next(iter(loader))[0]
    loss = torch.tensor(1.0)
    window = trainer._new_window()
    bar = tqdm(total=10**9, file=io.StringIO(), dynamic_ncols=True, leave=False, unit="step")  # as drawn on a terminal
    step_batches = [batch]

    def fetch() -> Any:
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:  # the next epoch, as the trainer starts it
            loader.set_epoch(loader.epoch + 1)
            iterator = iter(loader)
            return next(iterator)

    iterator = iter(loader)

    def add_step() -> None:
        if window.steps >= 500:
            window.steps = 0
        window.add_step(loss, 1, None, False)

    weight = torch.ones(4, requires_grad=True)

    def backward_overhead() -> None:
        strategy.backward((weight * 2.0).sum(), True)

    def bare_backward() -> None:
        (weight * 2.0).sum().backward()

    def contexts() -> None:
        with strategy.accumulation_context(True):
            with strategy.autocast():
                pass

    return {
        "loader: next step's batches": fetch,
        "time.perf_counter() x5": lambda: (time.perf_counter(), time.perf_counter(), time.perf_counter(), time.perf_counter(), time.perf_counter()),
        "watchdog.mark x3": lambda: (trainer.watchdog.mark(1, "data"), trainer.watchdog.mark(1, "forward/backward"), trainer.watchdog.mark(1, "optimizer")),
        "sample weight": trainer._sample_weight,
        "to_device + model_input": lambda: model_input(to_device(batch, strategy.device)),
        "micro-batch RNG seed": lambda: trainer._seed_micro_batch(0),
        "no-sync + autocast contexts": contexts,
        "strategy.backward over loss.backward": backward_overhead,
        "loss.detach": loss.detach,
        "scheduler.step": strategy.scheduler.step,
        "window.add_step": add_step,
        "bar.update(1)": lambda: bar.update(1),
        "stop agreement": lambda: trainer.stop_agreement.step(False),
        "checkpointer.due + poll": lambda: (trainer.checkpointer.due(5), trainer.checkpointer.poll()),
        "step_batches enumerate": lambda: [b for _, b in enumerate(step_batches)],
        "(a bare backward, subtracted above)": bare_backward,
    }


def log_step_parts(trainer: Any) -> dict[str, Callable[[], Any]]:
    """What a log step adds (once per train.log_interval steps): the gradient norm, the log itself."""
    from tqdm import tqdm

    from dist_train.batches import model_input
    from dist_train.strategies.ddp import total_grad_norm

    strategy = trainer.strategy
    inputs, targets = next(iter(trainer.data.train))[0]
    trainer.loss(strategy.model(model_input((inputs, targets))), (inputs, targets)).backward()  # gradients to take the norm of
    params = [p for p in strategy.unwrapped_model.parameters() if p.requires_grad]
    trainer.console.stream = io.StringIO()  # the log line's text, formatted and written as on a terminal
    bar = tqdm(total=10**9, file=io.StringIO(), dynamic_ncols=True, leave=False, unit="step")
    trainer.console._bar = bar
    window = trainer._new_window()
    for _ in range(trainer.cfg.train.log_interval):
        window.add_step(torch.tensor(2.3), 1, None, False)
    window.grad_norm = total_grad_norm(params)
    return {
        "gradient norm": lambda: total_grad_norm(params),
        "log: gather, line, bar, tracker": lambda: trainer._log(window, bar),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--out", default=str(RESULTS / "step_parts.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from dist_train.supervise.signals import StopAgreement

    with tempfile.TemporaryDirectory(prefix="bench_step_parts_") as out:
        trainer = build_trainer(out, args.model)
        trainer.stop_agreement = StopAgreement(trainer.groups.control)
        empty = timed(lambda: None, args.number, args.repeat)
        rows = {name: timed(fn, args.number, args.repeat) - empty for name, fn in parts(trainer).items()}
        bare = rows.pop("(a bare backward, subtracted above)")
        rows["strategy.backward over loss.backward"] -= bare
        rows = {name: max(us, 0.0) for name, us in rows.items()}
        log_rows = {name: max(timed(fn, args.number // 10, args.repeat) - empty, 0.0) for name, fn in log_step_parts(trainer).items()}
        interval = trainer.cfg.train.log_interval
        trainer.close()
    total = sum(rows.values())
    log_total = sum(log_rows.values())
    print(f"{f'per-step piece ({args.model.upper()}, 1 process, CPU)':<42}{'us':>8}")
    for name, us in rows.items():
        print(f"{name:<42}{us:>8.2f}")
    print(f"{'total, every step':<42}{total:>8.2f}")
    for name, us in log_rows.items():
        print(f"{name:<42}{us:>8.2f}")
    print(f"{'total, log step':<42}{log_total:>8.2f}")
    print(f"{f'per step at train.log_interval={interval}':<42}{total + log_total / interval:>8.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "step_parts", "torch": torch.__version__, "us_every_step": rows, "us_log_step": log_rows, "log_interval": interval, "us_per_step": total + log_total / interval, "model": args.model}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
