"""Redirection scores ``c = G t`` (``grad2.scores``) against an explicit per-class Jacobian.

The reference loops over examples and classes, takes ``∇_θ log p(k | x_b)`` with
``torch.autograd.grad`` on the model itself (no ``torch.func``) and dots it with ``t``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from nets import gaussian_target, relative_error
from torch import nn

from grad2 import targets
from grad2.scores import METHODS, redirection_scores

torch.set_num_threads(1)


def explicit_scores(model: nn.Module, x: torch.Tensor, target: dict) -> torch.Tensor:
    """``[B, K]``: ``Σ_p ∂ log p(k|x_b)/∂θ_p · t_p``, one backward pass per (b, k)."""
    was_training = model.training
    model.eval()
    named = dict(model.named_parameters())
    names = list(named)
    rows = []
    with torch.enable_grad():
        for b in range(x.shape[0]):
            log_probs = torch.log_softmax(model(x[b : b + 1]), dim=-1)[0]
            row = []
            for k in range(log_probs.shape[0]):
                grads = torch.autograd.grad(
                    log_probs[k], [named[n] for n in names], retain_graph=True, allow_unused=True
                )
                total = sum(
                    (g * target[n]).sum()
                    for g, n in zip(grads, names)
                    if g is not None and n in target
                )
                row.append(torch.as_tensor(total, dtype=x.dtype))
            rows.append(torch.stack(row))
    model.train(was_training)
    return torch.stack(rows).detach()


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(),
        nn.Linear(12, 5),
    )


def bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 7),
    )


def warm_batch_norm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give batch-norm non-trivial running statistics (then eval mode)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.3 * torch.randn_like(x))
    return model.eval()


TOLERANCE = {"jvp": 1e-8, "double_backward": 1e-8, "finite_difference": 1e-5}


@pytest.fixture(scope="module")
def small_nets():
    torch.manual_seed(0)
    nets = {
        "mlp": (warm_batch_norm(mlp().double(), torch.randn(32, 6, dtype=torch.float64)),
                torch.randn(4, 6, dtype=torch.float64)),
        "bn_cnn": (
            warm_batch_norm(bn_cnn().double(), torch.randn(16, 1, 12, 12, dtype=torch.float64)),
            torch.randn(3, 1, 12, 12, dtype=torch.float64),
        ),
    }
    return nets


@pytest.mark.parametrize("net", ["mlp", "bn_cnn"])
@pytest.mark.parametrize("target_kind", ["all_ones", "gaussian", "partial"])
def test_methods_match_explicit_jacobian_on_small_nets(small_nets, net, target_kind):
    model, x = small_nets[net]
    if target_kind == "all_ones":
        target = targets.all_ones(model)
    elif target_kind == "gaussian":
        target = gaussian_target(model, 1)
    else:  # only some parameters: the others get a zero direction
        target = {n: t for i, (n, t) in enumerate(gaussian_target(model, 2).items()) if i % 2}
    reference = explicit_scores(model, x, target)
    assert reference.abs().max() > 1e-6  # a non-trivial check
    for method in METHODS:
        scores = redirection_scores(model, x, target, method)
        assert scores.shape == reference.shape and scores.dtype == torch.float64
        assert relative_error(scores, reference) <= TOLERANCE[method], method


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()
    warm_batch_norm(model, torch.randn(4, 3, 32, 32, dtype=torch.float64))
    return model, torch.randn(2, 3, 32, 32, dtype=torch.float64)


@pytest.mark.parametrize("method", METHODS)
def test_methods_match_explicit_jacobian_on_resnet18(resnet, method):
    model, x = resnet
    target = gaussian_target(model, 3)
    reference = _resnet_reference(model, x, target)
    scores = redirection_scores(model, x, target, method)
    assert relative_error(scores, reference) <= TOLERANCE[method]


_REFERENCE_CACHE: dict = {}


def _resnet_reference(model, x, target):
    if "resnet" not in _REFERENCE_CACHE:
        _REFERENCE_CACHE["resnet"] = explicit_scores(model, x, target)
    return _REFERENCE_CACHE["resnet"]


def test_all_ones_last_layer_adds_nothing(small_nets):
    """Along ``t = 1`` on the last linear layer every logit moves alike: zero scores."""
    model, x = small_nets["mlp"]
    last = {n: torch.ones_like(p) for n, p in model.named_parameters() if n.startswith("5.")}
    for method in ("jvp", "double_backward"):
        assert redirection_scores(model, x, last, method).abs().max() < 1e-12


def test_zero_target_gives_zero_scores(small_nets):
    model, x = small_nets["bn_cnn"]
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for method in METHODS:
        assert torch.equal(redirection_scores(model, x, zero, method), torch.zeros(3, 7).double())


@pytest.mark.parametrize("method", METHODS)
def test_train_mode_and_running_stats_are_restored(method):
    torch.manual_seed(1)
    model = warm_batch_norm(bn_cnn().double(), torch.randn(8, 1, 12, 12, dtype=torch.float64))
    x = torch.randn(3, 1, 12, 12, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    target = targets.all_ones(model)

    model.train()
    train_scores = redirection_scores(model, x, target, method)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    eval_scores = redirection_scores(model, x, target, method)
    assert not any(m.training for m in model.modules())
    # Eval mode is used either way: batch-norm statistics untouched, same scores.
    assert torch.equal(train_scores, eval_scores)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())

    # A mixed configuration (training model, frozen batch-norm) comes back as it was.
    model.train()
    model[1].eval()
    redirection_scores(model, x, target, method)
    assert [m.training for m in model.modules()] == [
        m is not model[1] for m in model.modules()
    ]


@pytest.mark.parametrize("method", METHODS)
def test_works_under_no_grad(small_nets, method):
    model, x = small_nets["bn_cnn"]
    target = targets.all_ones(model)
    expected = redirection_scores(model, x, target, method)
    with torch.no_grad():
        scores = redirection_scores(model, x, target, method)
    assert torch.equal(scores, expected)
    assert not scores.requires_grad


@pytest.mark.parametrize("method", METHODS)
def test_raises_under_inference_mode(small_nets, method):
    model, x = small_nets["mlp"]
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        redirection_scores(model, x, targets.all_ones(model), method)


def test_accepts_inputs_made_under_inference_mode(small_nets):
    """The handler's victim runs under inference_mode; its input tensors are inference tensors."""
    model, x = small_nets["bn_cnn"]
    with torch.inference_mode():
        x_inference = x.clone()
    target = targets.all_ones(model)
    for method in METHODS:
        assert torch.equal(
            redirection_scores(model, x_inference, target, method),
            redirection_scores(model, x, target, method),
        )


