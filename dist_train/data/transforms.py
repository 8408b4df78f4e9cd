"""Fitting stored samples to the model's input, a whole batch at a time."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def adapt_images(images: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 in [0, 1] with the model's channels and size.

    One channel is repeated to three (ResNet on digits); three are averaged to one (grayscale models on
    CIFAR). Resizing is bilinear, the same operation torchvision's Resize does on tensors.
    """
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    if len(input_shape) != 3:
        return x.reshape(x.shape[0], *input_shape)
    channels, height, width = input_shape
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot turn {x.shape[1]}-channel images into {channels} channels")
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return x.contiguous()
