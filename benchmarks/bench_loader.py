"""Loader throughput for 28x28 images: streaming shards vs the in-memory map-style loader, and data wait of a CNN.

  python benchmarks/bench_loader.py [--samples 20000] [--micro-batch 64] [--dir /tmp/bench_loader]

1. layout: reading shards with plain webdataset stages, one sample per tar member vs many per record.
2. loader: one epoch of `StreamingTrainLoader` vs `MapStyleTrainLoader` with the same DataLoader settings
   (micro-batch, 0 / 1 / 2 workers), at 1 rank and at 2 ranks (torchrun, gloo), in interleaved rounds:
   the job's samples/s and the ratio (target >= 1.0 with workers), records decoded per record of the
   split and bytes read per epoch over all ranks (target 1.0 and the split's size), the workers' peak RSS
   and private memory.
3. cnn: the tutorial CNN trained from the streaming loader (2 workers); the fraction of step time spent
   waiting for the next batch (target < 5%).
4. read volume: what a large job (64 ranks x 8 workers) reads per epoch, old scheme vs new, computed.
5. foreign shards: the same samples written by webdataset's own `wds.ShardWriter` (one sample per key,
   PNG + cls, and npy + cls), indexed by `dist-train data index` and streamed as they are, vs dist_train's
   own shards, in the same interleaved rounds as 2. (goal >= 0.9x): samples/s and the ratio.

Prints a table and writes benchmarks/results/loader.json.

Per node: 2 nodes x 2 ranks x 2 workers on the emulated cluster (tests/cluster.py; needs root), each node its
own host with its own /dev/shm: bytes each node reads per epoch, measured by strace on that node (the read
calls on shard files) and by the loader's counters, against the split's size (goal: 1.00, within 5%), and
what the old scheme would read there (computed as in 4). `--only-nodes` runs it alone (loader_nodes.json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from dist_train.config import batch_arithmetic, load_config
from dist_train.data.loader import build_map_style
from dist_train.data.shards import MANIFEST, Manifest, write_split
from dist_train.data.sources import Split
from dist_train.data.streaming import build_streaming
from dist_train.distributed.groups import ProcessGroups
from dist_train.distributed.environment import DistEnv
from dist_train.models import build_model, model_spec

REPO = Path(__file__).resolve().parent.parent
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


def write_foreign(root: Path, splits: dict[str, Split]) -> None:
    """The same samples as webdataset's docs write them (ShardWriter, one sample per key), then indexed."""
    import webdataset as wds
    from PIL import Image

    from dist_train.data.index import build_index

    encoders = {"foreign_png": lambda x: {"png": Image.fromarray(x[0], "L")}, "foreign_npy": lambda x: {"npy": x[0]}}
    for name, encode in encoders.items():
        (root / name).mkdir()
        for split_name, split in splits.items():
            with wds.ShardWriter(str(root / name / f"{split_name}-%06d.tar"), maxcount=4096, verbose=0) as sink:
                for i in range(len(split)):
                    sink.write({"__key__": split.keys[i], **encode(split.inputs[i].numpy()), "cls": int(split.targets[i])})
        build_index([str(root / name)], root / name / "index", say=lambda line: None)


def plain_webdataset(root: Path) -> dict:
    """samples/s of webdataset itself reading the ShardWriter shards (1 process, decoded as webdataset does)."""
    import webdataset as wds

    rates = {}
    for name, decode in (("foreign_png", "l8"), ("foreign_npy", None)):
        urls = sorted(str(p) for p in (root / name).glob("train-*.tar"))
        dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        dataset = dataset.decode(decode) if decode else dataset.decode()
        start, count = time.perf_counter(), sum(1 for _ in dataset)
        rates[name] = count / (time.perf_counter() - start)
    return rates


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


def _cfg(root: Path, micro: int, workers: int, world_size: int = 1, extra: tuple[str, ...] = ()):
    return load_config(None, [
        "model.name=cnn", "data.source=shards", f"data.path={root}", f"train.global_batch_size={micro * world_size}",
        f"train.micro_batch_size={micro}", f"data.num_workers={workers}", *extra,
    ])


