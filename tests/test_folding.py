"""Batch-norm folding (``grad2.folding``) for the JVP scores: the folded network computes
the same function, its JVP equals the unfolded JVP and double backward, and what cannot be
folded is left alone."""

from __future__ import annotations

import pytest
import torch
from nets import MODELS, gaussian_target, relative_error, warmed
from torch import nn

from grad2.folding import fold_batch_norm, folded_inputs
from grad2.models import build_model
from grad2.scores import _FOLDED, path_scores, penultimate_features, redirection_scores

torch.set_num_threads(1)

#: Pairs folded per network (resnet18: one per batch-norm; mobilenet: its 11 depthwise
#: convolutions stay unfolded).
PAIRS = {"small_cnn": 3, "wide_cnn": 2, "resnet18": 20, "mobilenet_v3_small": 23}


def model_named(name: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, tuple]:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    return warmed(build(), shape, dtype), shape


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folded_jvp_equals_unfolded_jvp_and_double_backward(name):
    model, shape = model_named(name)
    x = torch.randn(3, *shape, dtype=torch.float64)
    target = gaussian_target(model, 2)
    folded = redirection_scores(model, x, target)
    assert len(_FOLDED[model].pairs) == PAIRS[name]
    assert relative_error(folded, path_scores(model, x, target, "rules_unfolded")) <= 1e-12
    # Double backward has no rule for mobilenet's hardsigmoid: a central difference there.
    independent = "finite_difference" if name == "mobilenet_v3_small" else "double_backward"
    assert relative_error(folded, redirection_scores(model, x, target, independent)
                          ) <= (1e-6 if name == "mobilenet_v3_small" else 1e-10)


@pytest.mark.parametrize("part", ["conv", "norm"])
def test_fold_along_convolution_or_batch_norm_parameters_alone(part):
    # A direction on only the convolutions' weights, or only the batch-norms' γ and β:
    # each term of the folded tangent on its own.
    model, shape = model_named("small_cnn")
    kinds = nn.Conv2d if part == "conv" else nn.BatchNorm2d
    names = {f"{m}.{p}" for m, module in model.named_modules() if isinstance(module, kinds)
             for p, _ in module.named_parameters(recurse=False)}
    target = {n: t for n, t in gaussian_target(model, 3).items() if n in names}
    x = torch.randn(4, *shape, dtype=torch.float64)
    folded = redirection_scores(model, x, target)
    assert folded.abs().max() > 0
    assert relative_error(folded, path_scores(model, x, target, "rules_unfolded")) <= 1e-12


def test_folded_network_is_the_same_function_and_the_original_is_untouched():
    model, shape = model_named("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = list(model.modules())
    folded = fold_batch_norm(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    folded_params, _, folded_buffers = folded_inputs(folded, params, zeros,
                                                     dict(model.named_buffers()))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.module.modules())
    assert set(folded_params) == {n for n, _ in folded.module.named_parameters()}
    x = torch.randn(2, *shape, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        got = torch.func.functional_call(folded.module, (folded_params, folded_buffers), (x,))
    assert torch.allclose(got, expected, atol=1e-10, rtol=0)
    assert list(model.modules()) == modules_before
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class TwoUses(nn.Module):
    """A convolution whose output feeds its batch-norm and a skip branch: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(4, affine=False)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        tapped = self.conv(x)
        y = torch.relu(self.norm(tapped)) + tapped
        return self.head(torch.relu(self.norm2(self.conv2(y))).flatten(1))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        y = self.norm(self.conv(x))
        if y.sum() > 0:  # not traceable by torch.fx
            y = -y
        return self.head(y.flatten(1))


def test_what_cannot_be_folded_is_left_alone():
    model = warmed(TwoUses(), (1, 8, 8), torch.float64)
    folded = fold_batch_norm(model)
    # conv → norm is not folded (two users); conv2 → norm2 is (an affine-free norm).
    assert [(p.conv, p.norm, p.affine, p.conv_bias) for p in folded.pairs] == [
        ("conv2", "norm2", False, False)]
    no_stats = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                             nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    assert fold_batch_norm(no_stats) is None  # uses batch statistics even in eval mode
    assert fold_batch_norm(warmed(DataDependent(), (1, 8, 8), torch.float64)) is None
    assert fold_batch_norm(nn.Sequential(nn.Flatten(), nn.Linear(64, 5))) is None
    for network in (model, warmed(DataDependent(), (1, 8, 8), torch.float64)):
        x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
        target = gaussian_target(network, 4)
        assert relative_error(redirection_scores(network, x, target),
                              redirection_scores(network, x, target, "double_backward")
                              ) <= 1e-10


def test_parameter_updates_and_replaced_submodules_are_seen():
    model, shape = model_named("small_cnn")
    x = torch.randn(3, *shape, dtype=torch.float64)
    target = gaussian_target(model, 5)
    redirection_scores(model, x, target)
    first = _FOLDED[model]
    values = dict(first.cache)
    redirection_scores(model, x, target)
    penultimate_features(model, x)  # a primal-only pass: the tangents' slot is kept
    assert first.cache.keys() == values.keys()
    assert all(first.cache[slot][2] is values[slot][2] for slot in values)  # reused
    with torch.no_grad():  # in place, as an optimiser step or load_state_dict does
        model[1].weight.mul_(1.5)
        model[1].running_var.add_(0.3)
        model[4].weight.add_(0.1)
    assert relative_error(redirection_scores(model, x, target),
                          path_scores(model, x, target, "rules_unfolded")) <= 1e-12
    assert _FOLDED[model] is first  # the trace is kept, the fold redone
    assert all(first.cache[slot][2] is not values[slot][2] for slot in values)
    replacement = nn.BatchNorm2d(32).double().eval()
    replacement.running_mean.normal_()
    model[5] = replacement
    assert relative_error(redirection_scores(model, x, target),
                          path_scores(model, x, target, "rules_unfolded")) <= 1e-12
    assert _FOLDED[model] is not first


class ModeDependent(nn.Module):
    """``forward`` branches on ``self.training``: the trace must take the eval branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        y = self.norm(self.conv(x))
        if self.training:
            y = torch.nn.functional.dropout(y, 0.5, training=True)
        return self.head(y.flatten(1))


def test_a_training_mode_model_is_traced_in_eval_mode_and_gets_its_mode_back():
    model = warmed(ModeDependent(), (1, 8, 8), torch.float64).train()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    target = gaussian_target(model, 6)
    folded = redirection_scores(model, x, target)
    assert model.training and model.norm.training
    assert torch.equal(folded, redirection_scores(model, x, target))  # no dropout traced
    assert relative_error(folded, redirection_scores(model, x, target, "double_backward")
                          ) <= 1e-10


def test_float32_folded_scores_agree_with_unfolded_to_rounding():
    torch.manual_seed(0)
    model = warmed(build_model("small_cnn"), (1, 28, 28), torch.float32)
    x = torch.randn(16, 1, 28, 28)
    target = gaussian_target(model, 7)
    assert relative_error(redirection_scores(model, x, target),
                          path_scores(model, x, target, "rules_unfolded")) <= 1e-5
