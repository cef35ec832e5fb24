"""Target directions (``grad2.targets``) against manual computations, and their files."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from grad2 import targets

torch.set_num_threads(1)


def net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(12, 4),
    ).double()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 6, 6, dtype=torch.float64))
    return model.eval()


def manual_mean_gradient(model: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> dict:
    """``mean_b ∇_θ Σ_k weights_bk log p(k | x_b)``: one example at a time, on the model."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for b in range(len(x)):
        log_probs = torch.log_softmax(model(x[b : b + 1]), dim=-1)[0]
        grads = torch.autograd.grad((weights[b] * log_probs).sum(), list(params.values()))
        for n, g in zip(params, grads):
            total[n] += g / len(x)
    return total


def assert_same(a: dict, b: dict, atol: float = 1e-12) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name


def test_all_ones_covers_every_parameter_batch_norm_included():
    model = net()
    target = targets.all_ones(model)
    assert set(target) == {n for n, _ in model.named_parameters()}
    assert {"1.weight", "1.bias"} <= set(target)  # batch-norm affine terms
    for name, p in model.named_parameters():
        assert torch.equal(target[name], torch.ones_like(p))
        assert target[name].dtype == p.dtype


def test_random_is_seeded_and_reproducible():
    model = net()
    a, b, c = targets.random(model, 7), targets.random(model, 7), targets.random(model, 8)
    assert_same(a, b, atol=0)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    # Drawn in float32 on the CPU in parameter order, whatever the model's dtype.
    generator = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        expected = torch.randn(p.shape, generator=generator, dtype=torch.float32).double()
        assert torch.equal(a[name], expected), name
        assert a[name].dtype == torch.float64


def test_watermark_is_the_mean_log_likelihood_gradient_of_the_pairs():
    model = net()
    triggers = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 1, 2])
    one_hot = torch.nn.functional.one_hot(labels, 4).double()
    assert_same(targets.watermark(model, triggers, labels),
                manual_mean_gradient(model, triggers, one_hot))


def test_min_ip_is_minus_the_mean_clean_gradient():
    model = net()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    probs = torch.softmax(torch.randn(6, 4, dtype=torch.float64), dim=1)
    expected = {n: -g for n, g in manual_mean_gradient(model, x, probs).items()}
    assert_same(targets.min_ip(model, x, probs), expected)


def test_targets_leave_the_model_as_they_found_it():
    model = net()
    model.train()
    model[1].eval()  # frozen batch-norm
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    targets.watermark(model, x, torch.tensor([0, 1, 2, 3]))
    targets.min_ip(model, x, torch.full((4, 4), 0.25, dtype=torch.float64))
    assert [m.training for m in model.modules()] == [m is not model[1] for m in model.modules()]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_inference_tensors_are_accepted():
    model = net()
    with torch.inference_mode():
        x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    target = targets.watermark(model, x, torch.tensor([1, 2, 3]))
    assert all(t.isfinite().all() for t in target.values())


def test_save_load_round_trip(tmp_path):
    model = net()
    target = targets.random(model, 3)
    path = targets.save(target, tmp_path / "sub" / "target.pt")
    loaded = targets.load(path, model)
    assert_same(loaded, target, atol=0)
    # A float32 model gets float32 tensors back.
    loaded32 = targets.load(path, net().float())
    assert all(t.dtype == torch.float32 for t in loaded32.values())
    # A file holds plain tensors only: it loads with weights_only=True.
    assert set(torch.load(path, weights_only=True)) == set(target)


def test_load_refuses_wrong_shapes(tmp_path):
    model = net()
    target = targets.all_ones(model)
    target["5.weight"] = torch.ones(4, 13)
    path = targets.save(target, tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"5\.weight.*shape"):
        targets.load(path, model)


def test_load_refuses_unknown_names(tmp_path):
    model = net()
    target = {**targets.all_ones(model), "head.weight": torch.ones(2)}
    path = targets.save(target, tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"head\.weight"):
        targets.load(path, model)


@pytest.mark.parametrize("content", ["list", "tensor", "text", "pickle", "non-tensor", "empty",
                                     "nan"])
def test_load_refuses_files_that_are_not_tensor_dicts(tmp_path, content):
    model = net()
    path = tmp_path / "t.pt"
    if content == "list":
        torch.save([torch.ones(1)], path)
    elif content == "tensor":
        torch.save(torch.ones(3), path)
    elif content == "text":
        path.write_text("all_ones\n")
    elif content == "pickle":  # an arbitrary pickle: refused by weights_only loading
        path.write_bytes(pickle.dumps(object()))
    elif content == "non-tensor":
        torch.save({"0.bias": [1.0, 2.0, 3.0]}, path)
    elif content == "empty":
        torch.save({}, path)
    else:
        torch.save({"0.bias": torch.tensor([1.0, float("nan"), 0.0])}, path)
    with pytest.raises(ValueError):
        targets.load(path, model)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        targets.load(tmp_path / "absent.pt", net())


def test_a_partial_target_is_allowed():
    """A target may cover some parameters only (the others get a zero direction)."""
    model = net()
    targets.check({"5.weight": torch.ones(4, 12)}, model)