def worker_memory() -> tuple[float, float]:
    """Largest peak RSS and largest private memory (MB) among this process's children (the DataLoader workers)."""
    peak = private = 0.0
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue  # exited meanwhile
            fields = {line.split(":")[0]: line.split()[1] for line in (status + rollup).splitlines() if line.split()[1:]}
            peak = max(peak, int(fields.get("VmHWM", 0)) / 1024)
            private = max(private, (int(fields.get("Private_Clean", 0)) + int(fields.get("Private_Dirty", 0))) / 1024)
    return peak, private


def epoch_run(loader, barrier=lambda: None) -> dict:
    """One epoch of this rank's loader: samples/s and, sampled as it runs, the workers' memory."""
    loader.set_epoch(loader.epoch + 1)
    counters = (getattr(loader, "decoded_records", 0), getattr(loader, "bytes_read", 0))
    barrier()
    start, count, steps = time.perf_counter(), 0, 0
    peak = private = 0.0
    for step in loader:
        count += sum(len(targets) for _, targets in step)
        steps += 1
        if steps % 25 == 1 or steps == loader.steps_per_epoch:
            peak, private = (max(a, b) for a, b in zip((peak, private), worker_memory()))
    seconds = time.perf_counter() - start
    barrier()
    return {
        "samples": count, "seconds": seconds, "worker_peak_rss_mb": peak, "worker_private_mb": private,
        "decoded_records": getattr(loader, "decoded_records", 0) - counters[0], "bytes_read": getattr(loader, "bytes_read", 0) - counters[1],
    }


FOREIGN = ("foreign_png", "foreign_npy")  # ShardWriter shards of the same samples, indexed: root/<name>/index


def rank_loaders(root: Path, train: Split, test: Split, micro: int, workers: int, dist_env: DistEnv):
    cfg = _cfg(root, micro, workers, dist_env.world_size)
    arithmetic = batch_arithmetic(cfg.train, dist_env.world_size)
    spec = model_spec(cfg.model)
    streaming = build_streaming(cfg, spec, arithmetic, dist_env).train
    in_memory, _ = build_map_style(train, test, spec.input_shape, True, arithmetic, dist_env, 0, True, workers)
    foreign = {name: build_streaming(_cfg(root.parent / name / "index", micro, workers, dist_env.world_size), spec, arithmetic, dist_env).train for name in FOREIGN}
    return {"in_memory": in_memory, "streaming": streaming, **foreign}


def rank_rounds(root: Path, train: Split, test: Split, micro: int, repeats: int, dist_env: DistEnv, barrier=lambda: None) -> list[dict]:
    """Per worker count, `repeats` interleaved rounds (in-memory, then streaming) on this rank."""
    rows = []
    for workers in (0, 1, 2):
        loaders = rank_loaders(root, train, test, micro, workers, dist_env)
        rounds = [{name: epoch_run(loader, barrier) for name, loader in loaders.items()} for _ in range(repeats)]
        rows.append({"num_workers": workers, "rounds": rounds})
    return rows


