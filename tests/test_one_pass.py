"""One surrogate pass per batch for the feature-gated defense: the JVP's primal hands back
the features the last linear layer reads, with the bits of a separate pass of the same
(batch-norm-folded) network, a lone query's included; the gate and the answers then move
from today's unfolded features by rounding only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grad2 import gate, targets
from grad2.defenses import GatedGRAD2
from grad2.models import build_model, penultimate, set_memory_format
from grad2.scores import (
    _folded,
    _program,
    penultimate_features,
    redirection_scores,
    scores_and_features,
)

torch.set_num_threads(1)

NETWORKS = {
    "small_cnn": ("small_cnn", (1, 28, 28)),
    "wide_cnn": ("wide_cnn", (1, 28, 28)),
    "mobilenet_v3_small": ("torchvision:mobilenet_v3_small", (3, 64, 64)),
}


def network(name: str, layout: str = "channels_last") -> tuple[nn.Module, tuple[int, ...]]:
    arch, shape = NETWORKS[name]
    torch.manual_seed(0)
    return set_memory_format(build_model(arch, 10, shape[0]).eval(), layout), shape


def inputs(shape: tuple[int, ...], count: int, layout: str = "channels_last",
           seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return torch.randn(count, *shape, generator=generator).contiguous(memory_format=fmt)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_one_pass_features_are_a_separate_folded_pass_bit_for_bit(name: str, layout: str):
    model, shape = network(name, layout)
    target = targets.all_ones(model)
    x = inputs(shape, 5, layout)
    scores, features = scores_and_features(model, x, target)
    assert torch.equal(scores, redirection_scores(model, x, target))
    assert torch.equal(features, penultimate_features(model, x))
    # The folded network's features: today's unfolded ones up to rounding.
    torch.testing.assert_close(features, penultimate(model, x), rtol=1e-4, atol=1e-5)
    for row in x.split(1):  # lone queries, with the lone plan, not run as a pair
        lone_scores, lone_features = scores_and_features(model, row, target)
        assert torch.equal(lone_scores, redirection_scores(model, row, target))
        assert torch.equal(lone_features, penultimate_features(model, row))
        pair = torch.cat([row, row])
        assert torch.equal(lone_features, penultimate_features(model, pair)[:1])
        assert torch.equal(lone_scores, redirection_scores(model, pair, target)[:1])
    folded = _folded(model)
    program = _program(folded.module if folded is not None else model, check=False)
    kept = [key for key, plan in program.lone_plans.items() if key[-1] is not None]
    assert kept and all(program.lone_plans[key] is not None for key in kept)


class Unruly(nn.Module):
    """A network no tangent program covers (a layer norm has no rule): the features then
    come from a second, plain pass."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(4 * 6 * 6, 6), nn.LayerNorm(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def test_without_a_tangent_program_the_features_come_from_a_second_pass():
    torch.manual_seed(1)
    model = Unruly().eval()
    assert _program(_folded(model).module, check=False) is None
    target = targets.random(model, 2)
    x = torch.randn(4, 1, 8, 8)
    for rows in (x, x[:1]):
        scores, features = scores_and_features(model, rows, target)
        assert torch.equal(features, penultimate_features(model, rows))
        torch.testing.assert_close(scores, redirection_scores(model, rows, target,
                                                              "double_backward"))
        torch.testing.assert_close(features, penultimate(model, rows))


def gated(model: nn.Module, shape: tuple[int, ...]) -> GatedGRAD2:
    reference = inputs(shape, 40, seed=9)
    gate_tensors = gate.fit_feature_gate(penultimate(model, reference),
                                         torch.arange(40) % 10, 10)
    scores = gate.feature_score(penultimate(model, reference), gate_tensors)
    key_mapping = gate.keyed_mapping(b"k" * 32, 10)
    return GatedGRAD2(model, 0.3, 2.0, float(scores.median()), 0.05, "permute",
                      key_mapping, gate_tensors=gate_tensors)


@pytest.mark.parametrize("name", ["small_cnn", "mobilenet_v3_small"])
def test_gated_defense_runs_the_surrogate_once(name: str, monkeypatch):
    model, shape = network(name)
    defense = gated(model, shape)
    x = inputs(shape, 6)
    probs = torch.softmax(torch.randn(6, 10, generator=torch.Generator().manual_seed(2)), 1)
    with torch.enable_grad():
        separate = defense.gate_scores(x, probs)
        reference = defense.defend(x, probs)
        # The gate's features come from the scores' pass: a second pass is never run.
        monkeypatch.setattr("grad2.defenses.gated.penultimate_features", _no_second_pass)
        scores, one_pass = defense.scores_and_gate(x, probs)
        assert torch.equal(one_pass, separate)
        assert torch.equal(scores, defense.scores(x, probs))
        assert torch.equal(defense.defend(x, probs), reference)
        rows = defense.network_rows(x, probs)
        assert torch.equal(rows[:, -1], separate)
        for row, row_probs in zip(x.split(1), probs.split(1), strict=True):
            # A lone query's gate: the features of the row as a pair with itself.
            assert torch.equal(defense.scores_and_gate(row, row_probs)[1],
                               _lone_gate(defense, row, row_probs))


def _lone_gate(defense: GatedGRAD2, row: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    features = penultimate_features(defense.surrogate, torch.cat([row, row]))[:1]
    return gate.feature_score(features, defense.gate_tensors).to(probs.dtype)


def _no_second_pass(model, x):
    raise AssertionError("the gate ran a second surrogate pass")


def test_gate_moves_only_at_rounding_from_unfolded_features():
    model, shape = network("small_cnn")
    defense = gated(model, shape)
    x = inputs(shape, 16, seed=11)
    probs = torch.softmax(torch.randn(16, 10, generator=torch.Generator().manual_seed(4)), 1)
    with torch.enable_grad():
        _, folded_scores = defense.scores_and_gate(x, probs)
    unfolded = gate.feature_score(penultimate(model, x), defense.gate_tensors)
    torch.testing.assert_close(folded_scores, unfolded, rtol=1e-4, atol=1e-3)
