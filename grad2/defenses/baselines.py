"""Baselines that need no network: the clean answer, the label only, rounding, reverse
sigmoid (Lee et al. 2019) and a random receiver."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from grad2.config import integer, number
from grad2.defenses.base import EPSILON, KEEPS_TOP1, PRESERVE_TOP1, SEED, Defense, Redirection
from grad2.redirect import push_scores


class NoDefense(Defense):
    """Returns the clean probabilities (the undefended reference)."""

    method = "none"
    params = (KEEPS_TOP1,)

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        return probs.clone()


class Top1(Defense):
    """Returns the one-hot top-1 label only."""

    method = "top1"
    params = (KEEPS_TOP1,)

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        return torch.zeros_like(probs).scatter_(1, probs.argmax(dim=1, keepdim=True), 1.0)


class Rounding(Defense):
    """Rounds every probability to ``decimals`` decimals (rows may sum to 1 ± K·10⁻ᵈ/2)."""

    method = "rounding"
    params = (integer("decimals", 2, 0, 8, "decimals kept"),)

    def __init__(self, decimals: int = 2) -> None:
        if not isinstance(decimals, int) or not 0 <= decimals <= 8:
            raise ValueError(f"decimals must be an integer in [0, 8], got {decimals!r}")
        self.decimals = decimals

    @classmethod
    def from_config(cls, params, surrogate, files) -> Rounding:
        return cls(params["decimals"])

    def sum_tolerance(self, num_classes: int) -> float:
        # Each entry moves by at most half a unit of the last decimal kept.
        return max(super().sum_tolerance(num_classes), num_classes * 0.5 * 10.0**-self.decimals)

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        return torch.round(probs, decimals=self.decimals)


class ReverseSigmoid(Defense):
    """Lee et al. 2019: ``ỹ ∝ (y − β (σ(γ σ⁻¹(y)) − ½))⁺``, renormalised."""

    method = "reverse_sigmoid"
    params = (number("beta", 0.7, 0.0, 1e6, "β, the strength"),
              number("gamma", 0.4, 1e-6, 1e6, "γ, the slope"))

    def __init__(self, beta: float = 0.7, gamma: float = 0.4) -> None:
        if not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {beta}")
        if not (gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"gamma must be a finite number > 0, got {gamma}")
        self.beta, self.gamma = float(beta), float(gamma)

    @classmethod
    def from_config(cls, params, surrogate, files) -> ReverseSigmoid:
        return cls(params["beta"], params["gamma"])

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        tiny = torch.finfo(probs.dtype).tiny
        logit = torch.logit(probs.clamp(tiny, 1 - 1e-7))
        perturbed = (probs - self.beta * (torch.sigmoid(self.gamma * logit) - 0.5)).clamp_min(0)
        total = perturbed.sum(dim=1, keepdim=True)
        # A row clipped to all zeros keeps its label rather than becoming undefined.
        fallback = Top1().defend(x, probs)
        return torch.where(total > 0, perturbed / total.clamp_min(tiny), fallback)


class RandomNoise(Redirection):
    """Moves ``ε/2`` of mass to one random non-top class (seeded, fresh per query)."""

    method = "random"
    params = (EPSILON, SEED, PRESERVE_TOP1)

    def __init__(self, epsilon: float, seed: int = 0, preserve_top1: bool = False) -> None:
        super().__init__(epsilon, preserve_top1)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_config(cls, params, surrogate, files) -> RandomNoise:
        return cls(params["epsilon"], params["seed"], params["preserve_top1"])

    def scores(self, x: Tensor, probs: Tensor) -> Tensor:
        batch, num_classes = probs.shape
        offset = torch.randint(1, max(num_classes, 2), (batch,), generator=self._generator)
        receivers = (probs.argmax(dim=1).cpu() + offset) % num_classes
        return push_scores(probs, receivers.to(probs.device))
