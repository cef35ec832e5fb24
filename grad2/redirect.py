"""The exact GRAD² solver: move probability mass toward high scores within an L1 budget.

For each row, given clean probabilities ``y`` (on the simplex), scores ``c`` and a budget
``epsilon``, :func:`redirect` returns

    argmax_ỹ  c·ỹ   subject to  ỹ ≥ 0,  Σ ỹ = 1,  ‖ỹ − y‖₁ ≤ epsilon
                    [and ỹ_a ≥ ỹ_j for all j, a = argmax y,  when preserve_top1]

Everything is batched: sorts, cumulative sums, clamps and scatters over ``[B, K]``
tensors, no Python loop over rows or classes.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: How far a top-1-preserving answer keeps the clean top class above every other class,
#: so that a client's ``argmax`` never reads a tie as a flip (:func:`solve_answers`).
TOP1_MARGIN = 1e-6

#: Iterations of the golden-section search over the top class's level (preserve_top1).
#: The bracket shrinks by 0.618 per step: 80 steps take a width-1 bracket below 1e-16.
_GOLDEN_STEPS = 80
_INV_PHI = (5**0.5 - 1) / 2


def redirect(
    probs: Tensor, scores: Tensor, epsilon: float | Tensor, preserve_top1: bool = False
) -> Tensor:
    """Solve the GRAD² linear program exactly for every row.

    Args:
        probs: ``[B, K]`` clean probabilities, each row on the simplex.
        scores: ``[B, K]`` redirection scores ``c = G t`` (larger = better receiver).
        epsilon: L1 budget in ``[0, 2]``, a float or a ``[B]`` tensor.
        preserve_top1: also require ``ỹ_a ≥ ỹ_j`` for the clean top class ``a``
            (lowest index among ties), so the returned label never flips.

    Returns:
        ``[B, K]`` defended probabilities, same dtype as ``probs``. ``epsilon = 0``
        returns ``probs`` unchanged. Ties are broken by class index, so the result is a
        pure function of the row.

    Without the top-1 constraint: let ``k*`` be the first argmax of ``c``; move
    ``m = min(ε/2, 1 − y_k*)`` onto ``k*``, taking it from the other classes in
    increasing order of ``c``. Moving a unit from ``j`` to ``i`` gains ``c_i − c_j`` and
    costs 2 of L1, so no exchange improves this point: it is optimal.

    With the top-1 constraint (see :func:`_redirect_top1`): fixing the top level
    ``L = ỹ_a`` turns ``ỹ_j ≤ ỹ_a`` into boxes ``0 ≤ ỹ_j ≤ L``, where the same exchange
    argument makes a fill-from-the-top / drain-from-the-bottom greedy optimal; and the
    best value ``V(L)`` is concave in ``L`` (a linear objective maximised over parallel
    slices of a convex set), so a golden-section search over the feasible ``L`` finds
    the optimum. The plain greedy with a cap is not enough: the top class may have to
    give mass away (and the receiver rise to meet it), or rise together with it.
    """
    probs, scores, epsilon = _check_inputs(probs, scores, epsilon)
    if preserve_top1:
        return _redirect_top1(probs, scores, epsilon)
    return _redirect_free(probs, scores, epsilon)


def separate_top(defended: Tensor, probs: Tensor, margin: float | Tensor) -> Tensor:
    """Make the clean top class lead every other class of ``defended`` by ``margin``.

    The top-1-preserving optimum often ties the top class with others (``ỹ_a = ỹ_j``),
    which a client's ``argmax`` may resolve either way. This moves ``margin`` from each
    tied class to the top class, at an L1 cost of ``2 · margin`` per tied class
    (``≤ 2 · margin · (K − 1)``; reserve it from the budget). ``margin``: a float or a
    ``[B, 1]`` tensor (one per row).
    """
    top = probs.argmax(dim=1, keepdim=True)
    top_level = defended.gather(1, top)
    is_top = torch.zeros_like(defended, dtype=torch.bool).scatter_(1, top, True)
    shortfall = (defended - (top_level - margin)).clamp_min(0).masked_fill(is_top, 0)
    separated = defended - shortfall
    return separated.scatter_add_(1, top, shortfall.sum(dim=1, keepdim=True))


def _check_inputs(
    probs: Tensor, scores: Tensor, epsilon: float | Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    if probs.ndim != 2 or scores.shape != probs.shape:
        raise ValueError(
            f"probs and scores must both be [B, K]; got {tuple(probs.shape)} and "
            f"{tuple(scores.shape)}"
        )
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite")
    epsilon = torch.as_tensor(epsilon, dtype=probs.dtype, device=probs.device)
    if epsilon.ndim == 0:
        epsilon = epsilon.expand(probs.shape[0])
    if epsilon.shape != probs.shape[:1]:
        raise ValueError(f"epsilon must be a float or a [B] tensor, got {tuple(epsilon.shape)}")
    if torch.isnan(epsilon).any() or (epsilon < 0).any() or (epsilon > 2).any():
        raise ValueError("epsilon must lie in [0, 2]")
    return probs, scores.to(probs.dtype), epsilon


def _redirect_free(probs: Tensor, scores: Tensor, epsilon: Tensor) -> Tensor:
    receiver = scores.argmax(dim=1, keepdim=True)  # first maximum: lowest index on ties
    mass = torch.minimum(epsilon / 2, 1 - probs.gather(1, receiver).squeeze(1))
    mass = mass.clamp_min(0)
    is_receiver = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, receiver, True)
    # Donors in increasing score; the receiver sorts last and has nothing to give.
    donor_scores = scores.masked_fill(is_receiver, torch.inf)
    order = torch.sort(donor_scores, dim=1, stable=True).indices
    available = probs.masked_fill(is_receiver, 0).gather(1, order)
    taken = _take_in_order(available, mass)
    removed = torch.zeros_like(probs).scatter_(1, order, taken)
    defended = (probs - removed).clamp_min(0)
    return defended.scatter_add_(1, receiver, mass.unsqueeze(1))


def _take_in_order(available: Tensor, amount: Tensor) -> Tensor:
    """Take ``amount[b]`` from ``available[b]`` left to right; ``[B, K]`` amounts taken."""
    before = available.cumsum(dim=1) - available
    return torch.minimum(available, (amount.unsqueeze(1) - before).clamp_min(0))


def _redirect_top1(probs: Tensor, scores: Tensor, epsilon: Tensor) -> Tensor:
    """Top-1-preserving solver: golden-section search over ``L = ỹ_a``."""
    num_classes = probs.shape[1]
    top = probs.argmax(dim=1, keepdim=True)
    is_top = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top, True)
    top_prob = probs.gather(1, top).squeeze(1)
    top_score = scores.gather(1, top).squeeze(1)
    others = probs.masked_fill(is_top, 0)
    boxes = _BoxProblem(others, scores, is_top)

    low = _lowest_top_level(others, top_prob, epsilon, num_classes)
    high = torch.minimum(top_prob + epsilon / 2, torch.ones_like(top_prob))
    high = torch.maximum(high, low)

    # Both interior points of every row are evaluated in one pass over a doubled batch
    # (rows are independent, so each value is exactly what a pass of its own would give):
    # half the tensor operations, which dominate at serving batch sizes.
    pair = boxes.repeated(2)
    epsilon2, top_prob2, top_score2 = epsilon.repeat(2), top_prob.repeat(2), top_score.repeat(2)
    batch = probs.shape[0]

    def values(inner_low: Tensor, inner_high: Tensor) -> tuple[Tensor, Tensor]:
        level = torch.cat([inner_low, inner_high])
        budget = epsilon2 - (level - top_prob2).abs()
        both = top_score2 * level + pair.value(level, budget)
        return both[:batch], both[batch:]

    # Golden-section search, vectorised over rows (each row has its own bracket).
    for _ in range(_GOLDEN_STEPS):
        step = _INV_PHI * (high - low)
        inner_low, inner_high = high - step, low + step
        value_low, value_high = values(inner_low, inner_high)
        go_up = value_low <= value_high  # concave: a maximiser is above inner_low
        low = torch.where(go_up, inner_low, low)
        high = torch.where(go_up, high, inner_high)
    level = (low + high) / 2
    # epsilon = 0 (or a collapsed bracket) must give probs back bit for bit.
    level = torch.where(epsilon == 0, top_prob, level)
    budget = (epsilon - (level - top_prob).abs()).clamp_min(0)
    defended = boxes.solution(level, budget)
    defended = defended.masked_scatter(is_top, level.to(probs.dtype))
    unchanged = (epsilon == 0).unsqueeze(1)
    return torch.where(unchanged, probs, defended)


def _lowest_top_level(
    others: Tensor, top_prob: Tensor, epsilon: Tensor, num_classes: int
) -> Tensor:
    """Smallest feasible ``L = ỹ_a`` (exactly, from the piecewise-linear cost).

    Lowering the top class to ``L`` forces every other class above ``L`` down to ``L``
    and the freed mass onto classes below ``L``: L1 cost ``2 (y_a − L + Σ_j (y_j − L)⁺)``,
    decreasing in ``L``. It must stay within ``epsilon``, and ``K·L ≥ 1`` (room).
    """
    descending = torch.sort(others, dim=1, descending=True).values
    prefix = descending.cumsum(dim=1)  # sum of the m + 1 largest others, m = 0..K-1
    count = torch.arange(1, num_classes + 1, dtype=others.dtype, device=others.device)
    # Candidate root with the m largest others above L: y_a + S_m − (m+1) L = ε/2.
    shifted = torch.cat([torch.zeros_like(prefix[:, :1]), prefix[:, :-1]], dim=1)
    candidate = (top_prob.unsqueeze(1) + shifted - epsilon.unsqueeze(1) / 2) / count
    upper = torch.cat([top_prob.unsqueeze(1), descending[:, :-1]], dim=1)
    valid = (candidate <= upper) & (candidate >= descending)
    root = candidate.masked_fill(~valid, -torch.inf).amax(dim=1)
    root = torch.where(torch.isfinite(root), root, torch.zeros_like(root))
    return torch.clamp(root, min=1.0 / num_classes).minimum(top_prob)


class _BoxProblem:
    """For a top level ``L``: max ``Σ c_j ỹ_j`` over ``j ≠ a`` with ``0 ≤ ỹ_j ≤ L``,
    ``Σ ỹ_j = 1 − L`` and ``Σ |ỹ_j − y_j| ≤ budget``. The score orders do not depend on
    ``L``, so they are sorted once per batch.
    """

    def __init__(self, others: Tensor, scores: Tensor, is_top: Tensor) -> None:
        self.others = others
        self.is_top = is_top
        # Fill from the highest score, drain from the lowest; the top class takes no part.
        self.fill_order = torch.sort(
            scores.masked_fill(is_top, -torch.inf), dim=1, descending=True, stable=True
        ).indices
        self.drain_order = torch.sort(
            scores.masked_fill(is_top, torch.inf), dim=1, stable=True
        ).indices
        self.fill_scores = scores.gather(1, self.fill_order)
        self.drain_scores = scores.gather(1, self.drain_order)
        self.scores_without_top = scores.masked_fill(is_top, 0)

    def repeated(self, times: int) -> _BoxProblem:
        """The same problem for a batch of ``times`` copies of the rows (no re-sorting)."""
        copy = object.__new__(_BoxProblem)
        for name, tensor in vars(self).items():
            setattr(copy, name, tensor.repeat(times, 1))
        return copy

    def _plan(self, level: Tensor, budget: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Clipped start, amounts added per class (fill order), removed (drain order)."""
        cap = level.unsqueeze(1).expand_as(self.others).masked_fill(self.is_top, 0)
        clipped = torch.minimum(self.others, cap)
        clip_cost = (self.others - clipped).sum(dim=1)
        shortfall = (1 - level) - clipped.sum(dim=1)  # > 0: must add; < 0: must remove
        forced_fill, forced_drain = shortfall.clamp_min(0), (-shortfall).clamp_min(0)

        room = (cap - clipped).gather(1, self.fill_order)
        stock = clipped.gather(1, self.drain_order)
        room_cum, stock_cum = room.cumsum(dim=1), stock.cumsum(dim=1)

        # Extra mass s swapped from the lowest to the highest scores: gain is concave in s,
        # with breakpoints where a fill or drain class is exhausted. Stop at the first
        # breakpoint after which filling no longer beats draining.
        breakpoints = torch.cat(
            [
                torch.zeros_like(level).unsqueeze(1),
                room_cum - forced_fill.unsqueeze(1),
                stock_cum - forced_drain.unsqueeze(1),
            ],
            dim=1,
        ).clamp_min(0)
        filler = _first_exceeding(room_cum, forced_fill.unsqueeze(1) + breakpoints)
        drainer = _first_exceeding(stock_cum, forced_drain.unsqueeze(1) + breakpoints)
        num_classes = self.others.shape[1]
        exhausted = (filler >= num_classes) | (drainer >= num_classes)
        gain = self.fill_scores.gather(1, filler.clamp_max(num_classes - 1)) - (
            self.drain_scores.gather(1, drainer.clamp_max(num_classes - 1))
        )
        stops = breakpoints.masked_fill((gain > 0) & ~exhausted, torch.inf)
        swap = stops.amin(dim=1)
        swap_budget = (budget - clip_cost - shortfall.abs()) / 2
        swap = torch.minimum(swap, swap_budget).clamp_min(0)

        added = _take_in_order(room, forced_fill + swap)
        removed = _take_in_order(stock, forced_drain + swap)
        return clipped, added, removed

    def value(self, level: Tensor, budget: Tensor) -> Tensor:
        """``[B]`` optimal objective over the non-top classes at top level ``level``."""
        clipped, added, removed = self._plan(level, budget)
        return (
            (self.scores_without_top * clipped).sum(dim=1)
            + (self.fill_scores * added).sum(dim=1)
            - (self.drain_scores * removed).sum(dim=1)
        )

    def solution(self, level: Tensor, budget: Tensor) -> Tensor:
        clipped, added, removed = self._plan(level, budget)
        result = clipped.clone()
        result.scatter_add_(1, self.fill_order, added)
        result.scatter_add_(1, self.drain_order, -removed)
        return result.clamp_min(0)


