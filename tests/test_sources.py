"""The on-disk sources read files in their standard layouts, written here (nothing is downloaded):
FashionMNIST/MNIST raw idx files as torchvision keeps them, CIFAR-10 python batches, an image folder tree."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_train.config import ConfigError, DataConfig, ModelConfig
from dist_train.data import load_source
from dist_train.models import model_spec
from tests.procs import dist_train

RNG = np.random.default_rng(0)


def write_idx(root: Path, folder: str, train: int, test: int) -> dict[str, np.ndarray]:
    """torchvision's raw layout: ROOT/<Name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (big-endian idx)."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", train), ("t10k", test)):
        images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = RNG.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())
        arrays[prefix] = (images, labels)
    return arrays


def write_cifar(root: Path, per_batch: int, test: int) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    first = None
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        data = RNG.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        first = data if first is None else first
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": RNG.integers(0, 10, n).tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return first


@pytest.mark.parametrize("source, folder", [("fashion_mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_torchvision_idx_files_are_read_in_their_standard_layout(tmp_path, source, folder):
    arrays = write_idx(tmp_path, folder, train=40, test=12)
    data = load_source(DataConfig(source=source, path=str(tmp_path)), model_spec(ModelConfig(name="cnn")))
    assert (len(data.train), len(data.test), data.kind, data.num_classes) == (40, 12, "image", 10)
    assert np.array_equal(data.train.inputs[:, 0].numpy(), arrays["train"][0])
    assert np.array_equal(data.test.targets.numpy(), arrays["t10k"][1].astype(np.int64))


def test_cifar10_python_batches_are_read(tmp_path):
    first = write_cifar(tmp_path, per_batch=8, test=6)
    data = load_source(DataConfig(source="cifar10", path=str(tmp_path)), model_spec(ModelConfig(name="resnet18")))
    assert (len(data.train), len(data.test)) == (40, 6)
    assert tuple(data.train.inputs.shape[1:]) == (3, 32, 32)
    assert np.array_equal(data.train.inputs[:8].reshape(8, -1).numpy(), first)


def test_image_folder_tree_is_read_with_one_class_per_folder(tmp_path):
    for label, name in enumerate(("cat", "dog", "fox")):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.fromarray(RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    data = load_source(DataConfig(source="image_folder", path=str(tmp_path), test_fraction=0.2), model_spec(ModelConfig(name="lenet", num_classes=3)))
    assert (len(data.train), len(data.test), data.num_classes) == (12, 3, 3)
    assert tuple(data.train.inputs.shape[1:]) == (1, 32, 32)  # converted for LeNet's grayscale 32x32 input
    assert sorted(set(data.train.targets.tolist()) | set(data.test.targets.tolist())) == [0, 1, 2]


def test_missing_dataset_names_the_key_to_set(tmp_path):
    with pytest.raises(ConfigError, match="data.path=.*FashionMNIST not found.*data.download=true"):
        load_source(DataConfig(source="fashion_mnist", path=str(tmp_path)), model_spec(ModelConfig(name="cnn")))
    with pytest.raises(ConfigError, match="set data.path"):
        load_source(DataConfig(source="cifar10"), model_spec(ModelConfig(name="cnn")))


@pytest.mark.slow
def test_fashion_mnist_preset_trains_from_local_files_and_from_prepared_shards(tmp_path):
    write_idx(tmp_path / "raw", "FashionMNIST", train=256, test=50)
    common = ["train.max_steps=3", "data.num_workers=0", "checkpoint.save_at_end=false", "train.progress_bar=false"]
    dist_train(["train", "configs/cnn_fashion_mnist.yaml", f"data.path={tmp_path / 'raw'}", f"output_dir={tmp_path / 'run'}", *common], timeout=240)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["optimizer_steps"] == 3 and summary["eval"]["eval/samples"] == 50

    dist_train(["data", "prepare", "--source", "fashion_mnist", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "shards"), "--samples-per-shard", "100"], timeout=240)
    inspect = dist_train(["data", "inspect", str(tmp_path / "shards")], timeout=240)
    assert inspect.stdout.count("sha256 ok") == 3 + 1  # 256 train samples in 3 shards, 50 test samples in 1
    dist_train(["train", "configs/cnn_fashion_mnist.yaml", "data.source=shards", f"data.path={tmp_path / 'shards'}", f"output_dir={tmp_path / 'run2'}", *common], nproc=2, timeout=240)
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["eval"]["eval/samples"] == 50
