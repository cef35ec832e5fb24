"""Defenses (``grad2.defenses``): GRAD², the baselines and the controls on checkable cases."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from grad2 import targets
from grad2.defenses import (
    GRAD2,
    MAD,
    MADArgmax,
    NoDefense,
    RandomNoise,
    ReverseSigmoid,
    Rounding,
    Top1,
    build_defense,
    last_layer_mad_deviation,
)
from grad2.lab.controls import FixedClassPush, MinIPGRAD2, RandomScores, ShuffledScores
from grad2.redirect import TOP1_MARGIN, redirect
from grad2.scores import redirection_scores

torch.set_num_threads(1)

K = 6


def surrogate_net(num_classes: int = K) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(),
        nn.Linear(16, num_classes),
    )


def warmed(model: nn.Module, dtype=torch.float64, side: int = 12) -> nn.Module:
    model = model.to(dtype).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, side, side, dtype=dtype))
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = warmed(surrogate_net())
    x = torch.randn(12, 1, 12, 12, dtype=torch.float64)
    logits = torch.randn(12, K, dtype=torch.float64) * torch.linspace(0.2, 5, 12)[:, None]
    probs = torch.softmax(logits, dim=1)
    probs[0] = 1 / K  # all tied
    probs[1] = torch.tensor([0.4, 0.4, 0.1, 0.05, 0.05, 0.0], dtype=torch.float64)  # top tie
    return model, x, probs


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().sum(dim=1)


def assert_simplex(defended: torch.Tensor, atol: float = 1e-12) -> None:
    assert (defended >= 0).all()
    assert torch.allclose(defended.sum(1), torch.ones_like(defended[:, 0]), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------
# Simple baselines, by hand


def test_no_defense_returns_a_copy():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    out = NoDefense()(torch.zeros(1, 2), probs)
    assert torch.equal(out, probs) and out.data_ptr() != probs.data_ptr()


def test_top1_is_the_one_hot_label():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.0, 0.0, 1.0]])
    expected = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.equal(Top1()(torch.zeros(3, 1), probs), expected)


def test_rounding_by_hand():
    probs = torch.tensor([[0.123456, 0.876544]], dtype=torch.float64)
    assert torch.allclose(Rounding(2)(torch.zeros(1), probs),
                          torch.tensor([[0.12, 0.88]], dtype=torch.float64))
    assert torch.allclose(Rounding(4)(torch.zeros(1), probs),
                          torch.tensor([[0.1235, 0.8765]], dtype=torch.float64))
    assert torch.equal(Rounding(0)(torch.zeros(1), probs),
                       torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    for bad in (-1, 9, 2.5, "2"):
        with pytest.raises(ValueError, match="decimals"):
            Rounding(bad)


def test_reverse_sigmoid_by_hand():
    beta, gamma = 0.7, 0.4
    y = [0.7, 0.2, 0.1]

    def sigmoid(v):
        return 1 / (1 + math.exp(-v))

    raw = [max(p - beta * (sigmoid(gamma * math.log(p / (1 - p))) - 0.5), 0.0) for p in y]
    expected = torch.tensor([[r / sum(raw) for r in raw]], dtype=torch.float64)
    # Worked once with a calculator: raw ≈ [0.6413, 0.2946, 0.2446], sum ≈ 1.1805.
    assert torch.allclose(expected, torch.tensor([[0.5432, 0.2496, 0.2072]],
                                                 dtype=torch.float64), atol=2e-4)
    out = ReverseSigmoid(beta, gamma)(torch.zeros(1, 1), torch.tensor([y], dtype=torch.float64))
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)
    assert out.argmax() == 0  # keeps the label here


def test_reverse_sigmoid_can_flip_the_label():
    # γ = 1: σ(σ⁻¹(y)) = y, so raw = y − β (y − ½) = [0.9 − 20, 0.1 + 20] → clipped [0, 20.1]:
    # a strong reverse sigmoid flips labels (why the config refuses preserve_top1 with it).
    probs = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    out = ReverseSigmoid(beta=50.0, gamma=1.0)(torch.zeros(1, 1), probs)
    assert torch.allclose(out, torch.tensor([[0.0, 1.0]], dtype=torch.float64), atol=1e-15)
    for kwargs in ({"beta": -1.0}, {"gamma": 0.0}, {"beta": math.nan}, {"gamma": math.inf}):
        with pytest.raises(ValueError):
            ReverseSigmoid(**kwargs)


def test_call_validates_its_inputs():
    defense = Top1()
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        defense(torch.zeros(2, 3), torch.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        defense(torch.zeros(3, 3), torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="non-finite"):
        defense(torch.zeros(1, 3), torch.tensor([[0.5, math.nan, 0.5]]))


# ---------------------------------------------------------------------------------------
# Random noise and the controls


def test_random_noise_moves_mass_to_one_non_top_class(setup):
    _, x, probs = setup
    for eps in (0.1, 0.5, 1.3, 2.0):
        out = RandomNoise(eps, seed=3)(x, probs)
        gained = (out - probs).clamp_min(0)
        receiver = gained.argmax(1)
        top = probs.argmax(1)
        for row in range(len(probs)):
            gainers = torch.nonzero(gained[row] > 1e-15).flatten().tolist()
            assert gainers in ([], [int(receiver[row])])
            assert receiver[row] != top[row] or not gainers
            expected = min(eps, 2 * (1 - float(probs[row, receiver[row]])))
            if gainers:
                assert float(l1(out, probs)[row]) == pytest.approx(expected, abs=1e-12)
        assert_simplex(out)


def test_random_noise_hand_case_and_seeding():
    probs = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    out = RandomNoise(0.4, seed=0)(torch.zeros(1, 1), probs)
    receiver = int((out - probs).argmax())
    assert receiver in (1, 2)
    expected = probs.clone()
    expected[0, receiver] += 0.2
    expected[0, 0] -= 0.2  # taken from the likeliest class first
    assert torch.allclose(out, expected, atol=1e-15, rtol=0)
    # Seeded: a new instance with the same seed repeats the sequence; fresh per query.
    a, b = RandomNoise(0.4, seed=5), RandomNoise(0.4, seed=5)
    x, batch = torch.zeros(64, 1), probs.expand(64, 3)
    first = a(x, batch)
    assert torch.equal(first, b(x, batch))
    assert len({int(v) for v in (first - batch).argmax(1)}) == 2  # both non-top classes used


def test_fixed_class_push(setup):
    _, x, probs = setup
    out = FixedClassPush(0.6, receiver=2)(x, probs)
    gained = out[:, 2] - probs[:, 2]
    expected = torch.clamp(torch.minimum(torch.full_like(gained, 0.3), 1 - probs[:, 2]), min=0)
    assert torch.allclose(gained, expected, atol=1e-12, rtol=0)
    assert torch.allclose(l1(out, probs), 2 * expected, atol=1e-12, rtol=0)
    # Taken from the likeliest classes first.
    by_hand = FixedClassPush(0.6, receiver=2)(
        torch.zeros(1, 1), torch.tensor([[0.5, 0.25, 0.0, 0.25]], dtype=torch.float64)
    )
    assert torch.allclose(by_hand, torch.tensor([[0.2, 0.25, 0.3, 0.25]], dtype=torch.float64))
    with pytest.raises(ValueError, match="receiver"):
        FixedClassPush(0.6, receiver=K)(x, probs)
    with pytest.raises(ValueError, match="receiver"):
        FixedClassPush(0.6, receiver=-1)


def test_random_scores_is_the_solver_on_seeded_gaussian_scores(setup):
    _, x, probs = setup
    out = RandomScores(0.8, seed=11)(x, probs)
    noise = torch.randn(probs.shape, generator=torch.Generator().manual_seed(11),
                        dtype=torch.float64)
    assert torch.equal(out, redirect(probs, noise, 0.8))


def test_shuffled_scores_permute_grad2_scores_across_the_batch(setup):
    model, x, probs = setup
    grad2 = GRAD2(model, 0.8)
    shuffled = ShuffledScores(grad2, seed=4)
    permutation = torch.randperm(len(x), generator=torch.Generator().manual_seed(4))
    assert not torch.equal(permutation, torch.arange(len(x)))
    own = grad2.scores(x, probs)
    scores = shuffled.scores(x, probs)
    assert torch.equal(scores, own[permutation])
    assert torch.equal(scores.sort(0).values, own.sort(0).values)  # the same multiset
    shuffled = ShuffledScores(grad2, seed=4)
    assert torch.equal(shuffled(x, probs), redirect(probs, own[permutation], 0.8))


# ---------------------------------------------------------------------------------------
# GRAD²


def test_grad2_equals_solver_on_explicit_scores(setup):
    model, x, probs = setup
    target = targets.random(model, seed=1)
    reference = redirect(probs, redirection_scores(model, x, target, "double_backward"), 0.7)
    for method in ("jvp", "double_backward"):
        out = GRAD2(model, 0.7, target=target, score_method=method)(x, probs)
        assert torch.allclose(out, reference, atol=1e-12, rtol=0)
        assert (l1(out, probs) <= 0.7 + 1e-12).all()
        assert_simplex(out)


def test_grad2_min_ip_uses_the_batch_gradient(setup):
    model, x, probs = setup
    expected_scores = redirection_scores(model, x, targets.min_ip(model, x, probs))
    defense = MinIPGRAD2(model, 0.5)
    assert torch.allclose(defense.scores(x, probs), expected_scores, atol=1e-12, rtol=0)


def test_grad2_rejects_bad_arguments(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match="epsilon"):
        GRAD2(model, -0.1)
    with pytest.raises(ValueError, match="epsilon"):
        GRAD2(model, math.nan)
    with pytest.raises(ValueError, match="score method"):
        GRAD2(model, 0.5, score_method="adjoint")
    with pytest.raises(ValueError, match="target"):
        GRAD2(model, 0.5, target="everything")
    with pytest.raises(ValueError, match="shape"):
        GRAD2(model, 0.5, target={"0.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="surrogate"):
        GRAD2("not a model", 0.5)


def test_grad2_class_count_mismatch(setup):
    model, x, _ = setup
    with pytest.raises(ValueError, match="classes"):
        GRAD2(model, 0.5)(x, torch.full((len(x), K + 1), 1 / (K + 1), dtype=torch.float64))


def test_epsilon_zero_returns_the_clean_answer(setup):
    model, x, probs = setup
    for defense in (GRAD2(model, 0.0), GRAD2(model, 0.0, preserve_top1=True),
                    RandomNoise(0.0), MAD(model, 0.0), MADArgmax(model, 0.0),
                    FixedClassPush(0.0, 1)):
        assert torch.equal(defense(x, probs), probs)


@st.composite
def top1_cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    batch = draw(st.integers(1, 6))
    logits = rng.normal(size=(batch, K)) * draw(st.sampled_from([0.05, 1.0, 6.0]))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    if draw(st.booleans()):  # exact ties for the top
        probs[0] = 0.0
        probs[0, :3] = 1 / 3
    eps = draw(st.one_of(st.sampled_from([1e-9, 1e-7, 2 * TOP1_MARGIN * (K - 1), 2.0]),
                         st.floats(0, 2)))
    return torch.from_numpy(probs), eps, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(top1_cases())
def test_preserve_top1_keeps_the_label_within_budget(setup, case):
    model, _, _ = setup
    probs, eps, seed = case
    x = torch.randn(len(probs), 1, 12, 12, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed % 2**31))
    defenses = [
        GRAD2(model, eps, preserve_top1=True),
        RandomNoise(eps, seed=seed % 1000, preserve_top1=True),
        RandomScores(eps, seed=seed % 1000, preserve_top1=True),
        FixedClassPush(eps, receiver=K - 1, preserve_top1=True),
    ]
    for defense in defenses:
        out = defense(x, probs)
        assert torch.equal(out.argmax(1), probs.argmax(1)), defense
        assert (l1(out, probs) <= eps + 1e-12).all(), (defense, l1(out, probs), eps)
        assert_simplex(out)


def test_preserve_top1_never_flips_where_plain_grad2_does(setup):
    model, x, probs = setup
    plain = GRAD2(model, 1.5)(x, probs)
    kept = GRAD2(model, 1.5, preserve_top1=True)(x, probs)
    assert (plain.argmax(1) != probs.argmax(1)).any()  # the published GRAD² flips labels
    assert torch.equal(kept.argmax(1), probs.argmax(1))
    # The clean top class leads every other class by the margin.
    top = kept.gather(1, probs.argmax(1, keepdim=True))
    others = kept.scatter(1, probs.argmax(1, keepdim=True), -1.0)
    assert (top - others.amax(1, keepdim=True) >= TOP1_MARGIN * (1 - 1e-6)).all()


# ---------------------------------------------------------------------------------------
# MAD


def explicit_last_layer_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, K, P]`` with one backward pass per (query, class), weight then bias."""
    last = model[-1]
    rows = []
    with torch.enable_grad():
        for b in range(len(x)):
            log_probs = torch.log_softmax(model(x[b : b + 1]), dim=-1)[0]
            per_class = []
            for k in range(len(log_probs)):
                gw, gb = torch.autograd.grad(log_probs[k], [last.weight, last.bias],
                                             retain_graph=True)
                per_class.append(torch.cat([gw.flatten(), gb.flatten()]))
            rows.append(torch.stack(per_class))
    return torch.stack(rows)


