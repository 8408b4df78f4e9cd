"""The classic PyTorch tutorial models, layer for layer as the tutorials define them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


class LinearRegression(nn.Module):
    """`nn.Linear(1, 1)` fitted to y = 0.5 x + 30 + noise."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class TwoLayerNet(nn.Module):
    """'Learning PyTorch with examples': D_in 1000 -> H 100 -> ReLU -> D_out 10."""

    def __init__(self, d_in: int = 1000, hidden: int = 100, d_out: int = 10) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_in, hidden)
        self.linear2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(torch.relu(self.linear1(x)))


class MLP(nn.Module):
    """The quickstart's FashionMNIST network: Flatten, 784-512-512-10 with ReLU."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_relu_stack(self.flatten(x))


class CNN(nn.Module):
    """The FashionMNIST CNN: conv 1->16 k5 p2, ReLU, pool 2; conv 16->32 k5 p2, ReLU, pool 2; linear 1568->10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 16, kernel_size=5, stride=1, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(16, 32, kernel_size=5, stride=1, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.out = nn.Linear(32 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        return self.out(x.flatten(1))


class LeNet(nn.Module):
    """The 60-minute blitz network: conv 1->6 k5, conv 6->16 k5, fc 400-120-84-10 on 32x32 input."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def resnet18(num_classes: int = 10, freeze_backbone: bool = False, weights: Optional[str] = None) -> nn.Module:
    """torchvision ResNet-18 with a new `fc`, as in the transfer-learning tutorial.

    Pretrained weights come from a local file (an ImageNet state_dict) when given; nothing is downloaded.
    """
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    if weights:
        from ..config import ConfigError

        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"model.weights={weights} does not exist; give a local resnet18 state_dict file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model_state_dict" in state:  # the tutorial's checkpoint dict (export --tutorial-dict)
            state = state["model_state_dict"]
        # ImageNet weights carry a 1000-class fc: keep the new head then. Our own export fits whole.
        if state.get("fc.weight") is None or state["fc.weight"].shape != model.fc.weight.shape:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            state.update({f"fc.{k}": v for k, v in model.fc.state_dict().items()})
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"model.weights={weights} is not a resnet18 state_dict: {str(e).splitlines()[0]}") from None
    if freeze_backbone:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("fc.")
    return model