def test_bad_arguments_raise(small_nets):
    model, x = small_nets["mlp"]
    with pytest.raises(ValueError, match="method"):
        redirection_scores(model, x, targets.all_ones(model), "reverse")
    with pytest.raises(ValueError, match="does not"):
        redirection_scores(model, x, {"nope.weight": torch.ones(1)})
    wrong = targets.all_ones(model)
    wrong["0.weight"] = torch.ones(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        redirection_scores(model, x, wrong)


def test_float32_methods_agree():
    torch.manual_seed(2)
    model = warm_batch_norm(bn_cnn(), torch.randn(16, 1, 12, 12))
    x = torch.randn(5, 1, 12, 12)
    target = gaussian_target(model, 4)
    jvp = redirection_scores(model, x, target, "jvp")
    assert jvp.dtype == torch.float32
    assert relative_error(redirection_scores(model, x, target, "double_backward"), jvp) < 1e-4
    # A float32 central difference steps 5e-3/‖t‖ and crosses ReLU and max-pool kinks:
    # about 1e-4 on a smooth net, up to a few 1e-2 here.
    assert relative_error(redirection_scores(model, x, target, "finite_difference"), jvp) < 5e-2


# ---------------------------------------------------------------------------------------
# Batch independence, bit for bit.
#
# Findings on this CPU build (torch 2.14.1, MKL 2024.2, oneDNN 3.12):
# - MKL's GEMM (nn.Linear, float32 and float64) gives a row different last bits depending
#   on how many rows the matrix has, unless MKL runs in strict conditional-numerical-
#   reproducibility mode (MKL_CBWR=AUTO,STRICT; COMPATIBLE,STRICT is not enough). Nothing in
#   torch.backends or torch.use_deterministic_algorithms changes this.
# - oneDNN's float32 convolutions use another kernel at batch size 1 than at batch >= 2
#   (rows agree for every batch size >= 2); redirection_scores therefore evaluates a
#   single query as a batch of two.
# The checks run in a subprocess, because MKL reads MKL_CBWR once, at its first call.

_BATCH_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    from grad2 import targets
    from grad2.scores import METHODS, redirection_scores
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = {}
    for dtype in (torch.float32, torch.float64):
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * 7 * 7, 10),
        ).to(dtype)
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(32, 1, 28, 28, dtype=dtype))
        model.eval()
        x = torch.randn(40, 1, 28, 28, dtype=dtype)
        target = targets.all_ones(model)
        for method in METHODS:
            full = redirection_scores(model, x, target, method)
            alone = sum(
                not torch.equal(redirection_scores(model, x[i:i + 1], target, method)[0],
                                full[i])
                for i in (0, 17, 39)
            )
            mates = sum(
                not torch.equal(redirection_scores(model, x[i - j:i - j + n], target,
                                                   method)[j], full[i])
                for i in (5, 30) for n in (2, 3, 8, 33) for j in (0, 1, n - 1) if i - j >= 0
                and i - j + n <= 40
            )
            results[f"{dtype}-{method}-alone"] = alone
            results[f"{dtype}-{method}-mates"] = mates
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def batch_mismatches():
    env = {**os.environ, "MKL_CBWR": "AUTO,STRICT", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _BATCH_SCRIPT], capture_output=True, text=True, env=env,
        timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.float64"])
@pytest.mark.parametrize("method", METHODS)
def test_scores_bit_identical_alone_and_among_batch_mates(batch_mismatches, dtype, method):
    """With MKL in strict reproducibility mode, a row's scores do not depend on the batch:
    alone or with 1 to 32 batch-mates, at the start, middle or end."""
    assert batch_mismatches[f"{dtype}-{method}-alone"] == 0
    assert batch_mismatches[f"{dtype}-{method}-mates"] == 0
