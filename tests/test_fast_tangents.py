"""The cheaper forward-mode rules (``grad2.fast_tangents``) against PyTorch's generic ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from grad2 import fast_tangents
from grad2.fast_tangents import CheapTangents
from grad2.models import build_model
from grad2.scores import redirection_scores

torch.set_num_threads(1)


def warmed(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> nn.Module:
    """``model`` in ``dtype`` with non-trivial batch-norm statistics, in eval mode."""
    model = model.to(dtype).train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape, generator=generator, dtype=dtype))
    return model.eval()


def gaussian_target(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=generator, dtype=p.dtype)
        for n, p in model.named_parameters()
    }


def both_scores(monkeypatch, model, x, target) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cheap, generic)`` JVP scores of the same call, batch-norms not folded (so that the
    cheap batch-norm rule is compared; tests/test_folding.py compares the folding)."""
    generic = redirection_scores(model, x, target, "jvp", fold=False, rules=False)
    return redirection_scores(model, x, target, "jvp_cheap", fold=False), generic


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max())


def inputs_with_ties(batch: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Half zeros, half small integers: flat regions and exact ties in every layer."""
    generator = torch.Generator().manual_seed(1)
    values = torch.randint(-2, 3, (batch, *shape), generator=generator).to(dtype)
    return torch.where(torch.rand(values.shape, generator=generator) < 0.5, 0, values)


MODELS = {
    "small_cnn": (lambda: build_model("small_cnn"), (1, 28, 28)),
    "wide_cnn": (lambda: build_model("wide_cnn"), (1, 28, 28)),
    "resnet18": (lambda: build_model("torchvision:resnet18", 10, 3), (3, 32, 32)),
    "mobilenet_v3_small": (lambda: build_model("torchvision:mobilenet_v3_small", 10, 3),
                           (3, 32, 32)),
}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(MODELS))
def test_cheap_rules_equal_generic_forward_ad(monkeypatch, name, dtype):
    """Every fast path active (also on small pools): the same scores up to rounding."""
    monkeypatch.setattr(fast_tangents, "MIN_POOL_ELEMENTS", 0)
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = warmed(build(), shape, dtype)
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    cheap, generic = both_scores(monkeypatch, model, x, gaussian_target(model, 3))
    assert generic.abs().max() > 1e-6
    assert relative_error(cheap, generic) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["small_cnn", "wide_cnn"])
def test_rules_other_than_batch_norm_are_bit_identical_ties_included(monkeypatch, name, dtype):
    """Max-pool, ReLU and the first convolution give PyTorch's bits, on inputs full of ties
    (so the pool's size threshold cannot change a score)."""
    monkeypatch.setattr(fast_tangents, "MIN_POOL_ELEMENTS", 0)
    exact = {f: h for f, h in fast_tangents._HANDLERS.items() if f is not F.batch_norm}
    monkeypatch.setattr(fast_tangents, "_HANDLERS", exact)
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = warmed(build(), shape, dtype)
    x = inputs_with_ties(6, shape, dtype)
    cheap, generic = both_scores(monkeypatch, model, x, gaussian_target(model, 4))
    assert torch.equal(cheap, generic)


def test_cheap_scores_match_double_backward_with_ties(monkeypatch):
    monkeypatch.setattr(fast_tangents, "MIN_POOL_ELEMENTS", 0)
    torch.manual_seed(0)
    model = warmed(build_model("small_cnn"), (1, 28, 28), torch.float64)
    x = inputs_with_ties(4, (1, 28, 28), torch.float64)
    target = gaussian_target(model, 5)
    reference = redirection_scores(model, x, target, "double_backward")
    assert relative_error(redirection_scores(model, x, target, "jvp"), reference) <= 1e-10


def generic_pool(x: torch.Tensor, tangent: torch.Tensor, kernel) -> tuple[torch.Tensor, ...]:
    """PyTorch's forward-mode rule of max-pool: the value and the tangent at its index."""
    value, index = F.max_pool2d(x, kernel, return_indices=True)
    return value, tangent.flatten(-2).gather(-1, index.flatten(-2)).view_as(value)


@pytest.mark.parametrize("kernel", [2, 3, (2, 3), (1, 2)])
@pytest.mark.parametrize("size", [(8, 8), (7, 9), (12, 6)])
def test_max_pool_takes_the_first_maximal_element(monkeypatch, kernel, size):
    """Ties everywhere (integers in [0, 3)), windows cropped at odd sizes: the value and the
    tangent equal ``max_pool2d_with_indices`` + gather bit for bit."""
    monkeypatch.setattr(fast_tangents, "MIN_POOL_ELEMENTS", 0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (3, 4, *size), generator=generator).float()
    tangent = torch.randn(x.shape, generator=generator)
    with forward_ad.dual_level():
        pooled = fast_tangents._max_pool2d(forward_ad.make_dual(x, tangent), kernel)
        assert pooled is not NotImplemented
        value, pooled_tangent = forward_ad.unpack_dual(pooled)
    expected_value, expected_tangent = generic_pool(x, tangent, kernel)
    assert torch.equal(value, expected_value)
    assert torch.equal(pooled_tangent, expected_tangent)


def test_max_pool_keeps_nans_in_the_value(monkeypatch):
    monkeypatch.setattr(fast_tangents, "MIN_POOL_ELEMENTS", 0)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    x[0, 0, 0, 1] = torch.nan
    with forward_ad.dual_level():
        pooled = fast_tangents._max_pool2d(forward_ad.make_dual(x, torch.ones_like(x)), 2)
        value = forward_ad.unpack_dual(pooled).primal
    assert torch.equal(value.isnan(), F.max_pool2d(x, 2).isnan())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "stride": 2, "padding": 1},  # resnet's stem
        {"kernel_size": 2, "stride": 1},
        {"kernel_size": 2, "padding": 1},
        {"kernel_size": 2, "dilation": 2},
        {"kernel_size": 2, "ceil_mode": True},
        {"kernel_size": 2, "return_indices": True},
    ],
)
def test_max_pool_falls_back_outside_its_conditions(monkeypatch, kwargs):
    """The cheap rule declines; through the mode, PyTorch's rule gives the same result."""
    monkeypatch.setattr(fast_tangents, "MIN_POOL_ELEMENTS", 0)
    generator = torch.Generator().manual_seed(0)
    x, tangent = torch.randn(2, 3, 9, 9, generator=generator), torch.randn(2, 3, 9, 9)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, tangent)
        assert fast_tangents._max_pool2d(dual, **kwargs) is NotImplemented
        generic = F.max_pool2d(dual, **kwargs)
        with CheapTangents():
            through_mode = F.max_pool2d(dual, **kwargs)
        if kwargs.get("return_indices"):
            (generic, _), (through_mode, _) = generic, through_mode
        for a, b in zip(forward_ad.unpack_dual(generic), forward_ad.unpack_dual(through_mode)):
            assert torch.equal(a, b)


