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


def warmed(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> nn.Module:
    """``model`` in ``dtype`` with non-trivial batch-norm statistics, in eval mode."""
    model = model.to(dtype).train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape, generator=generator, dtype=dtype))
    return model.eval()


def gaussian_target(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=generator, dtype=p.dtype)
        for n, p in model.named_parameters()
    }


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max())


def _model_zoo() -> dict:
    from grad2.models import build_model

    return {
        "small_cnn": (lambda: build_model("small_cnn"), (1, 28, 28)),
        "wide_cnn": (lambda: build_model("wide_cnn"), (1, 28, 28)),
        "resnet18": (lambda: build_model("torchvision:resnet18", 10, 3), (3, 32, 32)),
        "mobilenet_v3_small": (lambda: build_model("torchvision:mobilenet_v3_small", 10, 3),
                               (3, 32, 32)),
    }


#: Networks whose JVP engine paths are compared: name -> (builder, input shape).
MODELS = _model_zoo()