def angle(u: torch.Tensor, v: torch.Tensor) -> float:
    cosine = float(u @ v / (u.norm() * v.norm()))
    return math.acos(max(-1.0, min(1.0, cosine)))


def test_mad_jacobian_matches_explicit_backward_loop(setup):
    model, x, _ = setup
    jacobian = MAD(model, 0.5).last_layer_jacobian(x)
    assert torch.allclose(jacobian, explicit_last_layer_jacobian(model, x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("eps", [0.2, 0.9, 2.0])
def test_mad_picks_the_vertex_of_largest_angle(setup, eps):
    model, x, probs = setup
    jacobian = explicit_last_layer_jacobian(model, x)
    out = MAD(model, eps)(x, probs)
    assert (l1(out, probs) <= eps + 1e-12).all()
    assert_simplex(out)
    for b in range(len(x)):
        clean = probs[b] @ jacobian[b]
        angles = [angle(jacobian[b, k], clean) for k in range(K)]
        # The answer is y stepped toward one vertex e_k: find it and check it.
        moved = out[b] - probs[b]
        vertex = int(moved.argmax()) if moved.abs().sum() > 0 else None
        if vertex is None:
            continue
        assert angles[vertex] >= max(angles) - 1e-9, (b, vertex, angles)
        alpha = min(1.0, eps / (2 * (1 - float(probs[b, vertex]))))
        expected = (1 - alpha) * probs[b] + alpha * torch.nn.functional.one_hot(
            torch.tensor(vertex), K
        ).double()
        assert torch.allclose(out[b], expected, atol=1e-12, rtol=0)
        assert float(l1(out[b : b + 1], probs[b : b + 1])) == pytest.approx(
            min(eps, 2 * (1 - float(probs[b, vertex]))), abs=1e-12
        )


@pytest.mark.parametrize("eps", [0.2, 0.9, 2.0])
def test_mad_argmax_keeps_the_label(setup, eps):
    model, x, probs = setup
    out = MADArgmax(model, eps)(x, probs)
    keeps = out.argmax(1) == probs.argmax(1)
    # Exact ties in the clean answer (rows 0 and 1) are kept in the weak sense.
    tied = (probs == probs.amax(1, keepdim=True)).sum(1) > 1
    assert (keeps | tied).all()
    top = out.gather(1, probs.argmax(1, keepdim=True))
    assert (out <= top + 1e-12).all()
    assert (l1(out, probs) <= eps + 1e-12).all()
    # Where MAD's own choice keeps the label, MAD-argmax makes the same one.
    mad = MAD(model, eps)(x, probs)
    same = (mad.argmax(1) == probs.argmax(1)) & ~tied
    assert torch.allclose(out[same], mad[same], atol=1e-15, rtol=0)


def test_closed_form_mad_deviation_equals_the_jacobian_one(setup):
    # Two independent computations: the explicit backward loop's Jacobian, and the
    # identity Gᵀa = (a − s) ⊗ [h, 1] (which needs only the surrogate's probabilities s).
    model, x, probs = setup
    jacobian = explicit_last_layer_jacobian(model, x)
    clean = torch.nn.functional.normalize(torch.einsum("bk,bkp->bp", probs, jacobian), dim=1)
    vertices = torch.nn.functional.normalize(jacobian, dim=2)
    expected = (vertices - clean.unsqueeze(1)).pow(2).sum(dim=2)
    with torch.no_grad():
        surrogate_probs = torch.softmax(model(x), dim=1)
    got = last_layer_mad_deviation(surrogate_probs, probs)
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)
    assert torch.allclose(MAD(model, 0.5, closed_form=True).deviation(x, probs), expected,
                          atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls", [MAD, MADArgmax])
@pytest.mark.parametrize("eps", [0.2, 0.9, 2.0])
def test_closed_form_mad_answers_as_the_jacobian_mad(setup, cls, eps):
    model, x, probs = setup
    jacobian_answers = cls(model, eps)(x, probs)
    closed_answers = cls(model, eps, closed_form=True)(x, probs)
    assert torch.allclose(closed_answers, jacobian_answers, atol=1e-12, rtol=0)


def test_closed_form_mad_refuses_a_surrogate_with_a_layer_after_the_last_linear(setup):
    _, x, probs = setup
    torch.manual_seed(1)
    squashed = nn.Sequential(nn.Flatten(), nn.Linear(144, K), nn.Tanh()).double()
    with pytest.raises(ValueError, match=r"last nn\.Linear"):
        MAD(squashed, 0.5, closed_form=True)(x, probs)
    MAD(squashed, 0.5)(x, probs)  # the Jacobian MAD has no such assumption
    with pytest.raises(ValueError, match="closed_form"):
        MAD(squashed, 0.5, closed_form="yes")


def test_mad_needs_a_linear_last_layer():
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        MAD(nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 0.5)


# ---------------------------------------------------------------------------------------
# Batch independence of the whole GRAD² defense, bit for bit.
#
# See tests/test_scores.py for what this needs on a CPU: MKL in strict reproducibility
# mode (MKL_CBWR=AUTO,STRICT, read at MKL's first call, hence the subprocess), and the
# lone-query-as-a-batch-of-two rule in grad2.scores for oneDNN's float32 convolutions.

_BATCH_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from torch import nn
    from grad2 import targets
    from grad2.defenses import GRAD2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = {}
    for dtype in (torch.float32, torch.float64):
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * 7 * 7, 10),
        ).to(dtype)
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(32, 1, 28, 28, dtype=dtype))
        model.eval()
        x = torch.randn(40, 1, 28, 28, dtype=dtype)
        probs = torch.softmax(torch.randn(40, 10, dtype=dtype) * 3, dim=1)
        watermark = targets.watermark(model, torch.randn(4, 1, 28, 28, dtype=dtype),
                                      torch.tensor([3, 1, 4, 1]))
        for name, target in (("all_ones", "all_ones"), ("watermark", watermark)):
            for top1 in (False, True):
                defense = GRAD2(model, 0.6, target=target, preserve_top1=top1)
                full = defense(x, probs)
                changed = sum(
                    not torch.equal(defense(x[i - j:i - j + n], probs[i - j:i - j + n])[j],
                                    full[i])
                    for i in (0, 5, 21, 39) for n in (1, 2, 7, 32) for j in (0, n - 1)
                    if 0 <= i - j and i - j + n <= 40
                )
                # Different batch-mates: the same queries in reversed order.
                changed += int(not torch.equal(defense(x.flip(0), probs.flip(0)).flip(0), full))
                results[f"{dtype}-{name}-top1={top1}"] = changed
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def defense_batch_mismatches():
    env = {**os.environ, "MKL_CBWR": "AUTO,STRICT", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _BATCH_SCRIPT], capture_output=True, text=True, env=env,
        timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.float64"])
