"""Adaptive Misinformation (Kariyappa and Qureshi, CVPR 2020)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from grad2 import gate
from grad2.config import ConfigError, choice
from grad2.defenses.base import GATE_SLOPE, GATE_THRESHOLD, Defense, check_gate


class AdaptiveMisinformation(Defense):
    """Adaptive Misinformation (Kariyappa and Qureshi, CVPR 2020).

    ``ỹ = (1 − α) y + α softmax(m(x))`` with the gate ``α = sigmoid(ν (τ − max_k y_k))``
    and ``m`` a *misinformation* network trained to put little mass on the true class
    (:func:`grad2.lab.train.train_misinformation`). Served with the network in
    ``defense.surrogate`` and ``τ``, ``ν`` in ``defense.gate_threshold``/``gate_slope``.
    """

    method = "adaptive_misinformation"
    needs_surrogate = True
    plans_batches = True
    params = (choice("gate_score", "msp", ("msp",), "what the gate scores"),
              GATE_THRESHOLD, GATE_SLOPE)

    def __init__(self, misinformation: nn.Module, threshold: float, slope: float) -> None:
        if not isinstance(misinformation, nn.Module):
            raise ValueError("adaptive misinformation needs a misinformation nn.Module")
        self.misinformation = misinformation.eval()
        self.threshold, self.slope = check_gate(threshold, slope)

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        if not 0 <= params["gate_threshold"] <= 1:
            raise ConfigError("defense.gate_threshold",
                              f"a maximum softmax probability threshold lies in [0, 1], got "
                              f"{params['gate_threshold']}")

    @classmethod
    def from_config(cls, params, surrogate, files) -> AdaptiveMisinformation:
        return cls(surrogate, params["gate_threshold"], params["gate_slope"])

    def network_rows(self, x: Tensor, probs: Tensor) -> Tensor:
        with torch.no_grad():
            return self.misinformation(x)

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        logits = self.network_rows(x, probs)
        if logits.shape != probs.shape:
            raise ValueError(f"misinformation network gives {logits.shape[-1]} classes, "
                             f"the victim {probs.shape[-1]}")
        weight = gate.ood_weight(probs, self.threshold, self.slope).to(probs.dtype)
        return torch.lerp(probs, torch.softmax(logits.to(probs.dtype), dim=1),
                          weight.unsqueeze(1))
