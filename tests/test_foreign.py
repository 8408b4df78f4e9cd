"""Webdataset shards that dist_train did not write (wds.ShardWriter / wds.TarWriter output), indexed and
streamed as they are: webdataset's grouping, the fields and the resize rule, bad samples, remote and
compressed shards, exact epochs and resume over 2 ranks x 1 or 2 workers, and a real 2-process training.
Every test that reads a corpus checks at its end that the corpus (tars and folder) is byte-identical."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dist_train.cli import main
from dist_train.config import ConfigError, DataConfig, batch_arithmetic, load_config
from dist_train.data.index import SKIP_META, load_index
from dist_train.data.shards import DataError
from dist_train.data.sources import digits
from dist_train.data.streaming import build_streaming
from dist_train.data.transforms import adapt_images
from dist_train.distributed.environment import DistEnv
from dist_train.models import ModelSpec, model_spec

from . import procs


# ---------------------------------------------------------------- corpora, written the way webdataset's docs do


def digit_splits():
    """scikit-learn's digits (uint8 8x8, the `digits` source's split and keys)."""
    data = digits(DataConfig(), ModelSpec("cnn", (1, 28, 28), "classification", 10))
    return {"train": data.train, "test": data.test}


def write_with_shard_writer(folder: Path, encode, maxcount: int = 300) -> Path:
    """`wds.ShardWriter("train-%06d.tar", maxcount=300)`: one sample per __key__ group, as webdataset's docs write them."""
    folder.mkdir(parents=True)
    for name, split in digit_splits().items():
        with wds.ShardWriter(str(folder / f"{name}-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
            for i, key in enumerate(split.keys):
                sink.write({"__key__": key, **encode(split.inputs[i, 0].numpy(), int(split.targets[i]))})
    return folder


def write_with_tar_writer(folder: Path, encode, suffix: str = ".tar", limit: int = 0) -> Path:
    """One `wds.TarWriter` shard per split (`suffix` .tar.gz: gzip-compressed, as TarWriter does for that name)."""
    folder.mkdir(parents=True)
    for name, split in digit_splits().items():
        with wds.TarWriter(str(folder / f"{name}-000000{suffix}")) as sink:
            for i, key in enumerate(split.keys[: limit or None]):
                sink.write({"__key__": key, **encode(split.inputs[i, 0].numpy(), int(split.targets[i]))})
    return folder


def png_cls(pixels, label):
    return {"png": Image.fromarray(pixels, "L"), "cls": label}


def snapshot(folder: Path) -> dict:
    """Every file and folder under `folder`: sha256, size and mtime (what "byte-identical, untouched" means)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        found[str(path.relative_to(folder))] = (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir", stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Digits as PNG + cls in ShardWriter shards of 300, and their index (`dist-train data index DIR --out INDEX`)."""
    root = tmp_path_factory.mktemp("foreign")
    shards = write_with_shard_writer(root / "digits", png_cls)
    before = snapshot(shards)
    assert main(["data", "index", str(shards), "--out", str(root / "index")]) == 0
    assert snapshot(shards) == before
    return shards, root / "index", before


def loader_bundle(path: Optional[Path], *overrides: str, world_size: int = 1, rank: int = 0):
    cfg = load_config(None, [
        "model.name=cnn", "data.source=shards", *([f"data.path={path}"] if path else []), "train.seed=5",
        "train.global_batch_size=64", "train.micro_batch_size=16", *overrides,
    ])
    return build_streaming(cfg, model_spec(cfg.model), batch_arithmetic(cfg.train, world_size), DistEnv(global_rank=rank, world_size=world_size))


def epoch_samples(train, epoch: int = 0) -> dict:
    """key -> (input tensor, label) of one epoch of a 1-process train loader."""
    train.set_epoch(epoch)
    seen = {}
    for step in train.iter_steps():
        for inputs, targets, keys in step:
            for x, y, key in zip(inputs, targets, keys):
                assert key not in seen, f"{key} twice in one epoch"
                seen[key] = (x, int(y))
    return seen


# ---------------------------------------------------------------- the index


def test_the_index_groups_members_exactly_as_webdataset_does(corpus, tmp_path):
    shards, index, before = corpus
    # ShardWriter's shards: per shard the keys webdataset itself yields, in its order; the classes from cls.
    train = load_index(index / "train" / "manifest.json")
    assert [e.count for e in train.entries] == [300, 300, 300, 300, 238]
    for entry, url, n in zip(train.entries, train.urls, range(5)):
        theirs = [s["__key__"] for s in wds.WebDataset(url, shardshuffle=False)]
        assert np.load(train.members / f"{n:06d}.npz")["keys"].tolist() == theirs
        assert entry.bytes == Path(url).stat().st_size and entry.sha256 == hashlib.sha256(Path(url).read_bytes()).hexdigest()
    assert (train.raw["target"]["classes"], train.raw["input"]["holds"], train.raw["fields_seen"]) == (10, {"L 8x8": 1438}, {"cls": 1438, "png": 1438})

    # A hand-made tar with what the grouping rule decides: a key that comes back later (a new sample),
    # multi-dot and upper-case extensions, __meta__ files, a folder entry, a file without extension.
    tar_path = tmp_path / "odd" / "train-000000.tar"
    tar_path.parent.mkdir()
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(png, "png")
    members = [("a.png", png.getvalue()), ("a.cls", b"1"), ("b.png", png.getvalue()), ("b.cls", b"2"), ("__index__/b.json", b"{}"),
               ("__meta__.json", b"{}"), ("a.png", png.getvalue()), ("a.cls", b"3"), ("dir/c.seg.PNG", png.getvalue()),
               ("dir/c.png", png.getvalue()), ("dir/c.cls", b"4"), ("README", b"x"), ("d.png", png.getvalue()), ("d.cls", b"0")]
    with tarfile.open(tar_path, "w") as tar:
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    import inspect

    from webdataset.tariterators import tar_file_iterator, tarfile_samples

    assert inspect.signature(tar_file_iterator).parameters["skip_meta"].default == SKIP_META
    theirs = list(tarfile_samples([{"url": str(tar_path)}]))
    assert [s["__key__"] for s in theirs] == ["a", "b", "__meta__", "a", "dir/c", "d"]  # __meta__.json is a sample to webdataset
    assert "seg.png" in theirs[4]
    from dist_train.data.index import SplitScan, scan_shard

    scan = SplitScan("train")
    scan_shard(str(tar_path), scan, {})
    assert scan.tables[0]["keys"].tolist() == [s["__key__"] for s in theirs]
    assert scan.tables[0]["label"].tolist() == [1, 2, 0, 3, 4, 0] and scan.tables[0]["status"].tolist() == [0, 0, 1, 0, 0, 0]
    assert (scan.input_missing, scan.label_missing) == (1, 1)  # the __meta__ sample: bad at training, counted here
    assert snapshot(shards) == before


@pytest.mark.parametrize("kind", ["tar_writer_jpg_cls_varied_sizes", "npy_json_label_tar_gz"])
def test_other_writers_fields_and_compressed_shards_stream_every_sample(tmp_path, kind, capsys):
    sizes = {}

    def jpg_cls(pixels, label):  # RGB JPEGs of two sizes: resized to the model's input when decoded
        size = 8 if len(sizes) % 2 else 10
        sizes[len(sizes)] = size
        return {"jpg": Image.fromarray(np.repeat(pixels[:, :, None], 3, 2), "RGB").resize((size, size)), "cls": label}

    def npy_json(pixels, label):
        return {"npy": pixels, "json": {"label": label, "caption": "a digit"}}

    if kind.startswith("tar_writer_jpg"):
        folder = write_with_tar_writer(tmp_path / "jpg", jpg_cls, limit=300)
    else:
        folder = write_with_tar_writer(tmp_path / "npy", npy_json, suffix=".tar.gz", limit=300)
        assert (folder / "train-000000.tar.gz").read_bytes()[:2] == b"\x1f\x8b"
    before = snapshot(folder)
    assert main(["data", "index", str(folder), "--out", str(tmp_path / "index")]) == 0
    assert "train with data.source=shards data.path=" in capsys.readouterr().out
    bundle = loader_bundle(tmp_path / "index", "train.global_batch_size=32")
    seen = epoch_samples(bundle.train)
    split = digit_splits()["train"]
    assert len(seen) == 288 and set(seen) <= set(split.keys[:300])  # 300 // 32 steps of 32: 12 dropped
    labels = dict(zip(split.keys, split.targets.tolist()))
    assert all(label == labels[key] for key, (_, label) in seen.items())
    if kind.startswith("tar_writer_jpg"):
        assert re.search(r"input jpg \(2 kinds, e.g. RGB (10x10, RGB 8x8|8x8, RGB 10x10)\) -> 1x28x28: converted to L and resized \(PIL bilinear\) as decoded, scaled to \[0,1\]", bundle.notes[0])
        assert all(x.shape == (1, 28, 28) for x, _ in seen.values())
    else:  # npy is lossless: exactly what dist_train's own shards of these pixels feed the model
        assert "input npy uint8 [8, 8] -> 1x28x28: bilinear resize per batch, scaled to [0,1]; target json: 10 classes (0..9)" in bundle.notes[0]
        rows = {key: i for i, key in enumerate(split.keys)}
        for key, (x, _) in seen.items():
            assert torch.equal(x, adapt_images(split.inputs[rows[key] : rows[key] + 1], (1, 28, 28))[0]), key
    assert sum(w.sum().item() for _, _, w in bundle.eval) == 300  # every eval sample once
    assert snapshot(folder) == before


def test_png_shards_feed_the_model_what_dist_trains_own_shards_would(corpus):
    shards, index, before = corpus
    bundle = loader_bundle(index, "data.num_workers=0")
    assert bundle.notes == (f"webdataset shards read as they are (index {index}): input png L 8x8 -> 1x28x28: bilinear resize per batch, scaled to [0,1]; target cls: 10 classes (0..9)",)
    first, second = epoch_samples(bundle.train, 0), epoch_samples(bundle.train, 1)
    split = digit_splits()["train"]
    assert len(first) == len(second) == 1438 // 64 * 64 and set(first) != set(second)  # a different 30 dropped each epoch
    rows = {key: i for i, key in enumerate(split.keys)}
    expected = adapt_images(split.inputs, (1, 28, 28))
    for key, (x, label) in first.items():
        assert torch.equal(x, expected[rows[key]]) and label == int(split.targets[rows[key]]), key
    # The order is a function of (seed, epoch): a second loader on a second process-less run agrees.
    again = loader_bundle(index, "data.num_workers=2").train
    again.set_epoch(1)
    assert [k for step in again.iter_steps() for _, _, keys in step for k in keys] == list(second)
    assert snapshot(shards) == before


def test_a_consumer_decodes_the_next_shards_while_another_decodes_the_one_it_waits_for(corpus):
    import fcntl
    import threading

    from dist_train.data.node_store import SharedShards, enter_pass, leave_pass

    _, index, _ = corpus
    plan = loader_bundle(index, "data.shuffle=false").train.pass_plan(0)
    enter_pass(plan.directory)
    try:
        store = SharedShards(plan, plan.consumers_per_shard())
        got = {}
        with open(plan.directory / "shard-0.lock", "a+b") as other:  # another process is decoding shard 0
            fcntl.flock(other.fileno(), fcntl.LOCK_EX)
            waiting = threading.Thread(target=lambda: got.update(shard=store.get(0, lambda: [1, 2])), daemon=True)
            waiting.start()
            deadline = time.monotonic() + 120
            while not (plan.directory / "shard-2" / "meta.json").is_file():
                assert time.monotonic() < deadline and waiting.is_alive(), "shards 1 and 2 were not decoded while shard 0 was busy"
                time.sleep(0.05)
            assert (plan.directory / "shard-1" / "meta.json").is_file() and not (plan.directory / "shard-0").exists()
            assert waiting.is_alive()  # still waiting for shard 0
            fcntl.flock(other.fileno(), fcntl.LOCK_UN)
        waiting.join(120)
        assert len(got["shard"].keys) == 300 and store.decoded_records == 3 * 2  # each of the 3 shards decoded once
    finally:
        leave_pass(plan.directory, 1)


# ---------------------------------------------------------------- bad input


def test_bad_samples_name_shard_and_key_or_are_skipped_and_counted(tmp_path, caplog):
    written = []

    def damaged(pixels, label):
        written.append(label)
        if len(written) == 7:
            return {"png": b"not a png"}  # an undecodable image, and no cls member
        return png_cls(pixels, label)

    folder = write_with_tar_writer(tmp_path / "bad", damaged, limit=100)
    assert main(["data", "index", str(folder), "--out", str(tmp_path / "index")]) == 0
    key = digit_splits()["train"].keys[6]
    with pytest.raises(DataError, match=rf"shard train-000000\.tar .*sample {key}: its png member fails to decode .*data.skip_bad_samples=true"):
        epoch_samples(loader_bundle(tmp_path / "index", "data.shuffle=false", "train.global_batch_size=16").train)
    train = loader_bundle(tmp_path / "index", "data.skip_bad_samples=true", "data.shuffle=false", "train.global_batch_size=16").train
    with caplog.at_level(logging.WARNING, logger="dist_train.data.streaming"):
        seen = epoch_samples(train)
    assert key not in seen and len(seen) == 96 - 1 and train.skipped_samples == 1  # 6 steps of 16; the bad one in step 0
    assert any(key in r.getMessage() and "fails to decode" in r.getMessage() for r in caplog.records)


def test_a_shard_changed_after_indexing_and_unindexed_shards_are_refused_in_one_line(corpus, tmp_path):
    shards, index, before = corpus
    # No index, no data.cache_dir: one line saying both ways out; nothing written beside the tars.
    with pytest.raises(ConfigError, match=r"data.path=.*digits holds webdataset shards without an index: run `dist-train data index .* --out INDEX` .*or set data.cache_dir"):
        loader_bundle(shards)
    # A copy indexed, then rewritten with other samples of the same size: named, with what to do.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("train-000000.tar", "test-000000.tar"):
        (copy / name).write_bytes((shards / name).read_bytes())
    assert main(["data", "index", str(copy), "--out", str(tmp_path / "index")]) == 0
    data = (copy / "train-000000.tar").read_bytes()
    (copy / "train-000000.tar").write_bytes(bytes(512) + data[:-512])  # every member one block later, the same size
    with pytest.raises(DataError, match=r"shard train-000000\.tar .*changed since it was indexed.*index it again"):
        epoch_samples(loader_bundle(tmp_path / "index", "data.shuffle=false").train)
    with pytest.raises(ConfigError, match=r"data.fields.target=label, but the index at .* was built with target=cls"):
        loader_bundle(index, "data.fields={target: label}")
    assert snapshot(shards) == before


# ---------------------------------------------------------------- first use, remote, inspect


def test_first_use_index_lives_in_cache_dir_and_data_fields_pick_members(tmp_path):
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

    def odd_fields(pixels, label):  # nothing webdataset's conventions would pick: data.fields names both
        return {"seg.png": Image.fromarray(pixels, "L"), "meta.json": {"category": names[label]}}

    folder = write_with_tar_writer(tmp_path / "odd", odd_fields, limit=200)
    before = snapshot(folder)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"has no jpg member .*--input EXT \(data.fields.input=EXT\)|has no image or npy member"):
        loader_bundle(folder, f"data.cache_dir={cache}")
    bundle = loader_bundle(folder, f"data.cache_dir={cache}", "data.fields={input: seg.png, target: 'meta.json:category'}", "train.global_batch_size=32")
    assert "target meta.json:category: 10 classes (eight=0, five=1, four=2, nine=3, ...)" in bundle.notes[0]
    seen = epoch_samples(bundle.train)
    split = digit_splits()["train"]
    labels = dict(zip(split.keys, split.targets.tolist()))
    assert all(label == sorted(names).index(names[labels[key]]) for key, (_, label) in seen.items())
    assert [p.name for p in (cache / "index").iterdir()] and all(len(p.name) == 16 for p in (cache / "index").iterdir())
    assert snapshot(folder) == before


@pytest.fixture(scope="module")
def http_corpus(corpus):
    """`python -m http.server` on 127.0.0.1 serving the ShardWriter folder."""
    shards, _, _ = corpus
    with procs.http_server(shards, shards.parent / "http.log", "test-000000.tar") as base:
        yield base


def test_remote_and_piped_shards_read_the_same_samples_through_the_verified_cache(corpus, http_corpus, tmp_path, capsys):
    shards, index, before = corpus
    local = list(epoch_samples(loader_bundle(index).train))
    urls = f"{http_corpus}/{{train-{{000000..000004}},test-{{000000..000001}}}}.tar"
    assert main(["data", "index", urls, "--out", str(tmp_path / "http-index")]) == 0
    cache = tmp_path / "cache"
    remote = loader_bundle(tmp_path / "http-index", f"data.cache_dir={cache}")
    assert remote.train.source.urls[0].startswith("http://") and list(epoch_samples(remote.train)) == local
    assert sorted(p.name.split("-", 1)[1] for p in cache.glob("*.tar")) == sorted(f"train-00000{i}.tar" for i in range(5))
    piped = f"pipe:cat {shards}/{{train-{{000000..000004}},test-{{000000..000001}}}}.tar"
    assert main(["data", "index", piped, "--out", str(tmp_path / "pipe-index")]) == 0
    assert list(epoch_samples(loader_bundle(tmp_path / "pipe-index").train)) == local
    # First use without an index: data.shard_urls and data.cache_dir only.
    first_use = loader_bundle(None, f"data.shard_urls={urls}", f"data.cache_dir={tmp_path / 'cache2'}")
    assert list(epoch_samples(first_use.train)) == local
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "http-index")]) == 0
    assert capsys.readouterr().out.count("sha256 ok") == 7
    assert snapshot(shards) == before


