"""Class-balanced redirection: per-class score offsets that keep the mean answer.

A thief can estimate the class prior of the answers it received and remove it (logit
adjustment by the answers' mean: the prior-correcting thief of docs/results.md). A defense
whose mean answer on the thief's kind of queries equals the undefended mean leaves that
correction nothing of the defense to remove.

The offsets ``b`` (``[K]``) solve the dual of the pooled linear program over reference
queries ``i`` (clean answers ``y_i``, scores ``c_i``, feasible sets ``F_i``: the budget,
the simplex and, with ``preserve_top1``, the top-1 constraint)::

    max  mean_i c_i·ỹ_i   s.t.  ỹ_i ∈ F_i,   mean_i ỹ_i = mean_i y_i.

Relaxing the coupling constraint with a multiplier ``b`` separates the queries::

    g(b) = mean_i max_{ỹ ∈ F_i} (c_i + b)·ỹ  −  b·mean_i y_i

``g`` is convex and piecewise linear, at least the pooled optimum for every ``b`` (weak
duality) and equal to it at its minimiser; its subgradient is the marginal gap
``mean_i ỹ_i(b) − mean_i y_i``. At serve time each query is still answered alone, by its
own program with scores ``c + b``: a pure function of the query. For GRAD² the offsets are
folded into the target's last-layer bias (:func:`grad2.targets.shift_scores`), so a
balanced target is an ordinary ``target: file``.

The balance holds for the budget and constraint it was computed with, on queries like the
references; another epsilon needs its own offsets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from grad2 import targets
from grad2.defenses import GRAD2
from grad2.scores import Target

__all__ = ["Balance", "balance_offsets", "balance_target", "dual_value", "marginal_gap"]

#: ``solve(probs [N, K], scores [N, K]) -> answers [N, K]``, e.g. a defense's ``solve``.
Solver = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Balance:
    """Offsets ``[K]`` and how well they balance the references."""

    offsets: Tensor
    #: ``‖mean ỹ − mean y‖₁`` over the references without offsets, and with them.
    gap_before: float
    gap: float
    #: ``g(offsets)``, an upper bound on the pooled program's optimum.
    dual: float
    steps: int


def marginal_gap(answers: Tensor, probs: Tensor) -> Tensor:
    """``[K]``: the mean answer minus the mean clean answer (``[N, K]`` each)."""
    return answers.mean(dim=0) - probs.mean(dim=0)


def dual_value(scores: Tensor, probs: Tensor, answers: Tensor, offsets: Tensor) -> float:
    """``g(b)`` for ``answers`` that solve each query's program with ``scores + offsets``."""
    scores, probs, answers, offsets = (t.double() for t in (scores, probs, answers, offsets))
    per_query = ((scores + offsets) * answers).sum(dim=1).mean()
    return float(per_query - offsets @ probs.mean(dim=0))


def balance_offsets(
    scores: Tensor, probs: Tensor, solve: Solver, steps: int = 600, step: float = 0.5
) -> Balance:
    """Offsets ``b`` ``[K]`` minimising ``g`` by normalised subgradient descent.

    Step ``t`` moves ``b`` against the marginal gap ``d`` by ``step · σ / √(t + 1)`` in its
    largest coordinate (``σ``: the mean spread of a query's scores across classes), so the
    walk is scale-free in the scores; the offsets with the smallest ``‖d‖₁`` seen are
    returned. ``scores``, ``probs``: ``[N, K]``.
    """
    if scores.shape != probs.shape or scores.dim() != 2:
        raise ValueError(f"scores and probs must both be [N, K]; got {tuple(scores.shape)} "
                         f"and {tuple(probs.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    # Answers are solved in the scores' own dtype (float32 when served); the walk and the
    # gap are kept in float64.
    spread = scores.double().std(dim=1).mean().clamp_min(1e-12)
    offsets = torch.zeros(scores.shape[1], dtype=torch.float64)
    best, best_gap, gap_before = offsets, float("inf"), None
    for index in range(steps):
        answers = solve(probs, scores + offsets.to(scores.dtype))
        gap = marginal_gap(answers.double(), probs.double())
        size = float(gap.abs().sum())
        if gap_before is None:
            gap_before = size
        if size < best_gap:
            best, best_gap = offsets, size
        largest = gap.abs().max()
        if largest == 0:
            break
        offsets = offsets - step * spread / (index + 1) ** 0.5 * gap / largest
    best = best.to(scores.dtype)
    answers = solve(probs, scores + best)
    return Balance(best, gap_before, best_gap, dual_value(scores, probs, answers, best),
                   index + 1)


def balance_target(
    defense: GRAD2, references: Tensor, probs: Tensor, steps: int = 600, batch_size: int = 500
) -> tuple[Target, Balance]:
    """A GRAD² defense's target shifted so that its answers keep the clean mean answer on
    ``references`` ``[N, ...]`` (clean victim probabilities ``probs`` ``[N, K]``).

    ``defense`` is a :class:`grad2.defenses.GRAD2` with a fixed target (its epsilon and
    ``preserve_top1`` are the ones balanced for). Returns the shifted target (serve it
    with ``target: file``) and the :class:`Balance`. Raises ``ValueError`` where the
    surrogate's last linear layer does not carry the offsets into its scores (checked on
    the first references).
    """
    if getattr(defense, "target", None) is None:
        raise ValueError("balancing needs a GRAD2 defense with a fixed target")
    scores = torch.cat([
        defense.scores(references[start:start + batch_size], probs[start:start + batch_size])
        for start in range(0, len(references), batch_size)
    ])
    balance = balance_offsets(scores, probs, defense.solve, steps)
    shifted = targets.shift_scores(defense.surrogate, defense.target, balance.offsets)
    _check_shift(defense, shifted, references[:64], probs[:64], scores[:64], balance.offsets)
    return shifted, balance


def _check_shift(defense: GRAD2, shifted: Target, x: Tensor, probs: Tensor, scores: Tensor,
                 offsets: Tensor) -> None:
    """The shifted target's scores must be ``scores + offsets`` up to a constant per query
    (not so, e.g., for an ensemble whose last linear layer is one member's)."""
    served = GRAD2(defense.surrogate, defense.epsilon, shifted, defense.score_method,
                   defense.preserve_top1)
    excess = served.scores(x, probs).double() - scores.double() - offsets.double()
    spread = float(scores.double().std(dim=1).mean())
    if float((excess - excess.mean(dim=1, keepdim=True)).abs().max()) > 1e-3 * spread + 1e-5:
        raise ValueError("the surrogate's last nn.Linear bias does not add per-class offsets "
                         "to its scores (an ensemble?): this target cannot be balanced")
