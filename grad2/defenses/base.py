"""The defense interface: ``defense(x, probs) -> ỹ``, and the parameters methods share.

``x`` is the victim's input batch ``[B, ...]`` and ``probs`` its clean probabilities
``[B, K]``; the result is ``[B, K]``. A served method is a :class:`Defense` subclass that
names itself (``method``), declares its ``defense:`` keys (``params``, checked by
:class:`grad2.config.DefenseConfig`), checks how they combine (:meth:`check_params`) and
builds itself from them (:meth:`from_config`). Parameters are validated again at
construction, so a library user gets the same errors.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from grad2.batching import invariant_map, lone_agrees, probe_sizes
from grad2.config import Param, flag, integer, number
from grad2.redirect import solve_answers

EPSILON = number("epsilon", 0.5, 0.0, 2.0, "L1 budget per answer")
PRESERVE_TOP1 = flag("preserve_top1", False, "never flip the clean top-1 label (exact LP "
                                             "with the extra constraints)")
#: ``preserve_top1`` of methods whose answers keep the top-1 label whatever it says.
KEEPS_TOP1 = flag("preserve_top1", True, "accepted; answers always keep the top-1 label")
SEED = integer("seed", 0, 0, 2**63 - 1, "seed of the random draws")
GATE_THRESHOLD = number("gate_threshold", 0.9, -1e12, 1e12,
                        "τ: a query whose gate score falls below it counts as OOD")
GATE_SLOPE = number("gate_slope", 50.0, 1e-3, 1e6, "ν: the sharpness of the gate's sigmoid")


class Defense(ABC):
    """Maps clean probabilities to defended ones; subclasses implement :meth:`defend`."""

    #: The ``defense.method`` name that selects this class.
    method: ClassVar[str]
    #: Its own ``defense:`` keys (beyond :data:`grad2.config.COMMON_KEYS`).
    params: ClassVar[tuple[Param, ...]] = ()
    #: Whether it needs a network (``defense.surrogate``).
    needs_surrogate: ClassVar[bool] = False
    #: Whether each answer is a function of its own row, computed by a network whose CPU
    #: kernels depend on the batch size (:meth:`network_rows`): then :meth:`plan_batches`
    #: applies.
    plans_batches: bool = False
    #: The batch sizes answers are computed in (see :meth:`plan_batches`); ``None``: as given.
    batch_sizes: tuple[int, ...] | None = None
    #: Whether a lone row computed alone has the bits of the row as a pair with itself
    #: (checked by :meth:`plan_batches`); else a lone row runs as a pair.
    lone: bool = False

    def __call__(self, x: Tensor, probs: Tensor) -> Tensor:
        """Defended probabilities ``[B, K]`` for inputs ``x`` ``[B, ...]``."""
        if probs.ndim != 2 or probs.shape[0] != x.shape[0]:
            raise ValueError(
                f"probs must be [B, K] with B = len(x) = {x.shape[0]}, got {tuple(probs.shape)}"
            )
        if not torch.isfinite(probs).all():
            raise ValueError("probs has non-finite values")
        if self.batch_sizes is None:
            return self.defend(x, probs.detach())
        return invariant_map(self.defend, (x, probs.detach()), self.batch_sizes,
                             self.defend if self.lone else None)

    def plan_batches(self, x: Tensor, probs: Tensor, max_batch: int) -> tuple[int, ...] | None:
        """Make every later answer the one its query gets as a pair with itself, whatever
        its batch-mates: probe which batch sizes up to ``max_batch`` give every row that
        answer, then defend in chunks of those sizes (:mod:`grad2.batching`).

        Args:
            x: example inputs ``[N, ...]``, ``N >= max_batch``.
            probs: their clean probabilities ``[N, K]``.
            max_batch: the largest batch the defense will be given.

        Returns:
            The sizes found, or ``None`` when this defense needs no plan.
        """
        if not self.plans_batches:
            return None
        # The network's raw output is probed, not the answer: a kernel's other last bits
        # show in every row there, while an answer hides them whenever they move no mass.
        inputs = (x, probs.detach())
        self.batch_sizes = probe_sizes(self.network_rows, inputs, max_batch)
        self.lone = lone_agrees(self.network_rows, inputs) and lone_agrees(self.defend, inputs)
        return self.batch_sizes

    def network_rows(self, x: Tensor, probs: Tensor) -> Tensor:
        """``[B, ...]``: the network computation whose bits an answer follows (only for
        defenses with :attr:`plans_batches`)."""
        raise NotImplementedError(f"{type(self).__name__} runs no network")

    @abstractmethod
    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        """The defense proper; inputs already checked."""

    def sum_tolerance(self, num_classes: int) -> float:
        """How far from 1 a row of this defense's answers may sum (the runtime refuses
        answers beyond it, failing closed); answers on the simplex: ``1e-4``."""
        return 1e-4

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        """Refuse combinations of this method's validated ``params`` that cannot work,
        raising :class:`grad2.config.ConfigError` naming the key (default: none)."""
        return None

    @classmethod
    def from_config(cls, params: Mapping[str, Any], surrogate: nn.Module | None,
                    files: Mapping[str, Any]) -> Defense:
        """Build from the validated ``params`` of a ``defense:`` section, the loaded
        ``surrogate`` (methods with :attr:`needs_surrogate`) and ``files``: what the
        loader read for each file key that is set (default: no parameters)."""
        return cls()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if _is_scalar(v))
        return f"{type(self).__name__}({fields})"


def _is_scalar(value: object) -> bool:
    return isinstance(value, int | float | str | bool)


def check_epsilon(epsilon: float) -> float:
    """``epsilon`` as a float in ``[0, 2]``; raises ``ValueError`` otherwise."""
    epsilon = float(epsilon)
    if math.isnan(epsilon) or not 0 <= epsilon <= 2:
        raise ValueError(f"epsilon must lie in [0, 2], got {epsilon}")
    return epsilon


def check_gate(threshold: float, slope: float, probability: bool = True) -> tuple[float, float]:
    """``(threshold, slope)`` of a sigmoid gate, checked (``threshold`` in ``[0, 1]`` when
    it gates a probability); raises ``ValueError`` otherwise."""
    threshold, slope = float(threshold), float(slope)
    if probability and not 0 <= threshold <= 1:
        raise ValueError(f"gate threshold must lie in [0, 1], got {threshold}")
    if not math.isfinite(threshold):
        raise ValueError(f"gate threshold must be finite, got {threshold}")
    if not (slope > 0 and math.isfinite(slope)):
        raise ValueError(f"gate slope must be a finite number > 0, got {slope}")
    return threshold, slope


class Redirection(Defense):
    """Score-driven defenses: ``ỹ = solve_answers(probs, scores(x, probs), epsilon)``."""

    params = (EPSILON, PRESERVE_TOP1)

    def __init__(self, epsilon: float, preserve_top1: bool = False) -> None:
        self.epsilon = check_epsilon(epsilon)
        self.preserve_top1 = bool(preserve_top1)

    @abstractmethod
    def scores(self, x: Tensor, probs: Tensor) -> Tensor:
        """``[B, K]`` scores; mass moves toward the highest."""

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        if self.epsilon == 0:
            return probs.clone()
        return self.solve(probs, self.scores(x, probs))

    def solve(self, probs: Tensor, scores: Tensor) -> Tensor:
        """``[B, K]`` answers for given ``scores`` ``[B, K]``: this defense's budget and
        constraint, without computing scores (what calibrations such as
        :func:`grad2.balance.balance_offsets` iterate on)."""
        if self.epsilon == 0:
            return probs.clone()
        return solve_answers(probs, scores, self.epsilon, self.preserve_top1)
