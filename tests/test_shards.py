"""`dist-train data prepare / inspect`: shards readable by tar and plain webdataset, checksums, atomic writes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import webdataset as wds

from dist_train.cli import main
from dist_train.data.shards import MANIFEST

from . import procs


def prepare(out: Path, *extra: str) -> int:
    return main(["data", "prepare", "--source", "digits", "--out", str(out), "--samples-per-shard", "500", "--samples-per-record", "128", *extra])


def test_prepared_shards_read_back_with_tar_and_webdataset_and_checksums_verify(tmp_path, capsys):
    out = tmp_path / "digits"
    assert prepare(out) == 0
    manifest = json.loads((out / "train" / MANIFEST).read_text())
    assert (manifest["split"], manifest["kind"], manifest["shape"], manifest["num_classes"]) == ("train", "image", [1, 8, 8], 10)
    assert [s["count"] for s in manifest["shards"]] == [500, 500, 438]
    assert all(len(s["sha256"]) == 64 and s["bytes"] == (out / "train" / s["name"]).stat().st_size for s in manifest["shards"])

    listing = procs.run(["tar", "tf", out / "train" / "train-000000.tar"]).stdout.split()
    assert listing[:3] == ["train-000000-00000.inputs.npy", "train-000000-00000.targets.npy", "train-000000-00000.keys.json"]
    assert len(listing) == 3 * 4  # 500 samples in records of 128: 4 records of 3 members

    # Plain webdataset, no dist_train code: every sample once, labels intact.
    keys, labels = [], []
    for record in wds.WebDataset(str(out / "train" / "train-{000000..000002}.tar"), shardshuffle=False).decode():
        assert record["inputs.npy"].shape[1:] == (1, 8, 8) and record["inputs.npy"].dtype.name == "uint8"
        keys += record["keys.json"]
        labels += record["targets.npy"].tolist()
    test_manifest = json.loads((out / "test" / MANIFEST).read_text())
    assert len(keys) == len(set(keys)) == manifest["num_samples"] == 1797 - test_manifest["num_samples"]
    assert sorted(set(labels)) == list(range(10))

    capsys.readouterr()
    assert main(["data", "inspect", str(out)]) == 0
    assert "all checksums verified" in capsys.readouterr().out

    # Idempotent: a second prepare with the same options leaves the files alone.
    mtime = (out / "train" / "train-000001.tar").stat().st_mtime_ns
    assert prepare(out) == 0
    assert "already prepared" in capsys.readouterr().out
    assert (out / "train" / "train-000001.tar").stat().st_mtime_ns == mtime

    # One flipped byte in a shard's payload: the checksum catches it and names the shard.
    shard = out / "train" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["data", "inspect", str(out / "train")]) == 2  # a data error: fix the data, don't retry (errors.py)
    err = capsys.readouterr().err
    assert "train-000001.tar: sha256" in err and "corrupt" in err and "Traceback" not in err


def test_interrupted_prepare_leaves_the_previous_split_intact(tmp_path):
    out = tmp_path / "digits"
    assert prepare(out) == 0
    before = (out / "train" / MANIFEST).read_text()
    # Overwrite with one sample per shard (1438 files, each fsynced) and kill it mid-way.
    cmd = [sys.executable, "-m", "dist_train", "data", "prepare", "--source", "digits", "--out", str(out), "--samples-per-shard", "1", "--overwrite"]
    proc = subprocess.Popen(cmd, env=procs.clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.glob("*.tar") for p in out.glob(".train.tmp-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be interrupted"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        procs.kill_group(proc)
    assert (out / "train" / MANIFEST).read_text() == before
    assert sorted(p.name for p in (out / "train").iterdir()) == [MANIFEST, "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert main(["data", "inspect", str(out)]) == 0
    # The next prepare that writes removes what the killed one left behind.
    assert prepare(out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
