"""The ``defense:`` and ``input:`` sections and ``build_defense``: every bad value names its key."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from grad2 import targets
from grad2.config import ConfigError, HandlerConfig, InputConfig
from grad2.defenses import (
    DEFENSES,
    GRAD2,
    MAD,
    MADArgmax,
    NoDefense,
    RandomNoise,
    ReverseSigmoid,
    Rounding,
    Top1,
    build_defense,
    parse_config,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def surrogate() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).eval()


def raises_naming(key: str):
    """``ConfigError`` whose message starts with ``key:``."""
    return pytest.raises(ConfigError, match="^" + re.escape(key) + ":")


BAD_DEFENSE_VALUES = [
    ({"epsilon": -0.1}, "defense.epsilon"),
    ({"epsilon": math.nan}, "defense.epsilon"),
    ({"epsilon": 2.01}, "defense.epsilon"),
    ({"epsilon": math.inf}, "defense.epsilon"),
    ({"epsilon": "0.5"}, "defense.epsilon"),
    ({"epsilon": True}, "defense.epsilon"),
    ({"epsilon": None}, "defense.epsilon"),
    ({"method": "grad3"}, "defense.method"),
    ({"method": None}, "defense.method"),
    ({"target": "all_twos"}, "defense.target"),
    ({"scores": "reverse_mode"}, "defense.scores"),
    ({"on_failure": "raw"}, "defense.on_failure"),
    ({"output": "logits"}, "defense.output"),
    ({"topk": 0}, "defense.topk"),
    ({"topk": 2.5}, "defense.topk"),
    ({"seed": -1}, "defense.seed"),
    ({"decimals": 9}, "defense.decimals"),
    ({"beta": -1}, "defense.beta"),
    ({"gamma": 0}, "defense.gamma"),
    ({"preserve_top1": "yes"}, "defense.preserve_top1"),
    ({"preserve_top1": 1}, "defense.preserve_top1"),
    ({"epsilon_l1": 0.5}, "defense.epsilon_l1"),  # an unknown key, named
    ({"surrogate": "../surrogate.pt"}, "defense.surrogate"),
    ({"surrogate": ""}, "defense.surrogate"),
    ({"surrogate": None}, "defense.surrogate"),  # grad2 needs one
    ({"method": "mad", "surrogate": None}, "defense.surrogate"),
    ({"method": "mad_argmax", "surrogate": None}, "defense.surrogate"),
    ({"method": "mad", "preserve_top1": True}, "defense.preserve_top1"),
    ({"method": "rounding", "preserve_top1": True}, "defense.preserve_top1"),
    ({"method": "reverse_sigmoid", "preserve_top1": True}, "defense.preserve_top1"),
    ({"target": "watermark"}, "defense.target"),  # research: served as target file
    ({"target": "min_ip"}, "defense.target"),  # depends on the batch: lab only
    ({"target": "file"}, "defense.target_file"),  # needs its tensor file
    ({"target": "file", "target_file": "a/b.pt"}, "defense.target_file"),
    ({"target": "all_ones", "target_file": "t.pt"}, "defense.target_file"),  # not used
    ({"method": "mad", "target": "file", "target_file": "t.pt"}, "defense.target"),
    ({"method": "grad2_gated"}, "defense.mapping_key"),  # permute needs its key
    ({"method": "grad2_gated", "ood_answer": "redirect", "mapping_key": "k"},
     "defense.mapping_key"),
    ({"method": "grad2", "mapping_key": "k"}, "defense.mapping_key"),
    ({"method": "grad2_gated", "ood_answer": "flip", "mapping_key": "k"}, "defense.ood_answer"),
    ({"method": "grad2_gated", "mapping_key": "k", "epsilon_ood": 2.5}, "defense.epsilon_ood"),
    ({"method": "grad2_gated", "mapping_key": "k", "gate_score": "features"},
     "defense.gate_file"),
    ({"method": "grad2_gated", "mapping_key": "k", "gate_file": "g.pt"}, "defense.gate_file"),
    ({"method": "grad2_gated", "mapping_key": "k", "gate_threshold": 1.5},
     "defense.gate_threshold"),  # an msp threshold is a probability
    ({"method": "grad2_gated", "mapping_key": "k", "gate_slope": 0}, "defense.gate_slope"),
    ({"method": "grad2_gated", "mapping_key": "k", "target": "min_ip"}, "defense.target"),
    ({"method": "adaptive_misinformation", "gate_score": "features"}, "defense.gate_score"),
    ({"method": "adaptive_misinformation", "gate_file": "g.pt"}, "defense.gate_file"),
    ({"method": "adaptive_misinformation", "surrogate": None}, "defense.surrogate"),
]


@pytest.mark.parametrize(("raw", "key"), BAD_DEFENSE_VALUES,
                         ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD_DEFENSE_VALUES)])
def test_bad_defense_values_name_their_key(raw, key):
    with raises_naming(key) as caught:
        parse_config(raw)
    assert caught.value.key == key
    assert isinstance(caught.value, ValueError)
    # build_defense validates a raw mapping the same way.
    with raises_naming(key):
        build_defense(raw, surrogate=None)


def test_missing_or_malformed_section():
    with raises_naming("defense"):
        parse_config(None)
    with raises_naming("defense"):
        parse_config(["method", "grad2"])


def test_a_key_of_another_method_names_the_methods_that_take_it():
    with pytest.raises(ConfigError, match=r"methods that do: .*mad_argmax"):
        parse_config({"method": "mad", "preserve_top1": True})


def test_preserve_top1_is_accepted_where_it_holds():
    for method in ("grad2", "grad2_gated", "random", "none", "top1", "mad_argmax"):
        raw = {"method": method, "preserve_top1": True}
        if method == "grad2_gated":
            raw["mapping_key"] = "k"
        assert parse_config(raw).params["preserve_top1"]


@pytest.mark.parametrize("method", ["grad2", "mad", "mad_argmax"])
def test_build_without_surrogate_names_the_key(method):
    with raises_naming("defense.surrogate"):
        build_defense({"method": method}, surrogate=None)


def test_build_file_target_without_tensors_names_target_file(surrogate):
    config = {"target": "file", "target_file": "watermark.pt"}
    with raises_naming("defense.target_file"):
        build_defense(config, surrogate=surrogate, files={})


@pytest.mark.parametrize("problem", ["shape", "unknown", "empty", "nan"])
def test_build_with_a_target_that_does_not_fit_names_target_file(surrogate, problem):
    target = targets.all_ones(surrogate)
    if problem == "shape":
        target["4.weight"] = torch.ones(3, 5)
    elif problem == "unknown":
        target["fc.weight"] = torch.ones(3)
    elif problem == "empty":
        target = {}
    else:
        target["4.bias"] = torch.tensor([0.0, math.nan, 1.0])
    config = {"target": "file", "target_file": "target.pt"}
    with raises_naming("defense.target_file"):
        build_defense(config, surrogate=surrogate, files={"target_file": target})


GOOD = [
    ({"method": "none"}, NoDefense),
    ({"method": "top1"}, Top1),
    ({"method": "rounding", "decimals": 3}, Rounding),
    ({"method": "reverse_sigmoid", "beta": 0.5, "gamma": 0.2}, ReverseSigmoid),
    ({"method": "random", "epsilon": 0.3, "seed": 4}, RandomNoise),
    ({"method": "mad", "epsilon": 0.3}, MAD),
    ({"method": "mad_argmax", "epsilon": 0.3}, MADArgmax),
    ({"method": "grad2", "epsilon": 0.3}, GRAD2),
    ({}, GRAD2),
]


@pytest.mark.parametrize(("raw", "cls"), GOOD, ids=[c.__name__ + str(i) for i, (_, c) in
                                                    enumerate(GOOD)])
def test_good_configs_build_the_right_class(surrogate, raw, cls):
    defense = build_defense(raw, surrogate=surrogate)
    assert type(defense) is cls
    config = parse_config(raw)
    if hasattr(defense, "epsilon"):
        assert defense.epsilon == config.params["epsilon"]
    assert repr(defense).startswith(cls.__name__)
    # Every defense answers a batch on the simplex.
    x = torch.randn(4, 1, 6, 6)
    probs = torch.softmax(torch.randn(4, 3), dim=1)
    out = defense(x, probs)
    assert out.shape == probs.shape and (out >= 0).all()


def test_config_accepts_exactly_the_registry_and_its_capabilities():
    """The method names, their keys, and which need a surrogate come from the defense
    classes (one list): every registered method validates with its own keys and defaults,
    refuses the keys it does not declare, and other names do not validate."""
    for name, cls in DEFENSES.items():
        raw = {"method": name, "surrogate": "s.pt" if cls.needs_surrogate else None}
        own = {param.name: param for param in cls.params}
        if "mapping_key" in own:
            raw["mapping_key"] = "mapping.key"
        config = parse_config(raw)
        assert config.defense is cls
        assert config.needs_surrogate == cls.needs_surrogate
        assert config.budgeted == ("epsilon" in own)
        assert set(config.params) == set(own)
        for key, param in own.items():
            assert config.params[key] == raw.get(key, param.default)
        for key in {p.name for other in DEFENSES.values() for p in other.params} - set(own):
            with raises_naming(f"defense.{key}"):
                parse_config({**raw, key: None})
    for control in ("control_random_scores", "jvp_cheap", "RandomScores"):
        with pytest.raises(ConfigError, match=r"defense\.method"):
            parse_config({"method": control})


def test_parameters_reach_the_defense(surrogate):
    assert build_defense({"method": "rounding", "decimals": 3}).decimals == 3
    rs = build_defense({"method": "reverse_sigmoid", "beta": 0.5, "gamma": 0.2})
    assert (rs.beta, rs.gamma) == (0.5, 0.2)
    noise = build_defense({"method": "random", "epsilon": 0.3, "seed": 4,
                           "preserve_top1": True})
    assert (noise.seed, noise.preserve_top1) == (4, True)
    grad2 = build_defense({"epsilon": 0.7, "scores": "double_backward", "preserve_top1": True},
                          surrogate=surrogate)
    assert (grad2.epsilon, grad2.score_method, grad2.preserve_top1) == (
        0.7, "double_backward", True)
    assert grad2.target_name == "all_ones"


def test_random_and_file_targets(surrogate):
    seeded = build_defense({"target": "random", "seed": 9}, surrogate=surrogate)
    expected = targets.random(surrogate, 9)
    assert seeded.target_name == "tensor"
    assert all(torch.equal(seeded.target[n], expected[n]) for n in expected)

    watermark = targets.watermark(surrogate, torch.randn(2, 1, 6, 6), torch.tensor([0, 2]))
    built = build_defense({"target": "file", "target_file": "watermark.pt"},
                          surrogate=surrogate, files={"target_file": watermark})
    assert built.target_name == "tensor"
    assert all(torch.equal(built.target[n], watermark[n]) for n in watermark)


def test_defaults_are_the_product_defaults():
    config = parse_config({})
    params = config.params
    assert (config.method, params["epsilon"], params["target"], params["scores"]) == (
        "grad2", 0.5, "all_ones", "jvp")
    assert (params["preserve_top1"], config.on_failure, config.surrogate) == (
        False, "reject", "surrogate.pt")
    assert parse_config({"epsilon": 0}).params["epsilon"] == 0.0
    assert parse_config({"epsilon": 2}).params["epsilon"] == 2.0
    assert parse_config({}).to_dict()["epsilon"] == 0.5


# ---------------------------------------------------------------------------------------
# input:

BAD_INPUT_VALUES = [
    ({"channels": 0}, "input.channels"),
    ({"channels": 5}, "input.channels"),
    ({"height": 0}, "input.height"),
    ({"width": 10_000}, "input.width"),
    ({"channels": 3, "mean": [0.5, 0.5]}, "input.mean"),
    ({"std": [0.0]}, "input.std[0]"),
    ({"mean": [math.nan]}, "input.mean[0]"),
    ({"mean": "0.5"}, "input.mean"),
    ({"max_side": 0}, "input.max_side"),
    ({"threads": 0}, "input.threads"),
    ({"resize": 32}, "input.resize"),
]


@pytest.mark.parametrize(("raw", "key"), BAD_INPUT_VALUES,
                         ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD_INPUT_VALUES)])
def test_bad_input_values_name_their_key(raw, key):
    with raises_naming(key) as caught:
        InputConfig.from_dict(raw)
    assert caught.value.key == key


def test_good_input_sections():
    assert InputConfig.from_dict(None) == InputConfig()
    config = InputConfig.from_dict({"channels": 3, "height": 32, "width": 32,
                                    "mean": [0.5, 0.4, 0.3], "std": 0.25})
    assert config.mean == (0.5, 0.4, 0.3) and config.std == (0.25, 0.25, 0.25)
    assert (config.channels, config.height, config.width) == (3, 32, 32)


def test_handler_section_defaults_and_values():
    assert HandlerConfig.from_dict(None) == HandlerConfig(True, "channels_last")
    assert HandlerConfig.from_dict({"memory_format": "contiguous", "batch_invariant": False}) \
        == HandlerConfig(False, "contiguous")


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"memory_format": "nhwc"}, "handler.memory_format"),
        ({"memory_format": None}, "handler.memory_format"),
        ({"batch_invariant": "yes"}, "handler.batch_invariant"),
        ({"batch_size": 4}, "handler.batch_size"),
        (["memory_format"], "handler"),
    ],
)
def test_bad_handler_values_name_their_key(raw, key):
    with pytest.raises(ConfigError) as raised:
        HandlerConfig.from_dict(raw)
    assert raised.value.key == key