def _first_exceeding(cumulative: Tensor, thresholds: Tensor) -> Tensor:
    """Index of the first entry of each (nondecreasing) ``cumulative`` row > threshold."""
    return torch.searchsorted(cumulative.contiguous(), thresholds.contiguous(), right=True)


def solve_answers(probs: Tensor, scores: Tensor, epsilon: float | Tensor,
                  preserve_top1: bool) -> Tensor:
    """``[B, K]`` answers of the redirection LP for ``scores`` ``[B, K]`` within ``epsilon``
    (a float or a ``[B]`` tensor); with ``preserve_top1`` the clean top class is kept
    :data:`TOP1_MARGIN` above every other class, that margin paid from the budget."""
    if not preserve_top1:
        return redirect(probs, scores, epsilon)
    # Reserve the L1 that separating ties costs, then separate; a budget too small for
    # the full margin gets a smaller one, so the answer never spends more than epsilon.
    others = max(probs.shape[1] - 1, 1)
    if isinstance(epsilon, Tensor):
        margin = (epsilon.to(probs.dtype) / (2 * others)).clamp(max=TOP1_MARGIN).unsqueeze(1)
        budget = (epsilon.to(probs.dtype) - 2 * margin.squeeze(1) * others).clamp_min(0)
    else:
        margin = min(TOP1_MARGIN, epsilon / (2 * others))
        budget = max(epsilon - 2 * margin * others, 0.0)
    defended = redirect(probs, scores, budget, preserve_top1=True)
    return separate_top(defended, probs, margin)


def push_scores(probs: Tensor, receivers: Tensor) -> Tensor:
    """``[B, K]`` scores that send the budget to ``receivers`` ``[B]``, taken from the
    likeliest classes first."""
    return (-probs).scatter(1, receivers.unsqueeze(1), 2.0)
