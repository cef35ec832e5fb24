"""OOD gates, keyed mappings and the gated defenses: exact budgets, no tells of the
solver's form, answers that do not depend on batch-mates, and configs that name keys."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from grad2 import gate
from grad2.config import ConfigError
from grad2.defenses import AdaptiveMisinformation, GatedGRAD2, build_defense
from grad2.lab.train import misinformation_loss
from grad2.models import last_linear, penultimate
from tests.nets import tiny_net

torch.set_num_threads(1)


def small_net(seed: int = 0, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 6 * 6, 8), nn.ReLU(), nn.Linear(8, classes)).eval()


def probabilities(rows: int, classes: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(rows, classes, generator=generator), dim=1)


def test_keyed_mapping_is_a_derangement_fixed_by_the_key():
    for classes in (2, 3, 10, 1000):
        mapping = gate.keyed_mapping(b"k" * 32, classes)
        assert sorted(mapping.tolist()) == list(range(classes))
        assert (mapping != torch.arange(classes)).all()
        assert torch.equal(mapping, gate.keyed_mapping(b"k" * 32, classes))
    draws = {tuple(gate.keyed_mapping(bytes([i]) * 32, 10).tolist()) for i in range(50)}
    assert len(draws) == 50  # other keys, other mappings
    with pytest.raises(ValueError):
        gate.keyed_mapping(b"k" * 32, 1)


def test_keyed_mapping_is_uniform_over_derangements_of_three():
    # Only two derangements of 3 classes exist; each should come up about half the time.
    counts: dict[tuple, int] = {}
    for index in range(400):
        drawn = tuple(gate.keyed_mapping(index.to_bytes(32, "big"), 3).tolist())
        counts[drawn] = counts.get(drawn, 0) + 1
    assert set(counts) == {(1, 2, 0), (2, 0, 1)}
    assert 160 < counts[(1, 2, 0)] < 240


def test_key_files_round_trip_and_refuse_garbage(tmp_path):
    path = gate.write_key(tmp_path / "mapping.key")
    assert len(gate.read_key(path)) == gate.KEY_BYTES
    assert path.stat().st_mode & 0o077 == 0
    (tmp_path / "bad.key").write_text("not hex")
    with pytest.raises(ValueError, match="hex"):
        gate.read_key(tmp_path / "bad.key")
    (tmp_path / "short.key").write_text("abcd")
    with pytest.raises(ValueError, match="16 bytes"):
        gate.read_key(tmp_path / "short.key")


def test_relabel_moves_class_k_to_its_image():
    probs = probabilities(6, 7, 0)
    mapping = gate.keyed_mapping(b"m" * 32, 7)
    moved = gate.relabel(probs, mapping)
    for k in range(7):
        assert torch.equal(moved[:, mapping[k]], probs[:, k])


def test_permuted_mix_spends_exactly_its_budget_and_creates_no_zeros():
    probs = probabilities(500, 10, 1)
    mapping = gate.keyed_mapping(b"p" * 32, 10)
    budget = torch.rand(500, generator=torch.Generator().manual_seed(2)) * 2
    mixed = gate.permuted_mix(probs, mapping, budget)
    spent = (mixed - probs).abs().sum(1)
    full = (gate.relabel(probs, mapping) - probs).abs().sum(1)
    torch.testing.assert_close(spent, torch.minimum(budget, full), atol=1e-6, rtol=0)
    assert (mixed > 0).all()
    torch.testing.assert_close(mixed.sum(1), torch.ones(500), atol=1e-6, rtol=0)
    # A full budget gives the relabelled row exactly: same sorted values as the clean row.
    whole = gate.permuted_mix(probs, mapping, torch.full((500,), 2.0))
    assert torch.equal(whole, gate.relabel(probs, mapping))
    assert torch.equal(gate.permuted_mix(probs, mapping, torch.zeros(500)), probs)


def test_feature_score_equals_the_mahalanobis_definition():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(300, 6, generator=generator) + torch.arange(6.0)
    labels = torch.randint(0, 4, (300,), generator=generator)
    fitted = gate.fit_feature_gate(features, labels, 4, ridge=1e-3)
    means = torch.stack([features[labels == k].mean(0) for k in range(4)]).double()
    centred = features.double() - means[labels]
    covariance = centred.T @ centred / 300 + 1e-3 * torch.eye(6, dtype=torch.float64)
    queries = torch.randn(20, 6, generator=generator).double() * 3
    direct = torch.stack([
        torch.stack([(q - m) @ torch.linalg.solve(covariance, q - m) for m in means]).min()
        for q in queries])
    torch.testing.assert_close(gate.feature_score(queries, {k: v.double() for k, v in
                                                            fitted.items()}),
                               -direct, rtol=1e-5, atol=1e-6)


def test_feature_gate_files_are_checked():
    with pytest.raises(ValueError, match="means"):
        gate.check_feature_gate({"means": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="shapes"):
        gate.check_feature_gate({"means": torch.zeros(2, 3), "precision": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="features"):
        gate.check_feature_gate({"means": torch.zeros(2, 3), "precision": torch.eye(3)}, 4)


def test_ood_weight_and_calibration():
    probs = torch.tensor([[0.98, 0.01, 0.01], [0.4, 0.3, 0.3]])
    weight = gate.ood_weight(probs, threshold=0.7, slope=50)
    assert weight[0] < 1e-5 and weight[1] > 1 - 1e-5
    scores = torch.linspace(0, 1, 1001)
    assert math.isclose(gate.calibrate_threshold(scores, 0.1), 0.1, abs_tol=1e-7)


def gated(answer: str = "permute", features: bool = False) -> tuple[GatedGRAD2, torch.Tensor,
                                                                      torch.Tensor]:
    surrogate = small_net(0)
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    probs = probabilities(40, 5, 6, scale=2.0)
    tensors = None
    if features:
        feats = penultimate(surrogate, x)
        tensors = gate.fit_feature_gate(feats, probs.argmax(1), 5)
        threshold = float(gate.feature_score(feats, tensors).median())
        slope = 5.0 / float(gate.feature_score(feats, tensors).std())
    else:
        threshold, slope = 0.6, 20.0
    defense = GatedGRAD2(surrogate, 0.2, 1.6, threshold, slope, answer,
                         gate.keyed_mapping(b"g" * 32, 5), gate_tensors=tensors)
    return defense, x, probs


@pytest.mark.parametrize("answer", ["permute", "redirect"])
@pytest.mark.parametrize("features", [False, True])
def test_gated_grad2_stays_within_each_querys_budget(answer, features):
    defense, x, probs = gated(answer, features)
    inside, outside = defense.budgets(x, probs)
    answers = defense(x, probs)
    spent = (answers - probs).abs().sum(1)
    assert (spent <= inside + outside + 1e-5).all()
    assert (answers >= 0).all()
    torch.testing.assert_close(answers.sum(1), torch.ones(40), atol=1e-5, rtol=0)
    weight = defense.gate_weights(x, probs)
    assert ((weight > 0.99) | (weight < 0.01)).any()
    if answer == "permute":
        # A fully gated row is the redirected row relabelled: its top class is σ(top).
        full = weight > 1 - 1e-6
        if full.any():
            expected = defense.mapping[probs.argmax(1)]
            redirected_top = answers[full].argmax(1)
            assert (redirected_top == expected[full]).float().mean() > 0.5


def test_gated_grad2_answers_do_not_depend_on_batch_mates():
    defense, x, probs = gated("permute", features=True)
    defense.plan_batches(x, probs, 8)
    full = defense(x, probs)
    for size in (1, 3, 7):
        parts = torch.cat([defense(x[i:i + size], probs[i:i + size])
                           for i in range(0, 40, size)])
        assert torch.equal(parts, full)


def test_adaptive_misinformation_is_the_gated_mixture():
    misinformation = small_net(1)
    defense = AdaptiveMisinformation(misinformation, threshold=0.6, slope=30)
    x = torch.randn(16, 1, 8, 8)
    probs = probabilities(16, 5, 7, scale=1.5)
    weight = torch.sigmoid(30 * (0.6 - probs.max(1).values)).unsqueeze(1)
    with torch.no_grad():
        expected = (1 - weight) * probs + weight * torch.softmax(misinformation(x), 1)
    torch.testing.assert_close(defense(x, probs), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveMisinformation(misinformation, threshold=1.5, slope=1)


def test_misinformation_loss_is_minus_log_of_the_mass_off_the_true_class():
    logits = torch.randn(9, 4)
    labels = torch.randint(0, 4, (9,))
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    true_mass = torch.softmax(logits, 1).gather(1, labels.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(misinformation_loss(logits, one_hot),
                               -torch.log(1 - true_mass).mean(), atol=1e-6, rtol=1e-6)


def test_build_defense_reads_the_key_and_gate_file():
    surrogate = tiny_net(0)
    key = b"z" * 32
    config = {"method": "grad2_gated", "mapping_key": "mapping.key", "epsilon": 0.1}
    defense = build_defense(config, surrogate=surrogate, files={"mapping_key": key})
    classes = last_linear(surrogate)[1].out_features
    assert torch.equal(defense.mapping, gate.keyed_mapping(key, classes))
    with pytest.raises(ConfigError, match=r"^defense\.mapping_key:"):
        build_defense(config, surrogate=surrogate, files={})
    bad_gate = {"means": torch.zeros(classes, 3), "precision": torch.eye(3)}
    with pytest.raises(ConfigError, match=r"^defense\.gate_file:"):
        build_defense({**config, "gate_score": "features", "gate_file": "gate.pt",
                       "gate_threshold": -5.0}, surrogate=surrogate,
                      files={"mapping_key": key, "gate_file": bad_gate})
