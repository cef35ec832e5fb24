"""The ownership permutation test (grad2.tools.ownership): a suspect that follows the
defense's receiving classes is accused, one that predicts the clean top class or guesses
is not, and the p-value is a valid permutation p-value."""

from __future__ import annotations

import numpy as np
import pytest

from grad2.tools.ownership import permutation_test

K, N = 10, 600


def setting(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    clean_top = rng.integers(0, K, N)
    receivers = (clean_top + 1) % K  # a misdirection-like mapping k -> k + 1
    return clean_top, receivers


def test_a_clone_that_follows_the_receivers_is_accused() -> None:
    clean_top, receivers = setting()
    rng = np.random.default_rng(1)
    # The clone learned the redirection on a quarter of the images, else the clean label.
    suspect = np.where(rng.random(N) < 0.25, receivers, clean_top)
    verdict = permutation_test(suspect, clean_top, receivers, K, draws=2000)
    assert verdict.p_value == pytest.approx(1 / 2001)
    assert verdict.follows_receiver > verdict.null_p95


@pytest.mark.parametrize("kind", ["clean_top", "random"])
def test_innocent_models_are_not_accused(kind: str) -> None:
    clean_top, receivers = setting(2)
    rng = np.random.default_rng(3)
    suspect = clean_top if kind == "clean_top" else rng.integers(0, K, N)
    verdict = permutation_test(suspect, clean_top, receivers, K, draws=2000)
    # Accusation needs p < 1e-3; a guesser's p is uniform (next test), this one is not near.
    assert verdict.p_value > 1e-3
    if kind == "clean_top":
        assert verdict.follows_receiver == 0 and verdict.p_value == 1


def test_p_values_of_guessing_suspects_are_uniform_enough() -> None:
    """Under the null (the suspect ignores the receivers) rejections at 5% happen about
    5% of the time: 200 independent guessing suspects."""
    clean_top, receivers = setting(4)
    rng = np.random.default_rng(5)
    p_values = [permutation_test(rng.integers(0, K, N), clean_top, receivers, K, draws=200,
                                 seed=s).p_value for s in range(200)]
    assert 0.0 <= np.mean(np.array(p_values) < 0.05) <= 0.12


def test_no_informative_image_is_refused() -> None:
    clean_top, _ = setting()
    with pytest.raises(ValueError, match="moves no image"):
        permutation_test(clean_top, clean_top, clean_top, K)
