"""Scores restricted to the surrogate's last layers (``defense.target_layers``): the
layers without a direction run as a plain forward pass, the scores are those of the
full target zeroed outside the kept layers, and the key works from config to archive."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import shipped_answers
import torch
from torch import nn

from grad2 import targets
from grad2.config import ConfigError
from grad2.defenses import GRAD2, build_defense, parse_config
from grad2.models import build_model
from grad2.scores import _folded, _program, redirection_scores

torch.set_num_threads(1)


def zeroed_outside(target: dict, kept: dict) -> dict:
    """``target`` with zeros wherever ``kept`` has no entry (the dense reference)."""
    return {name: tensor.clone() if name in kept else torch.zeros_like(tensor)
            for name, tensor in target.items()}


def test_layer_groups_pair_each_weight_layer_with_its_normalisation():
    model = build_model("small_cnn", 10, 1)
    groups = targets.layer_groups(model)
    assert groups == [["0.weight", "1.weight", "1.bias"], ["4.weight", "5.weight", "5.bias"],
                      ["8.weight", "9.weight", "9.bias"], ["13.weight", "13.bias"]]
    for arch in ("torchvision:resnet18", "torchvision:mobilenet_v3_small"):
        network = build_model(arch, 10, 3)
        groups = targets.layer_groups(network)
        names = [name for group in groups for name in group]
        assert sorted(names) == sorted(n for n, _ in network.named_parameters())
        assert groups[-1][0].startswith(("fc.", "classifier."))
    assert len(targets.layer_groups(build_model("torchvision:resnet18", 10, 3))) == 21


@pytest.mark.parametrize("arch, shape", [("small_cnn", (1, 28, 28)),
                                         ("wide_cnn", (1, 28, 28)),
                                         ("torchvision:mobilenet_v3_small", (3, 64, 64))])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_restricted_scores_are_the_zeroed_targets_double_backward(arch, shape, layers):
    torch.manual_seed(0)
    model = build_model(arch, 10, shape[0]).double().eval()
    full = targets.random(model, 5)
    full = {name: tensor.double() for name, tensor in full.items()}
    restricted = targets.restrict(full, model, layers)
    assert 0 < len(restricted) < len(full)
    x = torch.randn(3, *shape, dtype=torch.float64)
    engine = redirection_scores(model, x, restricted)
    reference = redirection_scores(model, x, zeroed_outside(full, restricted),
                                   "double_backward")
    torch.testing.assert_close(engine, reference, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(redirection_scores(model, x[:1], restricted), reference[:1],
                               rtol=1e-8, atol=1e-10)


def test_layers_without_a_direction_carry_no_tangent():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1).eval()
    restricted = targets.restrict(targets.all_ones(model), model, 1)
    folded = _folded(model)
    program = _program(folded.module, check=False)
    seen = []
    for index, (node, rule) in enumerate(program.steps):
        def spy(context, node, args, kwargs, rule=rule):
            value, tangent = rule(context, node, args, kwargs)
            seen.append((node.target, tangent is not None))
            return value, tangent
        program.steps = (*program.steps[:index], (node, spy), *program.steps[index + 1:])
    redirection_scores(model, torch.randn(4, 1, 28, 28), restricted)
    carrying = [target for target, has in seen if has]
    assert carrying and all(target == "13" for target in carrying)  # the head only


def test_zero_tensors_of_a_target_are_no_direction():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1).eval()
    full = targets.random(model, 1)
    zeros = {name: torch.zeros_like(t) if name.startswith(("0.", "1.")) else t
             for name, t in full.items()}
    defense = GRAD2(model, 0.5, zeros)
    assert not any(name.startswith(("0.", "1.")) for name in defense.target)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(redirection_scores(model, x, defense.target),
                               redirection_scores(model, x, zeros, "double_backward"),
                               rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def surrogate() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 4 * 4, 3)).eval()


def raises_naming(key: str):
    return pytest.raises(ConfigError, match="^" + re.escape(key) + ":")


@pytest.mark.parametrize("value", [-1, 2.5, "2", True])
def test_bad_target_layers_name_the_key(value):
    with raises_naming("defense.target_layers"):
        parse_config({"method": "grad2", "target_layers": value})


@pytest.mark.parametrize("method", ["grad2", "grad2_gated"])
def test_target_layers_beyond_the_surrogate_name_the_key(surrogate, method):
    raw = {"method": method, "target_layers": 3}
    if method == "grad2_gated":
        raw["ood_answer"] = "redirect"  # no key file to stage
    with raises_naming("defense.target_layers"):
        build_defense(raw, surrogate=surrogate)
    built = build_defense({**raw, "target_layers": 1, "target": "random"},
                          surrogate=surrogate)
    assert set(built.target) == {"4.weight", "4.bias"}
    assert built.target_layers == 1
    assert set(build_defense({**raw, "target_layers": 0}, surrogate=surrogate).target) == {
        name for name, _ in surrogate.named_parameters()}


@pytest.mark.parametrize("name", ["grad2", "grad2_gated"])
def test_target_layers_load_through_the_served_loader(name: str, tmp_path: Path):
    from grad2.serve import load_served_model, normalise

    config = shipped_answers.served_config(shipped_answers.shipped_configs()[name])
    config["defense"] = {**config["defense"], "target_layers": 2}
    shipped_answers.stage(tmp_path, config["defense"])
    served = load_served_model(tmp_path, config)
    assert served.defense.target_layers == 2
    assert set(served.defense.target) == {"8.weight", "9.weight", "9.bias", "13.weight",
                                          "13.bias"}
    x = normalise(shipped_answers.inputs(), served.input_config)
    probs = served.probabilities(x)
    with torch.enable_grad():
        answers = served.defense(x, probs)
        scores = served.defense.scores(x, probs)
    assert torch.allclose(answers.sum(1), torch.ones(len(x)), atol=1e-5)
    full = shipped_answers.answers(tmp_path, {**config, "defense": {
        **config["defense"], "target_layers": 0}}, shipped_answers.inputs())
    assert not torch.equal(full, answers)  # the restriction reached the answers
    assert config["defense"]["target"] == "all_ones"
    dense = {n: torch.ones_like(p) for n, p in served.surrogate.named_parameters()}
    reference = redirection_scores(served.surrogate, x, zeroed_outside(
        dense, served.defense.target), "double_backward")
    torch.testing.assert_close(scores, reference.to(scores.dtype), rtol=1e-4, atol=1e-5)


def test_release_free_memory_trims_on_glibc_and_is_a_no_op_elsewhere():
    import platform

    from grad2.serve.loader import release_free_memory

    assert release_free_memory() is (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("method", ["grad2", "grad2_gated"])
def test_all_ones_on_the_head_alone_is_refused(surrogate, method):
    """``all_ones`` on the head alone moves every logit alike: its scores are zero up to
    rounding, so answers would follow rounding noise; the config is refused."""
    x = torch.rand(6, 1, 6, 6)
    head_only = targets.restrict(targets.all_ones(surrogate), surrogate, 1)
    scores = redirection_scores(surrogate, x, head_only, "double_backward")
    assert scores.abs().max() < 1e-5
    raw = {"method": method, "target_layers": 1}
    if method == "grad2_gated":
        raw["ood_answer"] = "redirect"
    with raises_naming("defense.target_layers"):
        build_defense(raw, surrogate=surrogate)
    with pytest.raises(ValueError, match="moves every logit alike"):
        GRAD2(surrogate, 0.5, target_layers=1)
    assert build_defense({**raw, "target_layers": 2}, surrogate=surrogate).target_layers == 2