def test_max_pool_below_the_size_threshold_falls_back():
    x = torch.randn(1, 2, 8, 8)
    assert x.numel() < fast_tangents.MIN_POOL_ELEMENTS
    with forward_ad.dual_level():
        assert fast_tangents._max_pool2d(forward_ad.make_dual(x, x.clone()), 2) is NotImplemented


def test_training_batch_norm_and_reverse_mode_inputs_fall_back():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        assert fast_tangents._batch_norm(dual, mean, var, training=True) is NotImplemented
        assert fast_tangents._batch_norm(dual, None, None) is NotImplemented
        needs_grad = x.clone().requires_grad_(True)
        assert fast_tangents._relu(needs_grad) is NotImplemented
        assert fast_tangents._batch_norm(needs_grad, mean, var) is NotImplemented


@pytest.mark.parametrize("affine", ["weight_and_bias", "weight_tangent_only", "none"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 3), (2, 3, 7)])
def test_batch_norm_tangent_for_every_parameter(affine, shape):
    """Tangents along input, weight and bias (each alone and together), 1d/2d inputs."""
    generator = torch.Generator().manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64)

    x, mean, var = rand(*shape), rand(3), rand(3).abs() + 0.5
    weight = bias = weight_t = bias_t = None
    if affine != "none":
        weight, bias, weight_t = rand(3), rand(3), rand(3)
        bias_t = rand(3) if affine == "weight_and_bias" else None
    for x_t in (rand(*shape), None):
        with forward_ad.dual_level():
            args = (
                x if x_t is None else forward_ad.make_dual(x, x_t), mean, var,
                None if weight is None else forward_ad.make_dual(weight, weight_t),
                None if bias is None else (
                    bias if bias_t is None else forward_ad.make_dual(bias, bias_t)
                ),
            )
            generic = forward_ad.unpack_dual(F.batch_norm(*args, eps=1e-3))
            cheap = fast_tangents._batch_norm(*args, eps=1e-3)
            if generic.tangent is None:
                assert cheap is NotImplemented
                continue
            cheap = forward_ad.unpack_dual(cheap)
        assert torch.equal(cheap.primal, generic.primal)
        assert torch.allclose(cheap.tangent, generic.tangent, rtol=1e-12, atol=1e-12)