@pytest.mark.parametrize("target", ["all_ones", "watermark"])
@pytest.mark.parametrize("top1", [False, True])
def test_grad2_answer_is_independent_of_batch_mates(defense_batch_mismatches, dtype, target,
                                                    top1):
    assert defense_batch_mismatches[f"{dtype}-{target}-top1={top1}"] == 0


def test_every_configurable_score_method_builds_and_agrees() -> None:
    """``defense.scores`` accepts what the library computes (the config validates against
    :data:`grad2.scores.METHODS` itself), and GRAD² answers alike with each method on a
    small BN CNN (float64)."""
    from grad2.scores import METHODS

    (scores,) = (param for param in GRAD2.params if param.name == "scores")
    assert scores.choices is METHODS
    torch.manual_seed(0)
    surrogate = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 13 * 13, 10),
    ).double().eval()
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    probs = torch.softmax(2 * torch.randn(8, 10, dtype=torch.float64), dim=1)
    answers = {
        method: build_defense({"method": "grad2", "epsilon": 0.5, "scores": method,
                               "surrogate": "surrogate.pt"}, surrogate)(x, probs)
        for method in METHODS
    }
    for method, answer in answers.items():
        torch.testing.assert_close(answer, answers["jvp"], rtol=0, atol=1e-9, msg=method)
