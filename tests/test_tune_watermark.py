"""Budget tuning and watermark verification: pure parts, on hand-checked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nets import tiny_net
from scipy.stats import binom

from grad2 import targets
from grad2.defenses import GRAD2, NoDefense
from grad2.lab.watermark import Secret, binomial_tail, create, make_triggers, verify_predictions
from grad2.tools.tune import TunePoint, next_version, pick_epsilon, sweep_epsilon


def _point(epsilon: float, drop: float) -> TunePoint:
    return TunePoint(epsilon, 0.9 - drop / 100, drop, 0.0, epsilon)


def test_pick_epsilon_takes_the_largest_admissible_budget() -> None:
    points = [_point(0.0, 0.0), _point(0.5, 0.4), _point(1.0, 1.5), _point(0.8, 0.9)]
    assert pick_epsilon(points, 1.0).epsilon == 0.8
    assert pick_epsilon(points, 0.0).epsilon == 0.0


def test_pick_epsilon_explains_an_impossible_budget() -> None:
    with pytest.raises(ValueError, match=r"smallest drop measured is 0\.40 at epsilon 0\.5"):
        pick_epsilon([_point(0.5, 0.4), _point(1.0, 2.0)], 0.1)


@pytest.mark.parametrize(
    ("version", "expected"), [("2.0", "2.1"), ("3", "3.1"), ("1.9", "1.10"), ("1.2.3", "1.2.4")]
)
def test_next_version(version: str, expected: str) -> None:
    assert next_version(version) == expected


def test_next_version_refuses_non_numeric() -> None:
    with pytest.raises(ValueError, match="--next-version"):
        next_version("2.beta")



def test_sweep_epsilon_measures_what_it_reports() -> None:
    victim, surrogate = tiny_net(0), tiny_net(1)
    inputs = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        clean = torch.softmax(3 * victim(inputs), dim=1)
    labels = clean.argmax(1)  # the victim is "perfect": accuracy 1
    points = sweep_epsilon(lambda eps: GRAD2(surrogate, eps), inputs, labels, clean,
                           (0.0, 0.5, 1.5), progress=False)
    assert points[0].accuracy_drop == 0 and points[0].effective_l1 == 0
    for point in points:
        assert point.effective_l1 <= point.epsilon + 1e-5
        assert math.isclose(point.accuracy_drop, 100 * point.label_flip_rate, abs_tol=1e-4)
    assert points[-1].label_flip_rate >= points[1].label_flip_rate
    none = sweep_epsilon(lambda eps: NoDefense(), inputs, labels, clean, (1.0,), progress=False)
    assert none[0].effective_l1 == 0


def test_binomial_tail_matches_scipy() -> None:
    for successes, trials, chance in [(0, 20, 0.1), (8, 20, 0.1), (20, 20, 0.1), (3, 7, 0.5)]:
        expected = binom.sf(successes - 1, trials, chance)
        assert math.isclose(binomial_tail(successes, trials, chance), expected, rel_tol=1e-9)


def test_triggers_are_seeded_and_out_of_distribution_shaped() -> None:
    first, again, other = (make_triggers(8, seed, style="strokes") for seed in (5, 5, 6))
    assert first.dtype == np.uint8 and first.shape == (8, 28, 28)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert (first.reshape(8, -1).max(1) == 255).all()  # every trigger has strokes


def test_secret_round_trip_and_verification(tmp_path) -> None:
    surrogate = tiny_net(2)
    target, secret = create(surrogate, count=12, seed=3)
    targets.check(target, surrogate)
    _, again = create(tiny_net(5), count=12, seed=3)
    np.testing.assert_array_equal(secret.labels, again.labels)  # no model decides a label
    loaded = Secret.load(secret.save(tmp_path / "secret.bin"))
    np.testing.assert_array_equal(loaded.triggers, secret.triggers)
    np.testing.assert_array_equal(loaded.labels, secret.labels)
    assert loaded.uniform_labels
    perfect = verify_predictions(loaded, loaded.labels)
    assert perfect["matches"] == 12 and perfect["p_value"] == pytest.approx(0.1**12)
    wrong = verify_predictions(loaded, (loaded.labels + 1) % 10)
    assert wrong["matches"] == 0 and wrong["p_value"] == pytest.approx(1.0)


def test_misdirect_is_the_watermark_gradient_of_the_shifted_labels() -> None:
    surrogate = tiny_net(4)
    references = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        shifted = (surrogate(references).argmax(1) + 3) % 10
    expected = targets.watermark(surrogate, references, shifted)
    actual = targets.misdirect(surrogate, references, shift=3)
    assert actual.keys() == expected.keys()
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple"):
        targets.misdirect(surrogate, references, shift=10)


def test_target_command_writes_a_file_that_loads_against_its_surrogate(tmp_path) -> None:
    from grad2.cli import main
    from grad2.models import build_model, save_checkpoint

    surrogate = build_model("small_cnn")
    save_checkpoint(surrogate, tmp_path / "surrogate.pt")
    out = tmp_path / "random_target.pt"
    assert main(["target", "random", "--surrogate", str(tmp_path / "surrogate.pt"),
                 "--out", str(out), "--seed", "5"]) == 0
    loaded = targets.load(out, surrogate)
    expected = targets.random(surrogate, 5)
    for name in expected:
        torch.testing.assert_close(loaded[name], expected[name])
