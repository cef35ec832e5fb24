"""``grad2 verify`` (grad2.tools.ownership): a suspect that follows the archive's answers on
the moved images is accused; innocents that share the victim's confusions are not, beyond
the test's level (exact for models that draw from the victim's probabilities, and with
reference models for models whose confusions differ from model to model); too few moved
images are refused before any suspect query, with the counts."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from grad2.config import InputConfig
from grad2.tools import ownership
from grad2.tools.ownership import (
    Moved,
    TooFewMovedError,
    check_moved,
    moved_rows,
    ownership_test,
    permutation_test,
    poisson_binomial_sf,
    reference_p,
    student_t_sf,
    verify_suspect,
)

K, M = 10, 600


def victim_setting(seed: int = 0, size: int = M) -> tuple[np.ndarray, Moved]:
    """Clean probabilities ``[M, K]`` of unsure (out-of-distribution-like) images and the
    moved set: receivers a fixed class mapping of the clean top class, as a keyed archive
    moves gated images."""
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.full(K, 0.6), size)
    top = probabilities.argmax(1)
    mapping = (np.arange(K) + 1 + rng.integers(0, K - 1)) % K
    mapping[mapping == np.arange(K)] = (mapping[mapping == np.arange(K)] + 1) % K
    receivers = mapping[top]
    moved = Moved(size, ownership.MOVED_RULES["gate"], np.arange(size), top, receivers,
                  probabilities[np.arange(size), receivers])
    return probabilities, moved


def draw(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[M]``: one class per row drawn from ``probabilities [M, K]``."""
    cumulative = probabilities.cumsum(1)
    return (rng.random((len(probabilities), 1)) > cumulative).sum(1).clip(0, K - 1)


def innocent_population(probabilities: np.ndarray, count: int, rng: np.random.Generator,
                        spread: float) -> np.ndarray:
    """``[count, M, K]`` probabilities of models that share the victim's confusions, each
    with its own tilt (a log-bias per pair of clean top class and class, standard deviation
    ``spread``: one model's mistakes are correlated across images); each model's top class
    is a draw from its tilted probabilities."""
    top = probabilities.argmax(1)
    tilt = rng.normal(0, spread, (count, K, K))[:, top, :]  # per model: top class -> class
    tilted = probabilities[None] * np.exp(tilt)
    tilted /= tilted.sum(2, keepdims=True)
    chosen = np.stack([draw(rows, rng) for rows in tilted])  # [count, M]
    return 0.5 * np.eye(K)[chosen] + 0.5 * tilted


def test_exact_statistics_agree_with_reference_implementations() -> None:
    rng = np.random.default_rng(0)
    q = rng.random(150) * 0.5
    pmf = np.zeros(len(q) + 1)
    pmf[0] = 1.0
    for p in q:  # the textbook recursion
        pmf[1:], pmf[0] = pmf[1:] * (1 - p) + pmf[:-1] * p, pmf[0] * (1 - p)
    for count in (0, 1, 30, int(q.sum()), 60, 150, 151):
        assert poisson_binomial_sf(q, count) == pytest.approx(pmf[count:].sum(), abs=1e-12)
    for dof in (1, 2, 3, 6, 7, 20):
        for t in (-2.0, 0.0, 0.4, 3.0, 9.0):
            assert student_t_sf(t, dof) == pytest.approx(stats.t.sf(t, dof), abs=1e-12)


def test_a_model_that_follows_the_receivers_is_accused() -> None:
    probabilities, moved = victim_setting()
    rng = np.random.default_rng(1)
    # Learned the archive's answers on a quarter of the moved images, else its own guess.
    suspect = np.where(rng.random(M) < 0.25, moved.receivers, draw(probabilities, rng))
    references = innocent_population(probabilities, 8, rng, 0.3)
    verdict = ownership_test(suspect, moved, references, K, draws=2000)
    assert verdict.p_model < 1e-6 and verdict.p_reference < 1e-3 and verdict.p_value < 1e-3
    assert verdict.informative == M and verdict.follows_receiver > verdict.null_mean
    assert verdict.random_mapping_p == pytest.approx(1 / 2001)
    assert "follows this archive's answers" in verdict.summary()
    assert f"{M} of {M}" in verdict.summary()
    alone = ownership_test(suspect, moved, None, K, draws=0)
    assert not alone.calibrated and "no verdict" in alone.summary()


