"""Lone queries without running the whole query as a pair: only the layers whose CPU
kernels differ at batch 1 run on the row stacked twice (grad2.batching.module_lone_plan,
TangentProgram.lone_plan), and the result keeps the bits of the row as a pair with itself
— for the victim's forward, the surrogate's JVP scores and the defended answer."""

from __future__ import annotations

import pytest
import torch

from grad2 import gate, targets
from grad2.batching import module_lone_plan, run_lone
from grad2.defenses import GRAD2, GatedGRAD2
from grad2.models import build_model, penultimate, set_memory_format
from grad2.scores import _folded, _program, redirection_scores

torch.set_num_threads(1)

NETWORKS = {
    "small_cnn": ("small_cnn", (1, 28, 28)),
    "wide_cnn": ("wide_cnn", (1, 28, 28)),
    "mobilenet_v3_small": ("torchvision:mobilenet_v3_small", (3, 64, 64)),
}


def network(name: str, layout: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    arch, shape = NETWORKS[name]
    torch.manual_seed(0)
    return set_memory_format(build_model(arch, 10, shape[0]).eval(), layout), shape


def rows(shape: tuple[int, ...], count: int, layout: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    format_ = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return [torch.randn(1, *shape, generator=generator).contiguous(memory_format=format_)
            for _ in range(count)]


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_victim_lone_plan_gives_the_pairs_bits(name: str, layout: str) -> None:
    model, shape = network(name, layout)
    first, *others = rows(shape, 4, layout)
    plan = module_lone_plan(model, first)
    assert plan is not None
    with torch.no_grad():
        for row in others:
            assert torch.equal(run_lone(model, row, plan), model(torch.cat([row, row]))[:1])
        # Planned layers are restored afterwards: a batch runs as it always did.
        batch = torch.cat(others)
        assert torch.equal(model(batch), model(batch))


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_lone_scores_have_the_pairs_bits_without_the_pair(name: str, layout: str) -> None:
    model, shape = network(name, layout)
    target = targets.all_ones(model)
    for row in rows(shape, 3, layout):
        alone = redirection_scores(model, row, target)
        pair = redirection_scores(model, torch.cat([row, row]), target)[:1]
        assert torch.equal(alone, pair)
    folded = _folded(model)
    program = _program(folded.module if folded is not None else model, check=False)
    plans = list(program.lone_plans.values())
    assert plans and all(plan is not None for plan in plans)  # the plan ran, not a pair
    # Fewer nodes paired than the program has: the rest of a lone query ran at batch 1.
    assert all(len(plan) < len(program.steps) // 2 for plan in plans)


def test_defense_answers_a_lone_query_alone_with_the_pairs_bits() -> None:
    model, shape = network("mobilenet_v3_small", "channels_last")
    defense = GRAD2(model, 0.8, preserve_top1=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, *shape, generator=generator).contiguous(
        memory_format=torch.channels_last)
    probs = torch.softmax(torch.randn(6, 10, generator=generator), dim=1)
    with torch.enable_grad():
        defense.plan_batches(x, probs, 4)
        assert defense.lone
        for index in range(3):
            alone = defense(x[index:index + 1], probs[index:index + 1])
            paired = defense(x[[index, index]], probs[[index, index]])[:1]
            assert torch.equal(alone, paired)


@pytest.mark.parametrize("name", ["small_cnn", "mobilenet_v3_small"])
def test_gated_defense_answers_a_lone_query_alone_with_the_pairs_bits(name: str) -> None:
    model, shape = network(name, "channels_last")
    generator = torch.Generator().manual_seed(2)
    reference = torch.randn(64, *shape, generator=generator).contiguous(
        memory_format=torch.channels_last)
    features = penultimate(model, reference)
    gate_tensors = gate.fit_feature_gate(features, torch.arange(64) % 10, 10)
    threshold = float(gate.feature_score(features, gate_tensors).median())
    defense = GatedGRAD2(model, 0.2, 2.0, threshold, 0.05, "permute",
                         gate.keyed_mapping(b"k" * 32, 10), gate_tensors=gate_tensors)
    x, probs = reference[:8], torch.softmax(torch.randn(8, 10, generator=generator), dim=1)
    with torch.enable_grad():
        defense.plan_batches(x, probs, 4)
        # The gate's score of a lone row (a matrix-vector product) has its pair's bits, so
        # a lone query is answered alone rather than as a pair with itself.
        assert defense.lone
        for index in range(3):
            row, pair = [index], [index, index]
            assert torch.equal(defense.network_rows(x[row], probs[row]),
                               defense.network_rows(x[pair], probs[pair])[:1])
            assert torch.equal(defense(x[row], probs[row]), defense(x[pair], probs[pair])[:1])
