"""The exact GRAD² solver (``grad2.redirect``): optimality against an LP solver, invariants.

The LP check formulates ``max c·ỹ`` over the simplex with ``‖ỹ − y‖₁ ≤ ε`` (and, with
``preserve_top1``, ``ỹ_a ≥ ỹ_j``) independently, with auxiliary variables ``d ≥ |ỹ − y|``,
and solves it with HiGHS at tightened tolerances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lp import HIGHS_OPTIONS, answer_constraints
from scipy.optimize import linprog

from grad2.redirect import redirect, separate_top

torch.set_num_threads(1)

def lp_optimum(y: np.ndarray, c: np.ndarray, epsilon: float, preserve_top1: bool) -> float:
    """Optimal value of the GRAD² LP, from HiGHS."""
    a_ub, b_ub, a_eq, b_eq = answer_constraints(y, epsilon, preserve_top1)
    result = linprog(
        np.concatenate([-c, np.zeros(len(y))]), A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq,
        bounds=(0, None), method="highs", options=HIGHS_OPTIONS,
    )
    assert result.status == 0, result.message
    return -result.fun


def random_probs(rng: np.random.Generator, batch: int, k: int) -> np.ndarray:
    """Rows from very peaked to nearly flat, some with exact zeros and exact ties."""
    temperature = rng.choice([0.1, 0.5, 2.0, 8.0], size=(batch, 1))
    logits = rng.normal(size=(batch, k)) * temperature
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    if batch >= 4:
        probs[0] = 1.0 / k  # flat: every class tied
        probs[1] = 0.0
        probs[1, rng.integers(k)] = 1.0  # one-hot
        probs[2, rng.integers(k)] = 0.0  # a zero
        probs[2] /= probs[2].sum()
    return probs


def random_scores(rng: np.random.Generator, batch: int, k: int) -> np.ndarray:
    scores = rng.normal(size=(batch, k))
    ties = rng.random(batch) < 0.25
    scores[ties] = np.round(scores[ties] * 2)  # many exact ties
    return scores


def random_epsilons(rng: np.random.Generator, batch: int) -> np.ndarray:
    eps = rng.uniform(0, 2, size=batch)
    special = rng.random(batch)
    eps[special < 0.05] = 0.0
    eps[(special >= 0.05) & (special < 0.1)] = 2.0
    return eps


def check_against_lp(y, c, eps, preserve_top1: bool) -> float:
    """Solve a batch with :func:`redirect`, each row with HiGHS; return the largest gap."""
    defended = redirect(
        torch.from_numpy(y), torch.from_numpy(c), torch.from_numpy(eps), preserve_top1
    ).numpy()
    worst = 0.0
    for row in range(len(y)):
        z, yr, cr, er = defended[row], y[row], c[row], float(eps[row])
        # ε = 0 leaves y as the only feasible point (HiGHS may call it infeasible at
        # tight tolerances when y has entries of 1e-20).
        optimum = float(cr @ yr) if er == 0 else lp_optimum(yr, cr, er, preserve_top1)
        gap = optimum - float(cr @ z)
        assert abs(gap) <= 1e-6, (row, len(yr), er, preserve_top1, gap)
        assert z.min() >= 0
        assert abs(z.sum() - 1) <= 1e-9
        assert np.abs(z - yr).sum() <= er + 1e-9
        if preserve_top1:
            assert z.max() <= z[np.argmax(yr)] + 1e-12
        worst = max(worst, abs(gap))
    return worst


@pytest.mark.parametrize("preserve_top1", [False, True], ids=["plain", "top1"])
def test_matches_linprog_on_many_small_instances(preserve_top1):
    rng = np.random.default_rng(2022 + preserve_top1)
    count = 0
    # 1,150 instances per mode: K from 2 to 300, most small (where corner cases live).
    for k, batch in [(2, 150), (3, 150), (4, 120), (5, 120), (7, 100), (10, 150),
                     (16, 100), (32, 100), (64, 60), (100, 40), (300, 15)]:
        y, c, eps = random_probs(rng, batch, k), random_scores(rng, batch, k), random_epsilons(
            rng, batch
        )
        check_against_lp(y, c, eps, preserve_top1)
        count += batch
    assert count >= 1000


@pytest.mark.parametrize("preserve_top1", [False, True], ids=["plain", "top1"])
def test_matches_linprog_at_k_1000(preserve_top1):
    rng = np.random.default_rng(7 + preserve_top1)
    k = 1000
    y = random_probs(rng, 6, k)
    y[3] = np.exp(rng.normal(size=k) * 0.1)  # flat
    y[3] /= y[3].sum()
    y[4] = np.exp(rng.normal(size=k) * 10)  # peaked
    y[4] /= y[4].sum()
    c = random_scores(rng, 6, k)
    eps = np.array([0.05, 0.5, 1.0, 1.5, 2.0, 0.3])
    check_against_lp(y, c, eps, preserve_top1)


# ---------------------------------------------------------------------------------------
# Properties (hypothesis)


@st.composite
def instances(draw, max_batch: int = 6, max_k: int = 12):
    batch = draw(st.integers(1, max_batch))
    k = draw(st.integers(2, max_k))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    probs = torch.from_numpy(random_probs(rng, batch, k))
    if draw(st.booleans()):
        scores = torch.from_numpy(rng.integers(-2, 3, size=(batch, k)).astype(np.float64))
    else:
        scores = torch.from_numpy(rng.normal(size=(batch, k)))
    eps = draw(
        st.one_of(
            st.sampled_from([0.0, 2.0, 1e-12, 1.0]),
            st.floats(0, 2, allow_nan=False, allow_subnormal=False),
        )
    )
    return probs, scores, eps


PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
#: For properties that solve every row again on its own (the top-1 solver takes ~20 ms a call).
FEWER_EXAMPLES = settings(PROPERTY_SETTINGS, max_examples=40)


@PROPERTY_SETTINGS
@given(instances(), st.booleans())
def test_simplex_and_budget(instance, preserve_top1):
    probs, scores, eps = instance
    defended = redirect(probs, scores, eps, preserve_top1)
    assert defended.dtype == probs.dtype and defended.shape == probs.shape
    assert (defended >= 0).all()
    assert torch.allclose(defended.sum(1), torch.ones(len(probs), dtype=probs.dtype), atol=1e-12)
    assert ((defended - probs).abs().sum(1) <= eps + 1e-9).all()


@PROPERTY_SETTINGS
@given(instances())
def test_top1_constraint_holds(instance):
    probs, scores, eps = instance
    defended = redirect(probs, scores, eps, preserve_top1=True)
    top_level = defended.gather(1, probs.argmax(1, keepdim=True))
    assert (defended <= top_level + 1e-12).all()


@PROPERTY_SETTINGS
@given(instances(), st.booleans())
def test_epsilon_zero_is_bit_exact_identity(instance, preserve_top1):
    probs, scores, _ = instance
    assert torch.equal(redirect(probs, scores, 0.0, preserve_top1), probs)
    zeros = torch.zeros(len(probs), dtype=probs.dtype)
    assert torch.equal(redirect(probs, scores, zeros, preserve_top1), probs)


@PROPERTY_SETTINGS
@given(instances(), st.booleans())
def test_float_epsilon_equals_tensor_epsilon(instance, preserve_top1):
    probs, scores, eps = instance
    as_float = redirect(probs, scores, eps, preserve_top1)
    as_tensor = redirect(
        probs, scores, torch.full((len(probs),), eps, dtype=probs.dtype), preserve_top1
    )
    assert torch.equal(as_float, as_tensor)


@FEWER_EXAMPLES
@given(instances(max_batch=5), st.booleans(), st.integers(0, 2**32 - 1))
def test_rows_are_independent(instance, preserve_top1, seed):
    probs, scores, _ = instance
    eps = torch.from_numpy(np.random.default_rng(seed).uniform(0, 2, len(probs)))
    batch = redirect(probs, scores, eps, preserve_top1)
    for row in range(len(probs)):
        alone = redirect(probs[row : row + 1], scores[row : row + 1], eps[row : row + 1],
                         preserve_top1)
        assert torch.equal(alone[0], batch[row])
    # And in reverse order (a different batch layout).
    reversed_batch = redirect(probs.flip(0), scores.flip(0), eps.flip(0), preserve_top1)
    assert torch.equal(reversed_batch.flip(0), batch)


@PROPERTY_SETTINGS
@given(instances())
def test_moves_the_closed_form_mass_to_the_first_best_class(instance):
    probs, scores, eps = instance
    defended = redirect(probs, scores, eps)
    receiver = scores.argmax(1)
    # Lowest index among tied maxima:
    for row in range(len(probs)):
        best = scores[row].max()
        assert receiver[row] == int(torch.nonzero(scores[row] == best)[0])
    y_receiver = probs.gather(1, receiver[:, None]).squeeze(1)
    half = torch.tensor(eps / 2, dtype=torch.float64)
    mass = torch.clamp(torch.minimum(half, 1 - y_receiver), min=0)
    gained = defended.gather(1, receiver[:, None]).squeeze(1) - y_receiver
    assert torch.allclose(gained, mass, atol=1e-12, rtol=0)
    # The L1 spent is exactly 2m: every other class only loses mass.
    others = torch.ones_like(probs, dtype=torch.bool).scatter_(1, receiver[:, None], False)
    assert ((defended <= probs + 1e-15) | ~others).all()
    assert torch.allclose((defended - probs).abs().sum(1), 2 * mass, atol=1e-12, rtol=0)


@PROPERTY_SETTINGS
@given(instances())
def test_donors_give_in_increasing_score_order(instance):
    probs, scores, eps = instance
    defended = redirect(probs, scores, eps)
    taken = (probs - defended).clamp_min(0)
    for row in range(len(probs)):
        receiver = int(scores[row].argmax())
        donors = [j for j in range(probs.shape[1]) if j != receiver]
        # If a donor gives anything, every donor with a strictly lower score is emptied.
        for j in donors:
            if taken[row, j] > 1e-15:
                lower = [i for i in donors if scores[row, i] < scores[row, j]]
                assert all(defended[row, i] <= 1e-15 for i in lower)


def test_ties_go_to_the_lowest_index_deterministically():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    scores = torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    first = redirect(probs, scores, 0.2)
    assert torch.equal(first, redirect(probs, scores, 0.2))
    # Receiver: class 1 (first of the tied best 1 and 3); donors with tied score 0:
    # class 0 first (lowest index), then class 2.
    expected = torch.tensor([[0.0, 0.3, 0.3, 0.4]], dtype=torch.float64)
    assert torch.allclose(first, expected, atol=1e-15, rtol=0)
    expected = torch.tensor([[0.0, 0.5, 0.1, 0.4]], dtype=torch.float64)
    assert torch.allclose(redirect(probs, scores, 0.6), expected, atol=1e-15, rtol=0)


def test_hand_worked_plain_example():
    probs = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    scores = torch.tensor([[0.0, -1.0, 2.0]], dtype=torch.float64)
    # m = min(0.5/2, 1 − 0.1) = 0.25, taken from class 1 (score −1) first.
    expected = torch.tensor([[0.6, 0.05, 0.35]], dtype=torch.float64)
    assert torch.allclose(redirect(probs, scores, 0.5), expected, atol=1e-15, rtol=0)
    # With the whole budget the receiver takes everything it can.
    expected = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(redirect(probs, scores, 2.0), expected, atol=1e-15, rtol=0)


def test_hand_worked_top1_example():
    # Top class 0 (0.5). The best receiver, class 2, may rise only to the top's level:
    # with ε = 0.6 the optimum raises class 2 from 0.2 to 0.4 = L and lowers class 1.
    probs = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    scores = torch.tensor([[0.0, -1.0, 1.0]], dtype=torch.float64)
    defended = redirect(probs, scores, 0.6, preserve_top1=True)
    value = float((scores * defended).sum())
    assert value == pytest.approx(lp_optimum(probs[0].numpy(), scores[0].numpy(), 0.6, True),
                                  abs=1e-9)
    assert defended[0, 2] <= defended[0, 0] + 1e-12
    assert (defended - probs).abs().sum() <= 0.6 + 1e-9


def test_float32_is_supported():
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(random_probs(rng, 16, 10)).float()
    probs /= probs.sum(1, keepdim=True)
    scores = torch.from_numpy(random_scores(rng, 16, 10)).float()
    for preserve_top1 in (False, True):
        defended = redirect(probs, scores, 0.7, preserve_top1)
        assert defended.dtype == torch.float32
        assert (defended >= 0).all()
        assert ((defended - probs).abs().sum(1) <= 0.7 + 1e-5).all()


@pytest.mark.parametrize(
    "epsilon",
    [math.nan, -0.1, 2.5, torch.tensor([0.1, math.nan]), torch.tensor([0.1, -1e-9]),
     torch.tensor([0.1, 0.2, 0.3]), torch.tensor([[0.1], [0.2]])],
    ids=["nan", "negative", "above-2", "tensor-nan", "tensor-negative", "tensor-wrong-length",
         "tensor-2d"],
)
@pytest.mark.parametrize("preserve_top1", [False, True], ids=["plain", "top1"])
def test_invalid_epsilon_raises(epsilon, preserve_top1):
    probs = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    scores = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="epsilon"):
        redirect(probs, scores, epsilon, preserve_top1)


@pytest.mark.parametrize(
    ("probs_shape", "scores_shape"),
    [((2, 3), (2, 4)), ((2, 3), (3, 3)), ((3,), (3,)), ((1, 2, 3), (1, 2, 3))],
)
def test_shape_mismatch_raises(probs_shape, scores_shape):
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        redirect(torch.full(probs_shape, 0.5), torch.zeros(scores_shape), 0.1)


def test_non_finite_scores_raise():
    probs = torch.full((1, 3), 1 / 3)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            redirect(probs, torch.tensor([[0.0, bad, 1.0]]), 0.1)


# ---------------------------------------------------------------------------------------
# separate_top


@PROPERTY_SETTINGS
@given(instances(max_batch=8, max_k=20))
def test_separate_top_keeps_the_clean_argmax_within_budget(instance):
    probs, scores, eps = instance
    # The defenses' rule: a margin of 1e-6, smaller when the budget cannot pay for it.
    margin = min(1e-6, eps / (2 * (probs.shape[1] - 1)))
    reserve = 2 * margin * (probs.shape[1] - 1)
    budget = max(eps - reserve, 0.0)
    defended = separate_top(redirect(probs, scores, budget, preserve_top1=True), probs, margin)
    assert torch.equal(defended.argmax(1), probs.argmax(1))
    assert ((defended - probs).abs().sum(1) <= eps + 1e-9).all()
    assert (defended >= 0).all()
    assert torch.allclose(defended.sum(1), torch.ones(len(probs), dtype=probs.dtype), atol=1e-12)


def test_separate_top_on_exact_ties():
    # Clean argmax 1 (first maximum) tied with 2; the tie is broken toward 1 by `margin`.
    probs = torch.tensor([[0.2, 0.4, 0.4]], dtype=torch.float64)
    separated = separate_top(probs, probs, 0.01)
    assert torch.allclose(separated, torch.tensor([[0.2, 0.41, 0.39]], dtype=torch.float64))
    # Classes already more than `margin` below the top are left alone.
    probs = torch.tensor([[0.1, 0.6, 0.3]], dtype=torch.float64)
    assert torch.equal(separate_top(probs, probs, 0.01), probs)