def test_models_that_draw_from_the_victims_probabilities_are_not_accused() -> None:
    """200 innocents that make exactly the victim's confusions (each prediction drawn from
    its clean probabilities): p_model is exact, so about 5% fall below 0.05."""
    probabilities, moved = victim_setting(2)
    rng = np.random.default_rng(3)
    p_values = np.array([ownership_test(draw(probabilities, rng), moved, None, K, 0).p_value
                         for _ in range(200)])
    assert np.mean(p_values < 0.05) <= 0.08
    assert 0.35 <= np.mean(p_values < 0.5) <= 0.65  # uniform-ish, not merely large


def test_references_keep_innocents_with_their_own_confusions_calibrated() -> None:
    """Innocent models whose confusions differ from model to model (each its own tilt per
    pair of classes): the victim's probabilities alone accuse many of them; with 8
    reference models of the same population the verdict accuses about its level."""
    probabilities, moved = victim_setting(4)
    rng = np.random.default_rng(5)
    population = innocent_population(probabilities, 200 + 8 * 200, rng, 1.0)
    suspects = population[:200].argmax(2)
    alone = np.array([ownership_test(top, moved, None, K, 0).p_value for top in suspects])
    p_values = np.array([ownership_test(top, moved, population[200 + 8 * i:208 + 8 * i], K,
                                        0).p_value for i, top in enumerate(suspects)])
    assert np.mean(alone < 0.05) > 0.15  # the spread between models the model null misses
    assert np.mean(p_values < 0.05) <= 0.08


def test_reference_p_is_a_prediction_test() -> None:
    assert reference_p(50, [50, 48, 52, 49, 51]) == pytest.approx(0.5)
    assert reference_p(80, [50, 48, 52, 49, 51]) < 1e-3
    assert reference_p(50, [50, 50, 50]) == pytest.approx(0.5)  # sd floored at one image
    with pytest.raises(ValueError, match=">= 3 reference"):
        reference_p(50, [50, 48])


class KeyedDefense:
    """A keyed archive's defense: gate weights by row, a class mapping."""

    mapping = torch.tensor([1, 2, 0])

    def gate_weights(self, x: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def test_moved_rows_of_a_keyed_and_of_a_redirecting_defense() -> None:
    clean = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]])
    gate = torch.tensor([[0.9], [0.2], [0.5]])
    moved, receivers, rule = moved_rows(KeyedDefense(), gate, clean)
    assert moved.tolist() == [True, False, True] and receivers.tolist() == [1, 1, 0]
    assert rule == "gate"

    def flip_first(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return torch.cat([probs[:1].flip(1), probs[1:]])

    moved, receivers, rule = moved_rows(flip_first, gate, clean)
    assert moved.tolist() == [True, False, False] and receivers.tolist() == [2, 1, 2]
    assert rule == "answer"


def test_too_few_moved_images_are_refused_with_the_counts() -> None:
    with pytest.raises(TooFewMovedError, match=r"12 of 4000 images are moved .* need >= 100"):
        check_moved(12, 4000, 100, ownership.MOVED_RULES["gate"])
    check_moved(100, 4000, 100, ownership.MOVED_RULES["gate"])


def test_verify_refuses_before_it_queries_the_suspect(tmp_path: Path, monkeypatch) -> None:
    """An image set the gate flags too little of: the refusal comes before the suspect
    (here a checkpoint that does not exist) or any reference is read."""
    images = np.random.default_rng(6).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=images)
    victim = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))
    defense = KeyedDefense()
    defense.gate_weights = lambda x, clean: (torch.arange(len(x)) % 10 == 0).float()
    served = SimpleNamespace(victim=victim, defense=defense, input_config=InputConfig.from_dict(
        {"channels": 1, "height": 28, "width": 28, "mean": [0.3], "std": [0.35]}))

    @contextlib.contextmanager
    def fake_archive(path: Path):
        yield SimpleNamespace(load=lambda: served)

    monkeypatch.setattr(ownership, "open_archive", fake_archive)
    with pytest.raises(TooFewMovedError, match="4 of 40 images are moved"):
        verify_suspect(tmp_path / "a.mar", str(tmp_path / "missing.pt"), tmp_path / "set.npz",
                       progress=False, references=[tmp_path / "r.pt"] * 3, min_moved=5)


def test_random_mapping_test_of_the_lab_study() -> None:
    """The lab's permutation test (receivers given per image, no majority rule)."""
    rng = np.random.default_rng(7)
    clean_top = rng.integers(0, K, M)
    receivers = (clean_top + 1) % K
    follower = np.where(rng.random(M) < 0.25, receivers, clean_top)
    assert permutation_test(follower, clean_top, receivers, K, 2000).p_value == pytest.approx(
        1 / 2001)
    assert permutation_test(clean_top, clean_top, receivers, K, 2000).p_value == 1
    with pytest.raises(TooFewMovedError, match="moves no image"):
        permutation_test(clean_top, clean_top, clean_top, K)
