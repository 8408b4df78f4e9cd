"""Data sources: each turns `data.*` config into a train and a test split held in memory.

Images are kept as uint8 NCHW at their native size; `transforms.adapt_images` fits them to the model's
input shape batch by batch. Regression sources hold float features and targets.
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..config import ConfigError, DataConfig
from ..models import ModelSpec


@dataclass
class Split:
    """One split in memory: inputs, targets and a stable key per sample."""

    inputs: torch.Tensor
    targets: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class SourceData:
    train: Split
    test: Split
    kind: str  # "image" (uint8 NCHW) | "vector" (float features)
    num_classes: int  # 0 for regression targets


def _split(inputs: torch.Tensor, targets: torch.Tensor, test_fraction: float, seed: int, name: str) -> tuple[Split, Split]:
    """A fixed, seeded held-out split (independent of world size and of train.seed)."""
    n = len(targets)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    test_idx, train_idx = order[:n_test].sort().values, order[n_test:].sort().values
    keys = [f"{name}-{i:06d}" for i in range(n)]
    return (
        Split(inputs[train_idx], targets[train_idx], [keys[i] for i in train_idx.tolist()]),
        Split(inputs[test_idx], targets[test_idx], [keys[i] for i in test_idx.tolist()]),
    )


# ---------------------------------------------------------------- embedded and synthetic


def digits(cfg: DataConfig, spec: ModelSpec) -> SourceData:
    """scikit-learn's 1,797 real 8x8 handwritten digits (shipped with the package, no download)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; scale to the uint8 range the other image sources use.
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = _split(images, labels, cfg.test_fraction, seed=1234, name="digits")
    return SourceData(train, test, "image", 10)


def synthetic_linear(cfg: DataConfig, spec: ModelSpec) -> SourceData:
    """The linear-regression tutorial's data: y = 0.5 x + 30 + noise."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(cfg.num_samples, 1, generator=g)
    y = 0.5 * x + 30.0 + 0.1 * torch.randn(cfg.num_samples, 1, generator=g)
    train, test = _split(x, y, cfg.test_fraction, seed=1234, name="linear")
    return SourceData(train, test, "vector", 0)


def random_tensors(cfg: DataConfig, spec: ModelSpec) -> SourceData:
    """The two-layer-net tutorial's random inputs and targets (input and output sizes from the model)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(cfg.num_samples, *spec.input_shape, generator=g)
    y = torch.randn(cfg.num_samples, spec.num_outputs, generator=g)
    train, test = _split(x, y, cfg.test_fraction, seed=1234, name="random")
    return SourceData(train, test, "vector", 0)


# ---------------------------------------------------------------- torchvision formats on disk


@contextmanager
def one_download_at_a_time(root: Path, download: bool) -> Iterator[None]:
    """With data.download, every rank of every node downloads into data.path at once: concurrent writers of one
    archive corrupt it, or one rank reads a half-written file. Under an flock on ROOT/.download.lock the first
    process downloads and the others then find torchvision's integrity check satisfied: one download per data
    root, so one per node where data.path is node-local and one in all where it is shared."""
    if not download:
        yield
        return
    from ..files import file_lock

    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".download.lock"):
        yield


def _require_root(cfg: DataConfig, source: str) -> Path:
    if not cfg.path:
        raise ConfigError(f"data.source={source} reads from disk; set data.path to the dataset root (add data.download=true to fetch it)")
    return Path(cfg.path)


def _torchvision_mnist_like(cls_name: str) -> Callable[[DataConfig, ModelSpec], SourceData]:
    def load(cfg: DataConfig, spec: ModelSpec) -> SourceData:
        import torchvision

        root = _require_root(cfg, cls_name.lower())
        cls = getattr(torchvision.datasets, cls_name)
        try:
            with one_download_at_a_time(root, cfg.download):
                train = cls(root=str(root), train=True, download=cfg.download)
                test = cls(root=str(root), train=False, download=cfg.download)
        except RuntimeError as e:
            raise ConfigError(
                f"data.path={root}: {cls_name} not found; put its four raw idx files (train-images-idx3-ubyte, "
                f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz) under "
                f"{root}/{cls_name}/raw/ or set data.download=true on a machine with network"
            ) from None

        def to_split(ds, name: str) -> Split:
            images = ds.data.unsqueeze(1).to(torch.uint8)
            labels = torch.as_tensor(ds.targets, dtype=torch.int64)
            return Split(images, labels, [f"{name}-{i:06d}" for i in range(len(labels))])

        return SourceData(to_split(train, f"{cls_name.lower()}-train"), to_split(test, f"{cls_name.lower()}-test"), "image", 10)

    return load