def test_in_place_relu_updates_the_dual_it_was_given():
    x, tangent = torch.randn(3, 5), torch.randn(3, 5)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x.clone(), tangent)
        with CheapTangents():
            result = F.relu(dual, inplace=True)
        assert result is dual
        primal, new_tangent = forward_ad.unpack_dual(dual)
    assert torch.equal(primal, torch.relu(x))
    assert torch.equal(new_tangent, torch.where(x > 0, tangent, 0))


def test_first_convolution_skips_the_zero_input_tangent():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    weight, weight_t = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    bias, bias_t = torch.randn(4), torch.randn(4)
    with forward_ad.dual_level():
        args = (x, forward_ad.make_dual(weight, weight_t), forward_ad.make_dual(bias, bias_t))
        generic = forward_ad.unpack_dual(F.conv2d(*args, padding=1))
        cheap = forward_ad.unpack_dual(fast_tangents._conv2d(*args, padding=1))
        with_input_tangent = forward_ad.make_dual(x, torch.ones_like(x))
        assert fast_tangents._conv2d(with_input_tangent, *args[1:]) is NotImplemented
    assert torch.equal(cheap.primal, generic.primal)
    assert torch.equal(cheap.tangent, generic.tangent)


def test_mode_is_only_active_inside_jvp_scores():
    torch.manual_seed(0)
    model = warmed(build_model("small_cnn"), (1, 28, 28), torch.float32)
    redirection_scores(model, torch.randn(2, 1, 28, 28), gaussian_target(model, 1))
    assert not torch.overrides._get_current_function_mode_stack()


@pytest.mark.parametrize(("name", "fold", "expected"), [
    ("small_cnn", False, {"_conv2d", "_batch_norm", "_relu", "_max_pool2d"}),
    ("resnet18", False, {"_conv2d", "_batch_norm", "_relu"}),  # its stem pool overlaps
    # Folded (the default), every batch-norm of both has gone into its convolution.
    ("small_cnn", True, {"_conv2d", "_relu", "_max_pool2d"}),
    ("resnet18", True, {"_conv2d", "_relu"}),
])
def test_which_cheap_rules_a_model_uses(monkeypatch, name, fold, expected):
    used: set[str] = set()

    def counting(handler):
        def wrapped(*args, **kwargs):
            result = handler(*args, **kwargs)
            if result is not NotImplemented:
                used.add(handler.__name__)
            return result
        return wrapped

    handlers = {f: counting(h) for f, h in fast_tangents._HANDLERS.items()}
    monkeypatch.setattr(fast_tangents, "_HANDLERS", handlers)
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = warmed(build(), shape, torch.float32)
    redirection_scores(model, torch.randn(32, *shape), gaussian_target(model, 1), "jvp_cheap",
                       fold=fold)
    assert used == expected
