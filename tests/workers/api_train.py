"""The Python API as a user's script: own nn.Module, own map-style Dataset, own metric.

    torchrun --nproc_per_node 2 tests/workers/api_train.py OUTPUT_DIR [section.key=value ...]
"""

import sys

import torch
from torch import nn
from torch.utils.data import Dataset

import dist_train


class Blobs(Dataset):
    """Three Gaussian blobs in 16 dimensions: (features, class) pairs, made on the fly."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, 3, (n,), generator=g)
        centers = torch.randn(3, 16, generator=torch.Generator().manual_seed(7)) * 2
        self.features = centers[self.targets] + torch.randn(n, 16, generator=g)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.features[i], self.targets[i]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))

    def forward(self, x):
        return self.body(x)


def correct(outputs, targets):
    return (outputs.argmax(dim=1) == targets).float()


if __name__ == "__main__":
    out, *overrides = sys.argv[1:]
    summary = dist_train.train(
        {"optim": {"name": "adam", "lr": 0.01}, "train": {"global_batch_size": 32, "micro_batch_size": 8, "epochs": 2, "log_interval": 3}},
        f"output_dir={out}",
        *overrides,
        model=Net,
        train_dataset=Blobs(300, seed=1),
        eval_dataset=Blobs(101, seed=2),
        metrics={"correct": correct},
    )
    sys.exit(summary["exit_code"])
