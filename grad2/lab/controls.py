"""The evaluation's controls: the GRAD² solver driven by scores that carry no gradient
information, which tell gradient steering apart from a class-bias push, and the paper's
uncoordinated ``min_ip`` ablation. Research only: never in the served registry
(:data:`grad2.defenses.DEFENSES`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from grad2 import targets
from grad2.defenses import GRAD2, Redirection
from grad2.redirect import push_scores
from grad2.scores import redirection_scores


class RandomScores(Redirection):
    """Control: the GRAD² solver with seeded Gaussian scores (no gradient information)."""

    def __init__(self, epsilon: float, seed: int = 0, preserve_top1: bool = False) -> None:
        super().__init__(epsilon, preserve_top1)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def scores(self, x: Tensor, probs: Tensor) -> Tensor:
        noise = torch.randn(probs.shape, generator=self._generator, dtype=torch.float64)
        return noise.to(probs)


class ShuffledScores(Redirection):
    """Control: GRAD²'s own scores, permuted across the queries of a batch.

    Keeps the distribution of receiving classes and breaks their link to the query.
    """

    def __init__(self, grad2: GRAD2, seed: int = 0) -> None:
        super().__init__(grad2.epsilon, grad2.preserve_top1)
        self.grad2, self.seed = grad2, seed
        self._generator = torch.Generator().manual_seed(seed)

    def scores(self, x: Tensor, probs: Tensor) -> Tensor:
        permutation = torch.randperm(x.shape[0], generator=self._generator).to(probs.device)
        return self.grad2.scores(x, probs)[permutation]


class FixedClassPush(Redirection):
    """Control: the same budget always given to one class ``receiver``."""

    def __init__(self, epsilon: float, receiver: int, preserve_top1: bool = False) -> None:
        super().__init__(epsilon, preserve_top1)
        if not isinstance(receiver, int) or receiver < 0:
            raise ValueError(f"receiver must be a class index, got {receiver!r}")
        self.receiver = receiver

    def scores(self, x: Tensor, probs: Tensor) -> Tensor:
        if self.receiver >= probs.shape[1]:
            raise ValueError(f"receiver {self.receiver} >= number of classes {probs.shape[1]}")
        receivers = torch.full((probs.shape[0],), self.receiver, device=probs.device)
        return push_scores(probs, receivers)


class MinIPGRAD2(Redirection):
    """The paper's uncoordinated ablation: GRAD² along ``t = −mean_batch(Gᵀy)``
    (:func:`grad2.targets.min_ip`), recomputed for every batch. Its answers depend on
    their batch-mates, so it is never served."""

    def __init__(self, surrogate: nn.Module, epsilon: float, score_method: str = "jvp",
                 preserve_top1: bool = False) -> None:
        super().__init__(epsilon, preserve_top1)
        self.surrogate = surrogate.eval()
        self.score_method = score_method

    def scores(self, x: Tensor, probs: Tensor) -> Tensor:
        target = targets.min_ip(self.surrogate, x, probs)
        return redirection_scores(self.surrogate, x, target, self.score_method).to(probs.dtype)