def summarize(ranks: list[list[dict]], manifest: Manifest) -> list[dict]:
    """Job-wide figures per worker count from every rank's rounds: samples/s of the slowest rank, reads summed."""
    records = sum(len(manifest.records_in(s)) for s in manifest.shards)
    size = sum(s.bytes for s in manifest.shards)
    rows = []
    for w, per_worker in enumerate(zip(*ranks)):
        rate: dict[str, list[float]] = {name: [] for name in ("in_memory", "streaming", *FOREIGN)}
        for rounds in zip(*(r["rounds"] for r in per_worker)):
            for name in rate:
                rate[name].append(sum(r[name]["samples"] for r in rounds) / max(r[name]["seconds"] for r in rounds))
        ratios = [s / m for s, m in zip(rate["streaming"], rate["in_memory"])]
        last = [r["rounds"][-1]["streaming"] for r in per_worker]
        foreign = {}
        for name in FOREIGN:  # each round's foreign epoch against the same round's epoch of dist_train's own shards
            against_own = [f / s for f, s in zip(rate[name], rate["streaming"])]
            foreign.update({
                f"{name}_samples_per_second": max(rate[name]), f"{name}_ratio_median": statistics.median(against_own),
                f"{name}_ratio_min": min(against_own), f"{name}_ratio_max": max(against_own),
                f"{name}_bytes_read_per_epoch": sum(r["rounds"][-1][name]["bytes_read"] for r in per_worker),
            })
        rows.append({**foreign,
            "ranks": len(ranks), "num_workers": per_worker[0]["num_workers"],
            "in_memory_samples_per_second": max(rate["in_memory"]), "streaming_samples_per_second": max(rate["streaming"]),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "decodes_per_record": sum(r["decoded_records"] for r in last) / records,
            "bytes_read_per_epoch": sum(r["bytes_read"] for r in last), "dataset_bytes": size,
            "streaming_worker_peak_rss_mb": max(r["worker_peak_rss_mb"] for r in last),
            "streaming_worker_private_mb": max(r["worker_private_mb"] for r in last),
            "in_memory_worker_peak_rss_mb": max(r["rounds"][-1]["in_memory"]["worker_peak_rss_mb"] for r in per_worker),
        })
    return rows


def two_rank_rounds(args, root: Path) -> list[list[dict]]:
    """The same rounds under torchrun with 2 processes (gloo), each rank's rows gathered from its JSON."""
    out = root / "ranks"
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), __file__,
           "--rank-job", str(out), "--samples", str(args.samples), "--micro-batch", str(args.micro_batch), "--repeats", str(args.repeats), "--dir", str(root)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def rank_job(args) -> None:
    import torch.distributed as dist

    from dist_train.distributed.environment import detect_environment

    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env)
    root = Path(args.dir)
    train, test = make_split(args.samples, "train"), make_split(1000, "test")
    rows = rank_rounds(root / "shards", train, test, args.micro_batch, args.repeats, dist_env, barrier=dist.barrier)
    Path(args.rank_job, f"rank-{dist_env.global_rank}.json").write_text(json.dumps(rows))
    groups.teardown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- 4. read volume of a large job, computed