def test_inspect_an_index_and_a_folder_of_tars(corpus, tmp_path, capsys):
    shards, index, before = corpus
    capsys.readouterr()
    assert main(["data", "inspect", str(index)]) == 0
    out = capsys.readouterr().out
    assert "split=train 1438 samples in 5 webdataset shards" in out and out.count("sha256 ok") == 7 and "all checksums verified" in out
    assert main(["data", "inspect", str(shards)]) == 0
    out = capsys.readouterr().out
    assert "input png (L 8x8 x1438), target cls (10 classes)" in out and f"{shards} is not indexed" in out
    assert snapshot(shards) == before


# ---------------------------------------------------------------- 2 processes


@pytest.mark.slow
def test_two_ranks_exact_epochs_bit_identical_across_workers_resume_and_training_accuracy(corpus, tmp_path):
    """One torchrun launch: loader scenarios on 2 ranks x 1 and 2 workers, then `cnn_digits` trained on the ShardWriter shards."""
    shards, index, before = corpus
    out = tmp_path / "out"
    out.mkdir()
    procs.worker("foreign_scenarios.py", [index, out, "train.epochs=2", "checkpoint.save_at_end=false"], nproc=2, timeout=300)
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]

    def global_steps(per_rank):
        assert len(per_rank[0]) == len(per_rank[1]), "ranks ran different step counts"
        return [r0 + r1 for r0, r1 in zip(*per_rank)]

    epochs = {}
    for workers in (1, 2):
        for epoch in (0, 1):
            steps = global_steps([r[f"w{workers}-epoch{epoch}"] for r in ranks])
            keys = [k for step in steps for micro in step for k in micro["keys"]]
            assert len(steps) == 1438 // 64 and len(keys) == len(set(keys)) == 22 * 64
            epochs[workers, epoch] = steps
            # each record read and decoded once per node per epoch: the split's bytes, once over both ranks
            decoded, read = (sum(r[f"w{workers}-epoch{epoch}-reads"][i] for r in ranks) for i in (0, 1))
            assert read == sum(e.bytes for e in load_index(index / "train" / "manifest.json").entries) and decoded == 4 * 2 + 1
    assert epochs[1, 0] == epochs[2, 0] and epochs[1, 1] == epochs[2, 1]  # keys and tensors, bit for bit
    assert epochs[2, 0] != epochs[2, 1]

    # One process from the same seed: the same global steps (the order is a function of (seed, epoch) only).
    single = loader_bundle(index, "data.shuffle_window=300").train
    single.set_epoch(1)
    assert [[k for _, _, keys in step for k in keys] for step in single.iter_steps()] == [[k for m in s for k in m["keys"]] for s in epochs[2, 1]]

    # Stopped after 2 steps with 2 workers, resumed with 1: exactly the rest; and on 1 process from that state.
    assert ranks[0]["state"]["samples_consumed"] == 128
    assert global_steps([r["resume_before"] + r["resume_after"] for r in ranks]) == epochs[2, 1]
    one = loader_bundle(index, "data.shuffle_window=300").train
    one.load_state_dict(ranks[0]["state"])
    one.set_epoch(1)
    assert [[k for _, _, keys in step for k in keys] for step in one.iter_steps()] == [[k for m in s for k in m["keys"]] for s in epochs[2, 1][2:]]

    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["optimizer_steps"] == 2 * 22
    assert summary["eval"]["eval/samples"] == 359 and summary["eval"]["eval/accuracy"] >= 0.8
    assert "webdataset shards read as they are" in (out / "run" / "logs" / "console.log").read_text()
    assert snapshot(shards) == before


def test_data_fields_is_one_key_on_resume_and_checked():
    from dist_train.checkpoint.resume_semantics import resume_changes

    saved = load_config(None, ["data.fields={input: seg.png}"]).to_dict()
    now = load_config(None, ["data.fields={input: png}"])
    with pytest.raises(ConfigError, match=r"written with data.fields=\{\"input\": \"seg.png\"\}, this run has data.fields=\{\"input\": \"png\"\}"):
        resume_changes(saved, now, "ckpt")
    assert resume_changes(saved, load_config(None, ["data.fields={input: seg.png}"]), "ckpt") == []
    with pytest.raises(ConfigError, match=r"data.fields.image is not a field dist_train maps"):
        loader_bundle(Path("/nonexistent"), "data.fields={image: png}")
    with pytest.raises(ConfigError, match=r"data.fields.input=txt: dist_train decodes images"):
        loader_bundle(Path("/nonexistent"), "data.fields={input: txt}")
