"""Loader throughput for 28x28 images: streaming shards vs the in-memory map-style loader, and data wait of a CNN.

  python benchmarks/bench_loader.py [--samples 20000] [--micro-batch 64] [--dir /tmp/bench_loader]

1. layout: reading shards with plain webdataset stages, one sample per tar member vs many per record.
2. loader: one epoch (world size 1) of `StreamingTrainLoader` vs `MapStyleTrainLoader` with the same
   DataLoader settings (micro-batch, 0 / 1 / 2 workers); samples/s and the ratio (target >= 0.9).
3. cnn: the tutorial CNN trained from the streaming loader (2 workers); the fraction of step time spent
   waiting for the next batch (target < 5%).

Prints a table and writes benchmarks/results/loader.json.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from dist_train.config import batch_arithmetic, load_config
from dist_train.data.loader import build_map_style
from dist_train.data.shards import write_split
from dist_train.data.sources import Split
from dist_train.data.streaming import build_streaming
from dist_train.env import DistEnv
from dist_train.models import build_model, model_spec

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (1, 28, 28)


def make_split(n: int, name: str) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g), [f"{name}-{i:06d}" for i in range(n)])


# ---------------------------------------------------------------- 1. on-disk layout


def write_per_sample_shard(path: Path, split: Split) -> None:
    """The classic webdataset layout: one tar member group per sample (KEY.npy + KEY.cls)."""
    with tarfile.open(path, "w") as tar:
        for i in range(len(split)):
            for ext, payload in (("npy", _npy(split.inputs[i].numpy())), ("cls", str(int(split.targets[i])).encode())):
                info = tarfile.TarInfo(f"{split.keys[i]}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def bench_layout(root: Path, split: Split) -> list[dict]:
    from webdataset import tariterators

    rows = []
    per_sample = root / "per_sample.tar"
    write_per_sample_shard(per_sample, split)
    layouts = [("1 sample / member (KEY.npy + KEY.cls)", per_sample)]
    for per_record in (16, 256):
        out = root / f"records{per_record}"
        write_split(split, out, "train", "image", 10, len(split), per_record, {})
        layouts.append((f"{per_record} samples / record (.npy arrays)", out / "train-000000.tar"))
    for name, path in layouts:
        start, count = time.perf_counter(), 0
        for record in tariterators.tarfile_samples([{"url": str(path)}]):
            if "npy" in record:
                np.load(io.BytesIO(record["npy"]))
                int(record["cls"])
                count += 1
            else:
                count += len(np.load(io.BytesIO(record["inputs.npy"])))
                np.load(io.BytesIO(record["targets.npy"]))
        seconds = time.perf_counter() - start
        rows.append({"layout": name, "samples_per_second": count / seconds})
    return rows


# ---------------------------------------------------------------- 2. loaders


def _cfg(root: Path, micro: int, workers: int, extra: tuple[str, ...] = ()):
    return load_config(None, [
        "model.name=cnn", "data.source=shards", f"data.path={root}", f"train.global_batch_size={micro}",
        f"train.micro_batch_size={micro}", f"data.num_workers={workers}", *extra,
    ])


def epoch_rate(loader) -> float:
    loader.set_epoch(loader.epoch + 1)
    start, count = time.perf_counter(), 0
    for step in loader:
        count += sum(len(targets) for _, targets in step)
    return count / (time.perf_counter() - start)


def bench_loaders(root: Path, train: Split, test: Split, micro: int, repeats: int) -> list[dict]:
    rows = []
    for workers in (0, 1, 2):
        cfg = _cfg(root, micro, workers)
        arithmetic = batch_arithmetic(cfg.train, 1)
        spec = model_spec(cfg.model)
        streaming = build_streaming(cfg, spec, arithmetic, DistEnv()).train
        in_memory, _ = build_map_style(train, test, spec.input_shape, True, arithmetic, DistEnv(), 0, True, workers)
        rates = {"streaming": [], "in_memory": []}
        for _ in range(repeats):  # interleaved, so load changes on a shared machine hit both alike
            rates["in_memory"].append(epoch_rate(in_memory))
            rates["streaming"].append(epoch_rate(streaming))
        best = {k: max(v) for k, v in rates.items()}
        rows.append({"num_workers": workers, "micro_batch": micro, "in_memory_samples_per_second": best["in_memory"],
                     "streaming_samples_per_second": best["streaming"], "ratio": best["streaming"] / best["in_memory"]})
    return rows


# ---------------------------------------------------------------- 3. CNN data wait


def bench_cnn(root: Path, train: Split, test: Split, micro: int, steps: int) -> dict:
    cfg = _cfg(root, micro, 2)
    arithmetic, spec = batch_arithmetic(cfg.train, 1), model_spec(cfg.model)
    streaming = build_streaming(cfg, spec, arithmetic, DistEnv()).train
    in_memory, _ = build_map_style(train, test, spec.input_shape, True, arithmetic, DistEnv(), 0, True, 2)
    return {"streaming": cnn_data_wait(streaming, cfg, steps), "in_memory": cnn_data_wait(in_memory, cfg, steps)}


def cnn_data_wait(loader, cfg, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    wait = compute = 0.0
    done = 0
    iterator = iter(loader)
    next(iterator)  # worker start-up is paid once per epoch, not per step
    while done < steps:
        t0 = time.perf_counter()
        step = next(iterator, None)
        if step is None:
            loader.set_epoch(loader.epoch + 1)
            iterator = iter(loader)
            continue
        t1 = time.perf_counter()
        for inputs, targets in step:
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        wait, compute, done = wait + t1 - t0, compute + time.perf_counter() - t1, done + 1
    return {"steps": steps, "micro_batch": cfg.train.micro_batch_size, "num_workers": 2, "data_wait_fraction": wait / (wait + compute), "step_ms": 1000 * (wait + compute) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cnn-steps", type=int, default=60)
    parser.add_argument("--dir", default="/tmp/bench_loader")
    args = parser.parse_args()
    torch.set_num_threads(1)

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    train, test = make_split(args.samples, "train"), make_split(1000, "test")
    for name, split in (("train", train), ("test", test)):
        write_split(split, root / "shards" / name, name, "image", 10, 4096, 256, {})

    results = {
        "layout": bench_layout(root, make_split(5000, "layout")),
        "loader": bench_loaders(root / "shards", train, test, args.micro_batch, args.repeats),
        "cnn": bench_cnn(root / "shards", train, test, args.micro_batch, args.cnn_steps),
    }
    print("\n28x28 uint8, reading one shard with webdataset stages (1 process)")
    for row in results["layout"]:
        print(f"  {row['layout']:<42} {row['samples_per_second']:>12,.0f} samples/s")
    print(f"\none epoch of {args.samples} samples, micro-batch {args.micro_batch}, world size 1 (best of {args.repeats})")
    print(f"  {'workers':>7} {'in-memory/s':>12} {'streaming/s':>12} {'ratio':>6}")
    for row in results["loader"]:
        print(f"  {row['num_workers']:>7} {row['in_memory_samples_per_second']:>12,.0f} {row['streaming_samples_per_second']:>12,.0f} {row['ratio']:>6.2f}")
    for name, cnn in results["cnn"].items():
        print(f"\nCNN, {name} loader (2 workers): data wait {100 * cnn['data_wait_fraction']:.1f}% of step time, {cnn['step_ms']:.1f} ms/step", end="")
    print()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loader.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS / 'loader.json'}")


if __name__ == "__main__":
    main()