def read_volume(world_size: int, workers: int, ranks_per_node: int, samples: int, sample_bytes: int, micro: int, window: int, per_record: int) -> dict:
    """Bytes read per epoch by the old scheme (every worker reads each window it draws from) and the new one (once per node).

    The old count is exact for its reading pattern: a worker decodes every record overlapping a window it
    draws samples from, each once (windows are read in order); the sum runs over every rank and worker.
    """
    global_batch = micro * world_size
    steps = samples // global_batch
    records_touched = 0
    for rank in range(world_size):
        per_worker: list[set] = [set() for _ in range(workers)]
        for step in range(steps):
            start = step * global_batch + rank * micro
            for j in range(start // window, (start + micro - 1) // window + 1):
                per_worker[step % workers].add(j)
        for windows in per_worker:
            records = set()
            for j in windows:
                lo, hi = j * window, min((j + 1) * window, samples) - 1
                records.update(range(lo // per_record, hi // per_record + 1))  # shards hold whole records
            records_touched += len(records)
    total_records = -(-samples // per_record)
    nodes = -(-world_size // ranks_per_node)
    dataset = samples * sample_bytes
    return {
        "world_size": world_size, "workers": workers, "micro": micro, "nodes": nodes, "samples": samples, "dataset_gb": dataset / 1e9,
        "old_reads_per_record": records_touched / total_records, "old_gb_per_epoch": records_touched / total_records * dataset / 1e9,
        "new_reads_per_record": nodes, "new_gb_per_epoch": nodes * dataset / 1e9,
    }


# ---------------------------------------------------------------- per node, on the emulated cluster

NODES, RANKS_PER_NODE, WORKERS_PER_RANK = 2, 2, 2


def node_epochs_job(args) -> None:
    """One rank of the 2 x 2 x 2 job: `repeats` epochs of the streaming loader; what this rank's workers read per epoch."""
    import socket

    import torch.distributed as dist

    from dist_train.distributed.environment import detect_environment

    dist_env = detect_environment()
    groups = ProcessGroups.start(dist_env)
    cfg = _cfg(Path(args.dir) / "shards", args.micro_batch, WORKERS_PER_RANK, dist_env.world_size)
    train = build_streaming(cfg, model_spec(cfg.model), batch_arithmetic(cfg.train, dist_env.world_size), dist_env, groups.control).train
    rows = []
    for epoch in range(args.repeats):
        train.set_epoch(epoch)
        before, start = (train.bytes_read, train.decoded_records), time.perf_counter()
        steps = sum(1 for _ in train)
        dist.barrier()
        rows.append({"epoch": epoch, "steps": steps, "seconds": time.perf_counter() - start,
                     "bytes_read": train.bytes_read - before[0], "decoded_records": train.decoded_records - before[1]})
    record = {"rank": dist_env.global_rank, "node_rank": dist_env.node_rank, "host": socket.gethostname(), "epochs": rows}
    Path(args.node_epochs, f"rank-{dist_env.global_rank}.json").write_text(json.dumps(record))
    groups.teardown()


def strace_shard_bytes(prefix: Path) -> int:
    """Bytes read from train shard files in one node's strace -ff output (PREFIX.<tid> files)."""
    import re

    total = 0
    for part in prefix.parent.glob(f"{prefix.name}.*"):
        for line in part.read_text(errors="replace").splitlines():
            call = re.search(r"\b(?:p?readv?|pread64)\(\d+<[^>]*/train-\d+\.tar>.*\)\s+=\s+(\d+)$", line)
            if call:
                total += int(call.group(1))
    return total


def bench_nodes(args, root: Path, manifest: Manifest) -> dict:
    """The job on 2 emulated nodes; per node: strace's bytes over all epochs, the loader's per epoch."""
    sys.path.insert(0, str(REPO))
    from tests.cluster import Cluster, unavailable

    reason = unavailable()
    if reason:
        return {"skipped": reason}
    out = root / "node_epochs"
    out.mkdir(exist_ok=True)
    with Cluster(NODES, shared=[root]) as cluster:
        head = cluster.nodes[0]
        job = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc_per_node", str(RANKS_PER_NODE),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{head.hostname}:29400", "--rdzv_id", "bench", __file__,
            "--node-epochs", str(out), "--samples", str(args.samples), "--micro-batch", str(args.micro_batch), "--repeats", str(args.repeats), "--dir", str(root),
        ]  # fmt: skip
        traces = {node.name: root / f"strace-{node.name}" / "t" for node in cluster.nodes}
        for trace in traces.values():
            trace.parent.mkdir(exist_ok=True)
        strace = ["strace", "-ff", "-qq", "--seccomp-bpf", "-y", "-e", "trace=read,pread64,readv,preadv", "-o"]
        cluster.run_together([(node, [*strace, traces[node.name], *job]) for node in cluster.nodes], env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, timeout=1200)
        ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    size = sum(s.bytes for s in manifest.shards)
    window = load_config(None, []).data.shuffle_window
    old = read_volume(NODES * RANKS_PER_NODE, WORKERS_PER_RANK, RANKS_PER_NODE, args.samples, int(np.prod(SHAPE)), args.micro_batch, window, manifest.samples_per_record)
    nodes = []
    for host in sorted({r["host"] for r in ranks}):
        mine = [r for r in ranks if r["host"] == host]
        per_epoch = [sum(r["epochs"][e]["bytes_read"] for r in mine) for e in range(args.repeats)]
        nodes.append({
            "host": host, "ranks": sorted(r["rank"] for r in mine), "dataset_bytes": size, "epochs": args.repeats,
            "strace_bytes_per_epoch": strace_shard_bytes(traces[host]) / args.repeats,
            "loader_bytes_per_epoch": per_epoch,
            "decoded_records_per_epoch": [sum(r["epochs"][e]["decoded_records"] for r in mine) for e in range(args.repeats)],
            "epoch_seconds": [max(r["epochs"][e]["seconds"] for r in mine) for e in range(args.repeats)],
            "old_scheme_bytes_per_epoch": old["old_reads_per_record"] / NODES * size,
        })
    return {"nodes": nodes, "records": sum(len(manifest.records_in(s)) for s in manifest.shards), "samples": args.samples, "epochs": args.repeats}


def print_nodes(result: dict) -> None:
    print(f"\nper node, {NODES} emulated nodes x {RANKS_PER_NODE} ranks x {WORKERS_PER_RANK} workers (tests/cluster.py): bytes read per epoch of {result.get('samples')} samples, over {result.get('epochs')} epochs")
    if "skipped" in result:
        print(f"  skipped: {result['skipped']}")
        return
    print(f"  {'node':>6} {'ranks':>6} {'split MB':>9} {'strace MB/epoch':>16} {'ratio':>6} {'loader MB/epoch [min, max]':>27} {'records/epoch':>13} {'old scheme MB':>13} {'s/epoch':>8}")
    for node in result["nodes"]:
        loader = node["loader_bytes_per_epoch"]
        print(
            f"  {node['host']:>6} {','.join(map(str, node['ranks'])):>6} {node['dataset_bytes'] / 1e6:>9.2f} {node['strace_bytes_per_epoch'] / 1e6:>16.2f} "
            f"{node['strace_bytes_per_epoch'] / node['dataset_bytes']:>6.3f} {statistics.median(loader) / 1e6:>13.2f} [{min(loader) / 1e6:.2f}, {max(loader) / 1e6:.2f}] "
            f"{statistics.median(node['decoded_records_per_epoch']):>13.0f} {node['old_scheme_bytes_per_epoch'] / 1e6:>13.2f} {statistics.median(node['epoch_seconds']):>8.2f}"
        )
    print(f"  ({result['records']} records in the split; ratio = strace bytes / split bytes, goal 1.00 within 5%)")


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
    parser.add_argument("--only-nodes", action="store_true", help="run the per-node section (emulated cluster) alone")
    parser.add_argument("--rank-job", help=argparse.SUPPRESS)  # internal: one rank of the 2-rank rounds
    parser.add_argument("--node-epochs", help=argparse.SUPPRESS)  # internal: one rank of the 2-node job
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rank_job:
        return rank_job(args)
    if args.node_epochs:
        return node_epochs_job(args)

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    train, test = make_split(args.samples, "train"), make_split(1000, "test")
    for name, split in (("train", train), ("test", test)):
        write_split(split, root / "shards" / name, name, "image", 10, 4096, 256, {})
    write_foreign(root, {"train": train, "test": test})
    manifest = Manifest.load(root / "shards" / "train" / MANIFEST)
    if args.only_nodes:
        nodes = bench_nodes(args, root, manifest)
        print_nodes(nodes)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "loader_nodes.json").write_text(json.dumps(nodes, indent=2))
        print(f"wrote {RESULTS / 'loader_nodes.json'}")
        return

    one_rank = rank_rounds(root / "shards", train, test, args.micro_batch, args.repeats, DistEnv())
    results = {
        "layout": bench_layout(root, make_split(5000, "layout")),
        "loader": summarize([one_rank], manifest) + summarize(two_rank_rounds(args, root), manifest),
        "cnn": bench_cnn(root / "shards", train, test, args.micro_batch, args.cnn_steps),
        "plain_webdataset": plain_webdataset(root),
        "read_volume": [
            read_volume(w, k, 8, 1_281_167, 224 * 224 * 3, micro, 1024, 256)  # ImageNet-1k as 224x224 uint8, default window
            for w, k, micro in ((1, 1, 32), (2, 2, 32), (4, 4, 32), (8, 8, 32), (64, 8, 32), (64, 8, 8))
        ],
        "nodes": bench_nodes(args, root, manifest),
    }
    print("\n28x28 uint8, reading one shard with webdataset stages (1 process)")
    for row in results["layout"]:
        print(f"  {row['layout']:<42} {row['samples_per_second']:>12,.0f} samples/s")
    print(f"\none epoch of {args.samples} samples, micro-batch {args.micro_batch} per rank; samples/s of the job (best of {args.repeats} interleaved rounds), ratio median [min, max]")
    print(f"  {'ranks':>5} {'workers':>7} {'in-memory/s':>12} {'streaming/s':>12} {'ratio':>18} {'decodes/record':>14} {'MB read/epoch':>14} {'worker RSS MB':>13} {'private MB':>10} {'in-mem RSS MB':>13}")
    for row in results["loader"]:
        ratio = f"{row['ratio_median']:.2f} [{row['ratio_min']:.2f}, {row['ratio_max']:.2f}]"
        print(
            f"  {row['ranks']:>5} {row['num_workers']:>7} {row['in_memory_samples_per_second']:>12,.0f} {row['streaming_samples_per_second']:>12,.0f} {ratio:>18} "
            f"{row['decodes_per_record']:>14.2f} {row['bytes_read_per_epoch'] / 1e6:>8.1f} / {row['dataset_bytes'] / 1e6:.1f} "
            f"{row['streaming_worker_peak_rss_mb']:>8.0f} {row['streaming_worker_private_mb']:>10.0f} {row['in_memory_worker_peak_rss_mb']:>13.0f}"
        )
    print("\nforeign shards: the same samples in wds.ShardWriter shards of 4096 (PNG + cls, npy + cls), indexed, vs dist_train's own shards; ratio median [min, max] over the rounds")
    print(f"  {'ranks':>5} {'workers':>7} {'own/s':>10} {'png/s':>10} {'png ratio':>18} {'npy/s':>10} {'npy ratio':>18} {'MB read/epoch png':>17}")
    for row in results["loader"]:
        cells = [f"{row[f'{n}_samples_per_second']:>10,.0f} {row[f'{n}_ratio_median']:.2f} [{row[f'{n}_ratio_min']:.2f}, {row[f'{n}_ratio_max']:.2f}]".rjust(29) for n in FOREIGN]
        print(f"  {row['ranks']:>5} {row['num_workers']:>7} {row['streaming_samples_per_second']:>10,.0f} {cells[0]} {cells[1]} {row['foreign_png_bytes_read_per_epoch'] / 1e6:>17.1f}")
    plain = results["plain_webdataset"]
    print(f"  for scale, webdataset itself reading them (1 process, .decode()): png {plain['foreign_png']:,.0f}/s, npy {plain['foreign_npy']:,.0f}/s")
    for name, cnn in results["cnn"].items():
        print(f"\nCNN, {name} loader (2 workers): data wait {100 * cnn['data_wait_fraction']:.1f}% of step time, {cnn['step_ms']:.1f} ms/step", end="")
    print("\n\nread volume per epoch, computed: ImageNet-1k (1.28M samples of 224x224x3 uint8), window 1024, 256 samples/record, 8 ranks/node")
    print(f"  {'ranks':>5} {'workers':>7} {'micro':>5} {'nodes':>5} {'old reads/record':>16} {'old GB':>9} {'new reads/record':>16} {'new GB':>8}")
    for row in results["read_volume"]:
        print(f"  {row['world_size']:>5} {row['workers']:>7} {row['micro']:>5} {row['nodes']:>5} {row['old_reads_per_record']:>16.1f} {row['old_gb_per_epoch']:>9,.0f} {row['new_reads_per_record']:>16} {row['new_gb_per_epoch']:>8,.0f}")
    print_nodes(results["nodes"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loader.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS / 'loader.json'}")


if __name__ == "__main__":
    main()
