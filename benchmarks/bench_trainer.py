"""Training throughput: dist_train's loop against the hand-written tutorial loop, same run, same data.

Both train the same model (same init) on the embedded digits held in memory, fp32, batch 64, one
process. The tutorial loop gets the images already resized (its best case); dist_train goes through its
normal data path (exact global-batch plan, per-batch resize). Target: dist_train >= 0.97x.

  python benchmarks/bench_trainer.py [--epochs 10] [--repeats 3] [--models mlp cnn lenet]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dist_train.config import load_config
from dist_train.data import load_source
from dist_train.data.transforms import adapt_images
from dist_train.env import DistEnv
from dist_train.models import build_model, model_spec
from dist_train.trainer import Trainer, seed_everything

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"mlp": "mlp_digits.yaml", "cnn": "cnn_digits.yaml", "lenet": "lenet_digits.yaml"}
BATCH = 64


def overrides(epochs: int, out: Path) -> list[str]:
    return [
        "data.source=digits",  # in memory, like the tutorial loop (the streaming loader has its own benchmark)
        f"train.epochs={epochs}",
        f"train.global_batch_size={BATCH}",
        f"train.micro_batch_size={BATCH}",
        "train.eval_interval=1000000",  # evaluate once, after the timed loop
        "train.log_interval=50",
        "train.progress_bar=false",
        "checkpoint.save_at_end=false",
        f"output_dir={out}",
    ]


def tutorial_loop(preset: str, epochs: int) -> float:
    """samples/s of the quickstart's train loop on pre-resized in-memory tensors."""
    cfg = load_config(REPO / "configs" / preset, ["data.source=digits"])
    spec = model_spec(cfg.model)
    source = load_source(cfg.data, spec)
    X = adapt_images(source.train.inputs, spec.input_shape)
    dataloader = DataLoader(TensorDataset(X, source.train.targets), batch_size=BATCH, shuffle=True, drop_last=True)
    seed_everything(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3) if cfg.optim.name == "adam" else torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    model.train()
    samples = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for X_batch, y_batch in dataloader:
            pred = model(X_batch)
            loss = F.cross_entropy(pred, y_batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            samples += len(y_batch)
    loss.item()
    return samples / (time.perf_counter() - start)


def dist_train_loop(preset: str, epochs: int, out: Path) -> float:
    cfg = load_config(REPO / "configs" / preset, overrides(epochs, out))
    trainer = Trainer.build(cfg, DistEnv())
    trainer.console.enabled = False
    summary = trainer.fit()
    trainer.close()
    return summary["samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(PRESETS))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/trainer_throughput.json"))
    args = parser.parse_args()

    rows = []
    for name in args.models:
        preset = PRESETS[name]
        tutorial, ours = [], []
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
            tutorial.append(tutorial_loop(preset, args.epochs))
            ours.append(dist_train_loop(preset, args.epochs, Path("/tmp/dist_train_bench") / name))
        best_tutorial, best_ours = max(tutorial), max(ours)
        rows.append({"model": name, "tutorial_samples_per_s": best_tutorial, "dist_train_samples_per_s": best_ours, "ratio": best_ours / best_tutorial, "all_tutorial": tutorial, "all_dist_train": ours})

    print(f"{'model':<8}{'tutorial loop':>16}{'dist_train':>14}{'ratio':>8}   (samples/s, best of {args.repeats}, batch {BATCH}, fp32, 1 process, {torch.get_num_threads()} threads)")
    for row in rows:
        print(f"{row['model']:<8}{row['tutorial_samples_per_s']:>16.0f}{row['dist_train_samples_per_s']:>14.0f}{row['ratio']:>8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "trainer_throughput", "torch": torch.__version__, "machine": platform.machine(), "epochs": args.epochs, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
