"""One rank of a job whose config says data.download=true: loads MNIST (into a node-local data.path) and
FashionMNIST (into a shared one) through dist_train's sources, as every rank's Trainer.build does.

usage: torchvision_download.py MIRROR LOCAL_ROOT SHARED_ROOT BARRIER_DIR PROCESSES
MIRROR replaces torchvision's download sites (MIRROR/mnist/, MIRROR/fashion/: the same gzipped idx files, no
checksums, since the test's files are small stand-ins): the network is the test's, the code under test is
not touched. The processes wait for each other at a file barrier first, as ranks leave a rendezvous
together, so that downloads would overlap if nothing kept them apart. Prints the train and test sizes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torchvision.datasets

from dist_train.config import load_config
from dist_train.data.sources import load_source
from dist_train.models import model_spec


def use_mirror(mirror: str) -> None:
    for cls, folder in ((torchvision.datasets.MNIST, "mnist"), (torchvision.datasets.FashionMNIST, "fashion")):
        cls.mirrors = [f"{mirror}/{folder}/"]
        cls.resources = [(name, None) for name, _ in cls.resources]


def barrier(folder: Path, processes: int, timeout: float = 60) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{os.uname().nodename}-{os.getpid()}").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < processes:
        if time.monotonic() > deadline:
            raise SystemExit("barrier: the other processes did not come")
        time.sleep(0.02)


def main(mirror: str, local_root: str, shared_root: str, barrier_dir: str, processes: str) -> None:
    use_mirror(mirror)
    barrier(Path(barrier_dir), int(processes))
    for source, root in (("mnist", local_root), ("fashion_mnist", shared_root)):
        cfg = load_config(None, ["model.name=mlp", f"data.source={source}", f"data.path={root}", "data.download=true"])
        data = load_source(cfg.data, model_spec(cfg.model))
        print(f"{source}: {len(data.train)} train, {len(data.test)} test", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:6])
