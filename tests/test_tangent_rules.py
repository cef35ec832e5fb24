"""JVP scores by explicit tangent rules (grad2.tangent_rules) against forward-mode autograd
and double backward, in both memory layouts, and the fallback where a layer has no rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grad2 import targets
from grad2.folding import fold_batch_norm, folded_inputs
from grad2.models import build_model, set_memory_format
from grad2.scores import (
    _dense,
    _program,
    is_expanded,
    path_scores,
    redirection_scores,
    tangent_like,
)
from grad2.tangent_ops import _gather_planes
from grad2.tangent_rules import compile_rules, log_softmax_tangent


class Functional(nn.Module):
    """The functional and method forms the rules cover, in one network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4 + 8, 5)
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        y = self.norm(self.grouped(x))
        x = F.hardswish(x) + torch.sigmoid(y) * 2.0 - F.gelu(y) * self.scale
        x = F.max_pool2d(x, 2)
        pooled = F.adaptive_avg_pool2d(torch.tanh(x), 1).view(x.size(0), -1)
        x = torch.flatten(F.silu(x), 1)
        return self.head(torch.cat([x, pooled], dim=1))


NETWORKS = {
    "small_cnn": (lambda: build_model("small_cnn"), (1, 28, 28)),
    "wide_cnn": (lambda: build_model("wide_cnn"), (1, 28, 28)),
    "resnet18": (lambda: build_model("torchvision:resnet18", 10, 3), (3, 32, 32)),
    "mobilenet_v3_small": (lambda: build_model("torchvision:mobilenet_v3_small", 10, 3),
                           (3, 32, 32)),
    "functional": (Functional, (3, 8, 8)),
}


def prepared(build, dtype: torch.dtype = torch.float64) -> nn.Module:
    """An eval-mode network whose batch-norms have non-trivial statistics and affine terms."""
    torch.manual_seed(0)
    model = build().to(dtype).eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            if module.affine:
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
    return model


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_rules_equal_forward_mode_autograd(name: str, fold: bool) -> None:
    """The same scores as ``forward_ad`` (float64), folded or not (unfolded, the
    batch-norm rule runs), and the program really ran (every layer has a rule)."""
    build, shape = NETWORKS[name]
    model = prepared(build)
    assert compile_rules(model) is not None
    target = targets.random(model, 3)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rules = path_scores(model, x, target, "rules" if fold else "rules_unfolded")
    autograd = path_scores(model, x, target, "forward_ad" if fold else "forward_ad_unfolded")
    assert autograd.abs().max() > 1e-3
    assert relative_error(rules, autograd) <= 1e-12


@pytest.mark.parametrize("name", ["small_cnn", "wide_cnn", "functional"])
def test_rules_equal_double_backward(name: str) -> None:
    """An independent computation: reverse over reverse."""
    build, shape = NETWORKS[name]
    model = prepared(build)
    target = targets.random(model, 4)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rules = redirection_scores(model, x, target, "jvp")
    reference = redirection_scores(model, x, target, "double_backward")
    assert relative_error(rules, reference) <= 1e-10


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "mobilenet_v3_small"])
def test_channels_last_gives_the_same_scores(name: str) -> None:
    """A channels-last network (``handler.memory_format``) scores as the contiguous one."""
    build, shape = NETWORKS[name]
    model = prepared(build)
    target = targets.random(model, 5)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    contiguous = redirection_scores(model, x, target, "jvp")
    set_memory_format(model, "channels_last")
    channels_last = redirection_scores(model, x, target, "jvp")
    assert relative_error(channels_last, contiguous) <= 1e-12


def test_channels_last_tangents_keep_the_layout_of_their_values() -> None:
    """Each node's tangent has its value's layout: a stray contiguous tangent makes every
    later convolution and pointwise rule convert (small_cnn's one-channel first layer gave
    one before its folded tangent weight was put in the weight's layout)."""
    model = set_memory_format(prepared(lambda: build_model("small_cnn"), torch.float32),
                              "channels_last")
    params = {name: p.detach() for name, p in model.named_parameters()}
    tangents = tangent_like(params, targets.all_ones(model))
    # all_ones stays expanded (stride 0) until the engine reads it: dense copies then.
    assert all(is_expanded(tangents[name]) for name, p in params.items() if p.numel() > 1)
    folded = fold_batch_norm(model)
    params, tangents, buffers = folded_inputs(folded, params, tangents,
                                              dict(model.named_buffers()))
    tangents = _dense(params, tangents)
    assert all(tangents[name].stride() == p.stride() for name, p in params.items())
    program = compile_rules(folded.module)
    seen = []
    for index, (node, rule) in enumerate(program.steps):
        def spy(context, node, args, kwargs, rule=rule):
            value, tangent = rule(context, node, args, kwargs)
            seen.append((node.name, value, tangent))
            return value, tangent
        program.steps = (*program.steps[:index], (node, spy), *program.steps[index + 1:])
    program(params, tangents, buffers, torch.randn(8, 1, 28, 28))
    four_d = [(name, value, tangent) for name, value, tangent in seen
              if tangent is not None and value.dim() == 4]
    assert len(four_d) >= 9
    for name, value, tangent in four_d:
        assert tangent.stride() == value.stride(), name


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gather_planes_picks_each_window_maximum(layout: torch.memory_format) -> None:
    x = torch.randn(3, 5, 9, 7).contiguous(memory_format=layout)
    tangent = torch.randn(3, 5, 9, 7).contiguous(memory_format=layout)
    _, indices = F.max_pool2d(x, 2, return_indices=True)
    picked = _gather_planes(tangent, indices)
    expected = tangent.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)
    assert torch.equal(picked, expected)
    assert picked.is_contiguous(memory_format=layout)


class WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cumsum(self.norm(self.body(x)), dim=1))


def test_a_layer_without_rule_falls_back_to_forward_mode_autograd() -> None:
    model = WithLayerNorm().double().eval()
    assert compile_rules(model) is None
    target = targets.random(model, 6)
    x = torch.randn(4, 6, dtype=torch.float64)
    scores = redirection_scores(model, x, target, "jvp")
    reference = redirection_scores(model, x, target, "double_backward")
    assert relative_error(scores, reference) <= 1e-10


def test_untraceable_network_falls_back() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) if x.sum() > 0 else -self.linear(x)

    model = DataDependent().double().eval()
    assert compile_rules(model) is None
    x = torch.ones(2, 4, dtype=torch.float64)
    target = targets.random(model, 7)
    scores = redirection_scores(model, x, target, "jvp")
    assert relative_error(scores, redirection_scores(model, x, target, "double_backward")) < 1e-10


def test_program_refuses_training_mode_batch_norm() -> None:
    model = prepared(lambda: build_model("wide_cnn"))
    program = compile_rules(model)
    params = {name: p.detach() for name, p in model.named_parameters()}
    tangents = tangent_like(params, targets.all_ones(model))
    model.train()
    with pytest.raises(RuntimeError, match="eval-mode batch-norm"):
        program(params, tangents, dict(model.named_buffers()),
                torch.randn(2, 1, 28, 28, dtype=torch.float64))


def test_program_is_recompiled_when_a_submodule_is_replaced() -> None:
    model = prepared(lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)))
    first = _program(model)
    assert first is not None and first.matches(model)
    model[1] = nn.Tanh()
    assert not first.matches(model)
    target = targets.random(model, 8)
    x = torch.randn(3, 4, dtype=torch.float64)
    scores = redirection_scores(model, x, target, "jvp")
    assert _program(model) is not first
    assert relative_error(scores, redirection_scores(model, x, target, "double_backward")) < 1e-10


def test_log_softmax_tangent_is_the_directional_derivative() -> None:
    logits = torch.randn(4, 7, dtype=torch.float64)
    direction = torch.randn(4, 7, dtype=torch.float64)
    _, expected = torch.func.jvp(lambda z: torch.log_softmax(z, -1), (logits,), (direction,))
    assert torch.allclose(log_softmax_tangent(logits, direction), expected, atol=1e-14)


class StandardisedConv(nn.Conv2d):
    """A subclass whose ``forward`` differs from its parent's (weight standardisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


def test_a_subclass_with_its_own_forward_gets_no_parent_rule() -> None:
    model = nn.Sequential(StandardisedConv(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model = model.double().eval()
    assert compile_rules(model) is None
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    target = targets.random(model, 9)
    scores = redirection_scores(model, x, target, "jvp")
    assert relative_error(scores, redirection_scores(model, x, target, "double_backward")) < 1e-10


def test_bias_only_direction_of_an_unbatched_linear_leaves_the_target_intact() -> None:
    """A target moving only a linear layer's bias, on an input without a batch dimension:
    the tangent starts as the bias direction itself and must not be updated in place."""

    class Unbatched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.second = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x.view(-1))).view(1, -1)

    model = Unbatched().double().eval()
    program = compile_rules(model)
    params = {name: p.detach() for name, p in model.named_parameters()}
    # The second layer: no weight direction, a bias direction, an input with a tangent.
    tangents = {"first.weight": torch.randn(4, 4, dtype=torch.float64),
                "second.bias": torch.randn(3, dtype=torch.float64)}
    kept = tangents["second.bias"].clone()
    x = torch.randn(1, 4, dtype=torch.float64)
    _, logits_tangent = program(params, tangents, {}, x)
    assert torch.equal(tangents["second.bias"], kept)
    expected = params["second.weight"] @ (tangents["first.weight"] @ x[0]) + kept
    assert torch.allclose(logits_tangent[0], expected, atol=1e-12)


class ArgumentForms(nn.Module):
    """Options given by position (``F.relu(x, True)`` is ``inplace=True``) or keyword, and
    a sum with ``alpha``. ``share=True``: the in-place activation overwrites a tensor that
    a later node reads too, which the rules (that never overwrite) cannot reproduce."""

    def __init__(self, share: bool) -> None:
        super().__init__()
        self.share = share
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x)
        activated = F.hardswish(hidden, True)
        later = F.relu(hidden) if self.share else F.relu(self.second(x), True)
        skip = activated + F.gelu(self.second(x), approximate="tanh")
        return self.head(torch.add(skip, later, alpha=0.5))


@pytest.mark.parametrize("share", [False, True])
def test_options_given_by_position_or_keyword_are_honoured(share: bool) -> None:
    model = ArgumentForms(share).double().eval()
    assert (compile_rules(model) is None) == share  # shared: forward-mode autograd
    target = targets.random(model, 10)
    x = torch.randn(3, 4, dtype=torch.float64)
    kept = x.clone()
    scores = redirection_scores(model, x, target, "jvp")
    assert torch.equal(x, kept)
    reference = redirection_scores(model, x, target, "double_backward")
    assert relative_error(scores, reference) <= 1e-10
