"""The streaming shard loader: exact epochs over ranks and workers, deterministic order, resume, bad data."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_train.config import ConfigError, batch_arithmetic, load_config
from dist_train.data.shards import DataError, write_split
from dist_train.data.sources import Split
from dist_train.data.streaming import _StreamCursor, build_streaming, open_split
from dist_train.data.transforms import adapt_images
from dist_train.distributed.environment import DistEnv
from dist_train.models import model_spec

from . import procs

N_TRAIN, N_TEST = 100, 37


def make_splits(seed: int = 0) -> dict[str, Split]:
    g = torch.Generator().manual_seed(seed)
    splits = {}
    for name, n in (("train", N_TRAIN), ("test", N_TEST)):
        images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
        splits[name] = Split(images, torch.randint(0, 10, (n,), generator=g), [f"{name}-{i:04d}" for i in range(n)])
    return splits


def make_shards(root: Path, samples_per_shard: int = 22, samples_per_record: int = 8) -> Path:
    """100 train samples in shards of 22, 22, 22, 22, 12 (5 shards: not divisible by 2 ranks x 2 workers)."""
    for name, split in make_splits().items():
        write_split(split, root / name, name, "image", 10, samples_per_shard, samples_per_record, {})
    return root


def loader_bundle(root: Path, rank: int = 0, world_size: int = 1, num_workers: int = 0, *overrides: str):
    cfg = load_config(None, [
        "model.name=mlp", "data.source=shards", f"data.path={root}", "train.seed=3", "train.global_batch_size=20",
        "train.micro_batch_size=5", "data.shuffle_window=16", f"data.num_workers={num_workers}", *overrides,
    ])
    dist_env = DistEnv(global_rank=rank, world_size=world_size)
    return build_streaming(cfg, model_spec(cfg.model), batch_arithmetic(cfg.train, world_size), dist_env)


def epoch_steps(train, epoch: int) -> list[list[str]]:
    """Per optimizer step, the sample keys this rank trains on, in order."""
    train.set_epoch(epoch)
    return [[k for _, _, keys in step for k in keys] for step in train.iter_steps()]


def flat(step_lists) -> list[str]:
    return [k for step in step_lists for micro in step for k in (micro if isinstance(micro, list) else [micro])]


@pytest.mark.slow
def test_two_ranks_two_workers_exact_epochs_resume_and_eval(tmp_path):
    root = make_shards(tmp_path / "shards")
    out = tmp_path / "out"
    out.mkdir()
    procs.worker("stream_epochs.py", [root, out], nproc=2, timeout=240)
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    all_keys = sorted(make_splits()["train"].keys)

    def global_steps(rank_steps):  # step k over all ranks: rank 0's slice, then rank 1's
        assert len(rank_steps[0]) == len(rank_steps[1]), "ranks ran different step counts"
        return [flat(r0) + flat(r1) for r0, r1 in zip(*rank_steps)]

    epochs = [global_steps([ranks[0][f"epoch{e}"], ranks[1][f"epoch{e}"]]) for e in (0, 1)]
    for steps in epochs:
        assert len(steps) == N_TRAIN // 20
        assert sorted(k for step in steps for k in step) == all_keys  # every sample exactly once
    assert epochs[0] != epochs[1]
    assert [r["rerun_epoch0"] for r in ranks] == [r["epoch0"] for r in ranks]

    # The global order is a function of (seed, epoch) only: one process without workers sees the same steps.
    single = loader_bundle(root).train
    assert [epoch_steps(single, e) for e in (0, 1)] == epochs

    # Stopped after 2 steps, resumed with 1 worker instead of 2: exactly the rest of the epoch, in order.
    assert ranks[0]["state"]["samples_consumed"] == 40
    resumed = global_steps([r["resume_before"] + r["resume_after"] for r in ranks])
    assert resumed == epochs[1]
    # ... and on a different world size (1 process) from the same state.
    one = loader_bundle(root).train
    one.load_state_dict(ranks[0]["state"])
    rest = epoch_steps(one, 1)
    assert global_steps([r["resume_before"] for r in ranks]) + rest == epochs[1]

    # Eval: equal batch counts, every sample once (padding weight 0).
    test = make_splits()["test"]
    assert ranks[0]["eval"]["batches"] == ranks[1]["eval"]["batches"]
    assert sum(r["eval"]["weights"] for r in ranks) == N_TEST
    assert sum(r["eval"]["targets"] for r in ranks) == test.targets.sum().item()
    expected_inputs = adapt_images(test.inputs, (1, 28, 28)).double().sum().item()
    assert sum(r["eval"]["inputs"] for r in ranks) == pytest.approx(expected_inputs, rel=1e-6)


def test_fewer_shards_than_ranks_times_workers_and_dropped_remainder(tmp_path):
    root = make_shards(tmp_path / "shards", samples_per_shard=60)  # 2 shards for 2 ranks x 2 workers
    seen = []
    for rank in range(2):
        train = loader_bundle(root, rank, 2, 2).train
        steps = epoch_steps(train, 0)
        assert len(steps) == train.steps_per_epoch == 5
        seen += [k for step in steps for k in step]
    assert sorted(seen) == sorted(make_splits()["train"].keys)

    # Global batch 40 over 100 samples: 2 steps, 20 samples dropped (a different 20 each epoch).
    train = loader_bundle(root, 0, 1, 0, "train.global_batch_size=40", "train.micro_batch_size=10").train
    assert (train.steps_per_epoch, train.dropped_per_epoch) == (2, 20)
    epochs = [[k for step in epoch_steps(train, e) for k in step] for e in (0, 1)]
    assert all(len(keys) == len(set(keys)) == 80 for keys in epochs)
    assert set(epochs[0]) != set(epochs[1])


def test_pipe_and_brace_urls_read_the_same_samples(tmp_path):
    root = make_shards(tmp_path / "shards")
    local = epoch_steps(loader_bundle(root).train, 0)
    pattern = f"pipe:cat {root}/{{split}}/{{split}}-{{000000..000004}}.tar"
    piped = loader_bundle(root, 0, 1, 0, f"data.shard_urls={pattern}")
    assert piped.train.source.urls[0].startswith("pipe:cat ")
    assert epoch_steps(piped.train, 0) == local
    assert sum(w.sum().item() for _, _, w in piped.eval) == N_TEST


def test_resume_seeks_without_decoding_skipped_records(tmp_path):
    root = make_shards(tmp_path / "shards")
    cfg = load_config(None, ["data.source=shards", f"data.path={root}"])
    source = open_split(cfg.data, "train")
    cursor = _StreamCursor(source, range(5), skip_bad=False)
    chunk = cursor.read(62, 66)  # shard 2 (samples 44..65), its record 2 (60..65)
    assert chunk.keys.tolist() == [f"train-{i:04d}" for i in range(62, 66)]
    assert cursor.decoded_records == 1
    chunk = cursor.read(66, 70)  # next shard: opened at its first record
    assert chunk.keys.tolist() == [f"train-{i:04d}" for i in range(66, 70)]
    assert cursor.decoded_records == 2
    cursor.close()


def _rewrite_member(shard: Path, member: str, payload: bytes) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            data = payload if info.name == member else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_shards_name_the_shard_and_bad_samples_can_be_skipped(tmp_path, caplog):
    root = make_shards(tmp_path / "shards")
    shard = root / "train" / "train-000001.tar"
    _rewrite_member(shard, "train-000001-00001.inputs.npy", b"not an npy file")
    with pytest.raises(DataError, match=r"train-000001\.tar record train-000001-00001 .*fails to decode"):
        epoch_steps(loader_bundle(root).train, 0)

    train = loader_bundle(root, 0, 1, 2, "data.skip_bad_samples=true").train
    with caplog.at_level(logging.WARNING, logger="dist_train.data.streaming"):
        seen = [k for step in epoch_steps(train, 0) for k in step]
    bad = {f"train-{i:04d}" for i in range(30, 38)}  # shard 1 starts at 22; its record 1 holds 30..37
    assert sorted(seen) == sorted(set(make_splits()["train"].keys) - bad)
    assert train.skipped_samples == 8 and train.state_dict()["skipped_samples"] == 8
    assert sorted(r.args[1].split()[0] for r in caplog.records if "skipped bad sample" in r.msg) == sorted(bad)


def test_truncated_and_missing_shards_name_the_shard(tmp_path):
    root = make_shards(tmp_path / "shards")
    truncated = root / "train" / "train-000003.tar"
    truncated.write_bytes(truncated.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"train-000003\.tar .*is truncated or corrupt: record train-000003-00000 lacks keys.json"):
        epoch_steps(loader_bundle(root, 0, 1, 2).train, 0)
    (root / "train" / "train-000002.tar").unlink()
    with pytest.raises(DataError, match=r"train-000002\.tar does not exist .*prepare the data again"):
        epoch_steps(loader_bundle(root, 0, 1, 0, "data.shuffle=false").train, 0)


def test_manifest_that_does_not_fit_the_model_fails_before_training(tmp_path):
    root = make_shards(tmp_path / "shards")
    with pytest.raises(ConfigError, match=r"shard manifest .*train/manifest.json has 10 classes .*model.num_classes=10"):
        loader_bundle(root, 0, 1, 0, "model.num_classes=5")
    vectors = Split(torch.zeros(10, 3), torch.zeros(10, 1), [str(i) for i in range(10)])
    for name in ("train", "test"):
        write_split(vectors, tmp_path / "vec" / name, name, "vector", 0, 5, 5, {})
    with pytest.raises(ConfigError, match=r"shard manifest .*vec/train/manifest.json has regression targets"):
        loader_bundle(tmp_path / "vec")
    with pytest.raises(DataError, match=r"nowhere/train/manifest.json does not exist"):
        loader_bundle(tmp_path / "nowhere")


@pytest.mark.slow
def test_ddp_run_over_uneven_shards_finishes(tmp_path):
    """2 ranks x 2 workers over 15 digits shards (14 x 100 + 38 samples) through the real CLI; a hang fails on the timeout."""
    from dist_train.cli import main

    data = tmp_path / "digits"
    assert main(["data", "prepare", "--source", "digits", "--out", str(data), "--samples-per-shard", "100", "--samples-per-record", "32"]) == 0
    out = tmp_path / "run"
    procs.dist_train(
        ["train", "configs/cnn_digits.yaml", "data.source=shards", f"data.path={data}", "data.num_workers=2",
         "train.epochs=1", "train.progress_bar=false", f"output_dir={out}", "checkpoint.save_at_end=false"],
        nproc=2, timeout=240,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_steps"] == 1438 // 64
    assert summary["eval"]["eval/samples"] == 359
    assert summary["eval"]["eval/accuracy"] > 0.3
