"""Small networks shared by the unit tests (not a test module)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_net(seed: int = 0) -> nn.Module:
    """A seeded 1x28x28 -> 10 conv net with batch norm, in eval mode (fast to evaluate)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(16, 10),
    ).eval()