def cifar10(cfg: DataConfig, spec: ModelSpec) -> SourceData:
    """CIFAR-10 in its python pickle layout (cifar-10-batches-py/data_batch_1..5, test_batch)."""
    root = _require_root(cfg, "cifar10")
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir() and cfg.download:
        import torchvision

        with one_download_at_a_time(root, True):
            torchvision.datasets.CIFAR10(root=str(root), train=True, download=True)
    if not folder.is_dir():
        raise ConfigError(
            f"data.path={root}: no cifar-10-batches-py folder; put the extracted CIFAR-10 python batches there "
            "or set data.download=true on a machine with network"
        )

    def read(names: list[str], prefix: str) -> Split:
        images, labels = [], []
        for name in names:
            file = folder / name
            if not file.is_file():
                raise ConfigError(f"data.path={root}: CIFAR-10 file {file} is missing")
            with open(file, "rb") as f:
                # The official CIFAR-10 files are pickles of plain arrays; read them with latin1 as torchvision does.
                entry = pickle.load(f, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        x = torch.from_numpy(np.concatenate(images))
        return Split(x, torch.tensor(labels, dtype=torch.int64), [f"{prefix}-{i:06d}" for i in range(len(labels))])

    train = read([f"data_batch_{i}" for i in range(1, 6)], "cifar10-train")
    test = read(["test_batch"], "cifar10-test")
    return SourceData(train, test, "image", 10)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".webp")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes with one colour channel


def image_folder(cfg: DataConfig, spec: ModelSpec) -> SourceData:
    """A class-per-subfolder image tree (torchvision ImageFolder layout), split by data.test_fraction, in the
    channels and size the model takes."""
    channels, height, width = spec.input_shape if len(spec.input_shape) == 3 else (3, 32, 32)
    return read_image_folder(_require_root(cfg, "image_folder"), cfg.test_fraction, (height, width), channels)


def read_image_folder(root: Path, test_fraction: float, size: tuple[int, int], channels: "int | None" = None) -> SourceData:
    """`channels` None keeps the files' own: one when every image is grayscale, else three (RGB); a model
    that takes the other count gets them adapted batch by batch (transforms.adapt_images)."""
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise ConfigError(f"data.path={root} has no class sub-folders; expected ROOT/CLASS_NAME/image.png")
    files = {name: [f for f in sorted((root / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES] for name in classes}
    empty = [name for name in classes if not files[name]]
    if empty:
        raise ConfigError(
            f"data.path={root} has class folders without images: {', '.join(str(root / name) for name in empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''}; put {'/'.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} files in them, or remove them"
        )
    if channels is None:
        channels = 1 if all(_grayscale(f) for name in classes for f in files[name]) else 3
    mode = "L" if channels == 1 else "RGB"
    height, width = size
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in files[name]:
            with Image.open(file) as img:
                array = np.asarray(img.convert(mode).resize((width, height)), dtype=np.uint8)
            images.append(array.reshape(height, width, -1).transpose(2, 0, 1))
            labels.append(label)
    x = torch.from_numpy(np.stack(images))
    y = torch.tensor(labels, dtype=torch.int64)
    train, test = _split(x, y, test_fraction, seed=1234, name="image")
    return SourceData(train, test, "image", len(classes))


def _grayscale(file: Path) -> bool:
    from PIL import Image

    with Image.open(file) as img:  # reads the header only
        return img.mode in GRAYSCALE_MODES  # a palette image counts as colour


SOURCES: dict[str, Callable[[DataConfig, ModelSpec], SourceData]] = {
    "digits": digits,
    "synthetic_linear": synthetic_linear,
    "random": random_tensors,
    "fashion_mnist": _torchvision_mnist_like("FashionMNIST"),
    "mnist": _torchvision_mnist_like("MNIST"),
    "cifar10": cifar10,
    "image_folder": image_folder,
}


def load_source(cfg: DataConfig, spec: ModelSpec) -> SourceData:
    if cfg.source == "shards":
        raise ConfigError("data.source=shards streams from tar files and has no in-memory form; use data.source=digits (or another map-style source) here")
    try:
        loader = SOURCES[cfg.source]
    except KeyError:
        names = ", ".join(list(SOURCES) + ["shards"])
        raise ConfigError(f"data.source={cfg.source} is unknown; use one of {names}") from None
    data = loader(cfg, spec)
    check_compatible(data, spec, f"data.source={cfg.source}")
    return data


def check_compatible(data: SourceData, spec: ModelSpec, what: str) -> None:
    """Fail before training when the data cannot feed the model."""
    if spec.task == "classification":
        if data.kind != "image" and data.num_classes == 0:
            raise ConfigError(f"{what} has regression targets but model.name={spec.name} is a classifier; pick a classification source")
        if data.num_classes > spec.num_outputs:
            raise ConfigError(
                f"{what} has {data.num_classes} classes but model.name={spec.name} outputs {spec.num_outputs}; "
                f"set model.num_classes={data.num_classes}"
            )
        if len(spec.input_shape) != 3 and data.kind == "image" and spec.input_shape != (int(np.prod(data.train.inputs.shape[1:])),):
            raise ConfigError(f"{what} holds images but model.name={spec.name} takes input shape {list(spec.input_shape)}")
    else:
        if data.kind == "image":
            raise ConfigError(f"{what} holds labelled images but model.name={spec.name} is a regression model")
        if tuple(data.train.inputs.shape[1:]) != spec.input_shape:
            raise ConfigError(
                f"{what} gives inputs of shape {list(data.train.inputs.shape[1:])} but model.name={spec.name} takes {list(spec.input_shape)}"
            )
