"""The data path at cluster scale: one read per record per node, shuffled shards, remote shards, bad samples."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_train.config import ConfigError, batch_arithmetic, load_config
from dist_train.data.loader import build_map_style
from dist_train.data.shards import MANIFEST, DataError, Manifest, write_prepared, write_split
from dist_train.data.sources import SourceData, Split
from dist_train.data.streaming import build_streaming
from dist_train.distributed.environment import DistEnv
from dist_train.models import model_spec

from . import procs

N_TRAIN, N_TEST = 100, 37
BAD_LABEL, NAN_SAMPLE = 57, 71  # sample indices; shard 2 (44..65) holds 57, shard 3 (66..87) holds 71


def image_splits(bad_label: bool = False) -> dict[str, Split]:
    g = torch.Generator().manual_seed(0)
    splits = {}
    for name, n in (("train", N_TRAIN), ("test", N_TEST)):
        images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g)
        if bad_label and name == "train":
            labels[BAD_LABEL] = 12
        splits[name] = Split(images, labels, [f"{name}-{i:04d}" for i in range(n)])
    return splits


def vector_splits() -> dict[str, Split]:
    g = torch.Generator().manual_seed(1)
    splits = {}
    for name, n in (("train", N_TRAIN), ("test", N_TEST)):
        inputs = torch.randn(n, 6, generator=g)
        if name == "train":
            inputs[NAN_SAMPLE, 3] = float("nan")
        splits[name] = Split(inputs, torch.randint(0, 10, (n,), generator=g), [f"{name}-{i:04d}" for i in range(n)])
    return splits


def write_set(root: Path, splits: dict[str, Split], kind: str = "image") -> Path:
    """Shards of 22 samples in records of 8 (100 train samples: 5 shards, 14 records)."""
    for name, split in splits.items():
        write_split(split, root / name, name, kind, 10, 22, 8, {})
    return root


def rewrite_record_inputs(shard: Path, member: str, array: np.ndarray) -> None:
    import io
    import tarfile

    buffer = io.BytesIO()
    np.save(buffer, array)
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            data = buffer.getvalue() if info.name == member else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def bundle(root: Path, world_size: int = 1, rank: int = 0, *overrides: str, device: str = "cpu"):
    cfg = load_config(None, [
        "model.name=mlp", "data.source=shards", f"data.path={root}", "train.seed=3", "train.global_batch_size=20",
        "train.micro_batch_size=5", "data.shuffle_window=16", *overrides,
    ])
    dist_env = DistEnv(global_rank=rank, world_size=world_size, device=device)
    return build_streaming(cfg, model_spec(cfg.model), batch_arithmetic(cfg.train, world_size), dist_env)


def manifest_totals(root: Path) -> tuple[int, int]:
    manifest = Manifest.load(root / "train" / MANIFEST)
    return sum(len(manifest.records_in(s)) for s in manifest.shards), sum(s.bytes for s in manifest.shards)


# ---------------------------------------------------------------- one read per record


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_rank_decodes_and_reads_each_record_once_per_epoch(tmp_path, num_workers):
    root = write_set(tmp_path / "shards", image_splits())
    train = bundle(root, 1, 0, f"data.num_workers={num_workers}").train
    for epoch in (0, 1):
        train.set_epoch(epoch)
        assert sum(1 for _ in train) == N_TRAIN // 20
    records, size = manifest_totals(root)
    assert (train.decoded_records, train.bytes_read) == (2 * records, 2 * size)
    assert not list(train.scratch.glob(f"dist_train-{train.job_token}-*")), "the pass folders must be gone"


def test_a_pass_folder_left_by_a_killed_job_is_removed_by_the_next_pass(tmp_path):
    root = write_set(tmp_path / "shards", image_splits())
    train = bundle(root, 1, 0).train
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = train.scratch / "dist_train-killedjob-node0-e0-s0-p1"
    (stale / "shard-0").mkdir(parents=True)
    (stale / "owners").write_text(dead.stdout)
    being_created = train.scratch / "dist_train-newjob-node0-e0-s0-p1"  # no owners file yet: left alone
    being_created.mkdir()
    try:
        next(iter(train))
        assert not stale.exists() and being_created.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(being_created, ignore_errors=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_batches_are_pinned_for_cuda_only(tmp_path, device):
    root = write_set(tmp_path / "shards", image_splits())
    inputs, targets = next(iter(bundle(root, 1, 0, "data.num_workers=1", device=device).train))[0]
    assert inputs.is_pinned() == targets.is_pinned() == device.startswith("cuda")


@pytest.fixture(scope="module")
def two_rank_reads(tmp_path_factory):
    """One torchrun launch (2 ranks x 2 workers, gloo) over a clean set and sets with a bad label, shape, NaN."""
    root = tmp_path_factory.mktemp("reads")
    write_set(root / "clean", image_splits())
    write_set(root / "label", image_splits(bad_label=True))
    write_set(root / "shape", image_splits())
    rewrite_record_inputs(root / "shape" / "train" / "train-000001.tar", "train-000001-00001.inputs.npy", np.zeros((8, 1, 4, 4), np.uint8))
    write_set(root / "nan", vector_splits(), kind="vector")
    out = root / "out"
    out.mkdir()
    procs.worker("stream_reads.py", [root, out, "clean,label,shape,nan"], nproc=2, timeout=240)
    return root, [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_ranks_two_workers_decode_and_read_each_record_once_per_epoch(two_rank_reads):
    root, ranks = two_rank_reads
    records, size = manifest_totals(root / "clean")
    assert [r["clean"]["steps"] for r in ranks] == [N_TRAIN // 20] * 2
    assert sum(r["clean"]["decoded_records"] for r in ranks) == records  # the old loader decoded 4x as many
    assert sum(r["clean"]["bytes_read"] for r in ranks) == size


@pytest.mark.slow
@pytest.mark.parametrize("name, shard, key, why", [
    ("label", "train-000002.tar", f"train-{BAD_LABEL:04d}", "label 12 is outside [0, 10)"),
    ("shape", "train-000001.tar", "train-00", "record train-000001-00001 fails to decode"),
    ("nan", "train-000003.tar", f"train-{NAN_SAMPLE:04d}", "inputs hold NaN or infinity"),
])
def test_bad_sample_on_one_rank_stops_every_rank_with_the_same_error(two_rank_reads, name, shard, key, why):
    _, ranks = two_rank_reads
    errors = [r[name].get("error") for r in ranks]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert "\n" not in errors[0] and shard in errors[0] and f"(sample {key}" in errors[0] and why in errors[0]
    assert ranks[0][name]["steps"] == ranks[1][name]["steps"] < N_TRAIN // 20
    assert max(r[name]["error_seconds"] for r in ranks) < 10


@pytest.mark.slow
@pytest.mark.parametrize("name, bad", [("label", 1), ("shape", 8), ("nan", 1)])
def test_skipped_bad_samples_keep_steps_equal_and_are_counted(two_rank_reads, name, bad):
    _, ranks = two_rank_reads
    runs = [r[f"{name}-skipped"] for r in ranks]
    assert [run["steps"] for run in runs] == [N_TRAIN // 20] * 2 and not any("error" in run for run in runs)
    assert [run["skipped"] for run in runs] == [bad, bad]  # all-reduced: every rank knows the job's count
    assert sum(run["samples"] for run in runs) == N_TRAIN - bad
    assert runs[0]["kept"] == runs[1]["kept"] and sum(runs[0]["kept"]) == N_TRAIN - bad  # the loss denominator, agreed


# ---------------------------------------------------------------- shuffling


def test_prepare_shuffles_a_class_sorted_source_so_streamed_batches_mix_classes(tmp_path, capsys):
    n_per_class, shape = 300, (1, 8, 8)
    labels = torch.arange(10).repeat_interleave(n_per_class)  # sorted by class, as an image folder is
    images = torch.randint(0, 256, (len(labels), *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sorted_split = Split(images, labels, [f"s{i:05d}" for i in range(len(labels))])
    source = SourceData(sorted_split, Split(images[:64], labels[:64], [f"t{i}" for i in range(64)]), "image", 10)

    def classes_per_batch(train) -> float:
        counts = [len(set(targets.tolist())) for step in train for _, targets in step]
        return sum(counts) / len(counts)

    overrides = ["train.global_batch_size=64", "train.micro_batch_size=64"]
    for shuffle_seed, low, high in ((None, 0, 8.0), (0, 9.0, 10)):  # unshuffled: about 6.8 classes
        out = tmp_path / f"seed-{shuffle_seed}"
        write_prepared(source, out, 256, 64, {"shuffle_seed": shuffle_seed})
        assert json.loads((out / "train" / MANIFEST).read_text())["options"]["shuffle_seed"] == shuffle_seed
        cfg = load_config(None, ["model.name=mlp", "data.source=shards", f"data.path={out}", *overrides])
        train = build_streaming(cfg, model_spec(cfg.model), batch_arithmetic(cfg.train, 1), DistEnv()).train
        assert low <= classes_per_batch(train) <= high, shuffle_seed  # default data.shuffle_window=1024
    memory, _ = build_map_style(sorted_split, sorted_split, (1, 28, 28), True, batch_arithmetic(cfg.train, 1), DistEnv(), 0, True, 0)
    assert classes_per_batch(memory) > 9.5


def test_old_shuffle_key_names_its_replacement():
    with pytest.raises(ConfigError, match=r"'data.shuffle_buffer' was renamed: use data.shuffle_window"):
        load_config(None, ["data.shuffle_buffer=16"])


# ---------------------------------------------------------------- remote shards


@pytest.fixture(scope="module")
def http_shards(tmp_path_factory):
    """`python -m http.server` on 127.0.0.1 serving a shard folder (one bad label), its request log kept."""
    served = write_set(tmp_path_factory.mktemp("served"), image_splits(bad_label=True))
    log = served.parent / f"{served.name}.http.log"
    with procs.http_server(served, log, f"train/{MANIFEST}") as base:
        yield served, f"{base}/{{split}}/{{split}}-{{000000..000004}}.tar", log


def gets(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in re.findall(r'"GET /(\S+\.tar) HTTP', log.read_text()):
        counts[path] = counts.get(path, 0) + 1
    return counts


@pytest.mark.slow
def test_remote_shards_are_downloaded_once_per_node_and_skipped_samples_reach_the_summary(tmp_path, http_shards):
    served, urls, log = http_shards
    before = gets(log)
    out = tmp_path / "run"
    procs.dist_train(
        ["train", "configs/mlp_digits.yaml", "data.source=shards", f"data.path={served}", f"data.shard_urls={urls}",
         f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=2", "data.skip_bad_samples=true", "train.epochs=2",
         "train.global_batch_size=20", "train.micro_batch_size=5", "train.progress_bar=false", f"output_dir={out}",
         "checkpoint.save_at_end=false", "train.log_interval=5"],
        nproc=2, timeout=240,
    )
    fetched = {path: n - before.get(path, 0) for path, n in gets(log).items() if n > before.get(path, 0)}
    shards = [f"{split}/{s.name}" for split in ("train", "test") for s in Manifest.load(served / split / MANIFEST).shards]
    assert fetched == {path: 1 for path in shards}  # 2 epochs x 2 ranks x 2 workers, plus eval: one GET each
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["optimizer_steps"], summary["skipped_samples"]) == (2 * N_TRAIN // 20, 2)  # the bad label, once per epoch


def test_remote_shard_whose_bytes_differ_from_the_manifest_is_refused_by_name(tmp_path, http_shards):
    served, urls, log = http_shards
    local = write_set(tmp_path / "local", image_splits(bad_label=True))  # manifests and checksums of the true shards
    shard = served / "train" / "train-000002.tar"
    original = shard.read_bytes()
    damaged = bytearray(original)
    damaged[1000] ^= 0xFF
    try:
        shard.write_bytes(bytes(damaged))
        for cache in ([f"data.cache_dir={tmp_path / 'cache'}"], []):
            before = gets(log).get("train/train-000002.tar", 0)
            train = bundle(local, 1, 0, f"data.shard_urls={urls}", "data.shuffle=false", "data.skip_bad_samples=true", *cache).train
            with pytest.raises(DataError, match=r"shard train-000002\.tar \(http://.*\): its bytes have sha256 .* the manifest says .*(downloaded|read) twice"):
                list(train)
            assert gets(log)["train/train-000002.tar"] - before == 2  # retried once
        assert not list((tmp_path / "cache").glob("*train-000002.tar")), "a bad download must not stay in the cache"
    finally:
        shard.write_bytes(original)


def test_cache_evicts_least_recently_used_shards_beyond_its_size(tmp_path, http_shards):
    served, urls, _ = http_shards
    sizes = [s.bytes for s in Manifest.load(served / "train" / MANIFEST).shards]
    cache = tmp_path / "cache"
    train = bundle(served, 1, 0, f"data.shard_urls={urls}", f"data.cache_dir={cache}", f"data.cache_max_bytes={2 * max(sizes)}", "data.skip_bad_samples=true").train
    assert sum(1 for _ in train) == N_TRAIN // 20
    kept = [p for p in cache.iterdir() if p.suffix == ".tar"]
    assert 1 <= len(kept) <= 2 and sum(p.stat().st_size for p in kept) <= 2 * max(sizes)
