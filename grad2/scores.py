"""Redirection scores ``c = G t``: how each class's log-probability moves along ``t``.

``G = ∂ log_softmax(model(x)) / ∂θ`` is ``[B, K, P]``; ``t`` is a parameter-space
direction given as a dict keyed like ``model.named_parameters()``. Three independent
computations are offered (they agree to numerical precision; the tests check it):

- ``"jvp"``: forward mode; one pass (three convolutions per convolution, two for the
  first), independent of ``K`` (docs/performance.md measures it against a forward).
  Eval batch-norms that follow a convolution are folded into it first
  (:mod:`grad2.folding`: same scores up to rounding). Where every layer of the
  (folded) network has an explicit tangent rule (:mod:`grad2.tangent_rules`:
  convolutions, linear layers, batch-norm, pools, common activations, ``+``, ``*``,
  reshapes) the primal and the tangent run as plain tensor operations; otherwise through
  ``torch.autograd.forward_ad`` dual parameters and ``torch.func.functional_call``. The
  other ways of running the engine (:data:`JVP_PATHS`) are for benchmarks and tests:
  :func:`jvp_kernel` and :func:`path_scores`.
- ``"double_backward"``: reverse over reverse, ``∂⟨∇_θ Σ u·ℓ, t⟩/∂u``, the way the
  authors' code computes it.
- ``"finite_difference"``: a central difference of two plain forward passes along ``t``.

The model runs in eval mode (batch-norm uses running statistics), so a row's scores
never depend on its batch-mates. The model's own mode is restored afterwards.

Bit for bit, on a CPU, that also needs MKL in strict reproducibility mode
(``MKL_CBWR=AUTO,STRICT`` in the environment before torch's first matrix product): MKL's
default GEMM gives a row other last bits depending on the number of rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call

from grad2.folding import FoldedNetwork, fold_batch_norm, folded_inputs
from grad2.tangent_rules import TangentProgram, compile_rules, log_softmax_tangent

Target = Mapping[str, Tensor]
#: Ways of computing ``c = G t``; every one agrees with the others to rounding.
METHODS = ("jvp", "double_backward", "finite_difference")
#: The paths of the ``jvp`` engine, as ``(fold batch-norms, tangent rules)``. ``rules`` is
#: what :func:`redirection_scores` runs; the others are what it falls back to or replaces.
JVP_PATHS: dict[str, tuple[bool, bool]] = {
    "rules": (True, True),
    "rules_unfolded": (False, True),
    "forward_ad": (True, False),
    "forward_ad_unfolded": (False, False),
}


def redirection_scores(model: nn.Module, x: Tensor, target: Target, method: str = "jvp"
                       ) -> Tensor:
    """``[B, K]`` scores ``c = G t`` of ``model`` at inputs ``x`` (``[B, ...]``).

    Parameters missing from ``target`` get a zero direction. ``method`` is one of
    :data:`METHODS`.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return _scores(model, x, target, method, *JVP_PATHS["rules"])


def path_scores(model: nn.Module, x: Tensor, target: Target, path: str) -> Tensor:
    """:func:`redirection_scores` by ``jvp`` along one of :data:`JVP_PATHS` (for
    comparing the engine's paths)."""
    if path not in JVP_PATHS:
        raise ValueError(f"path must be one of {', '.join(JVP_PATHS)}; got {path!r}")
    return _scores(model, x, target, "jvp", *JVP_PATHS[path])


def jvp_kernel(model: nn.Module, target: Target, path: str = "rules"
               ) -> Callable[[Tensor], Tensor]:
    """``x -> [B, K] scores``: the ``jvp`` engine along ``path`` on ``x`` exactly as given,
    without :func:`redirection_scores`' wrapper (eval mode, and a lone query computed as a
    batch of two for bit-identical answers). For benchmarks and ``torch.compile``; the
    model must already be in eval mode."""
    fold, rules = JVP_PATHS[path]
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    tangents = tangent_like(params, target)
    network, folded = model, _folded(model) if fold else None
    if folded is not None:
        network = folded.module
        params, tangents, buffers = folded_inputs(folded, params, tangents, buffers)
    program = _program(network) if rules else None

    def scores(x: Tensor) -> Tensor:
        if program is not None:
            return log_softmax_tangent(*program(params, tangents, buffers, x))
        return _jvp_scores(network, params, buffers, tangents, x)

    return scores


def _scores(model: nn.Module, x: Tensor, target: Target, method: str, fold: bool,
            rules: bool) -> Tensor:
    compute = _METHODS[method]
    if torch.is_inference_mode_enabled():
        raise RuntimeError("redirection scores need autograd: call them outside inference_mode")
    if x.is_inference():
        x = x.clone()
    # A query's scores must not depend on whether it arrived alone or batched, and CPU
    # kernels may take another path at batch 1 (oneDNN convolutions, MKL's matrix-vector
    # product, a vectorised activation's scalar tail). A lone query runs with only the
    # layers that differ at batch 1 paired (TangentProgram.lone_plan), or as a batch of two
    # (itself twice) when no such plan exists.
    alone = x.shape[0] == 1
    params = {name: p.detach() for name, p in model.named_parameters()}
    tangents = tangent_like(params, target)
    buffers = dict(model.named_buffers())
    with eval_mode(model), torch.enable_grad():
        network = model
        if fold and method == "jvp":
            folded = _folded(model)
            if folded is not None:
                network = folded.module
                params, tangents, buffers = folded_inputs(folded, params, tangents, buffers)
        # A folded network was just checked against ``model`` by ``_folded``.
        program = (_program(network, check=network is model) if rules and method == "jvp"
                   else None)
        plan = _lone_plan(program, params, tangents, buffers, x) if (
            alone and program is not None) else None
        if plan is not None:
            logits, logits_tangent = program(params, tangents, buffers, x, plan)
            return log_softmax_tangent(torch.cat([logits, logits]),
                                       torch.cat([logits_tangent, logits_tangent]))[:1]
        if alone:
            x = torch.cat([x, x])
        if program is not None:
            scores = log_softmax_tangent(*program(params, tangents, buffers, x))
        else:
            scores = compute(network, params, buffers, tangents, x).detach()
    return scores[:1] if alone else scores


def _lone_plan(program: TangentProgram, params, tangents, buffers, x: Tensor
               ) -> frozenset | None:
    """The nodes a lone query of ``x``'s kind runs as a pair (planned on first use, kept
    with the program)."""
    key = (tuple(x.shape), x.dtype, x.device, x.stride())
    if key not in program.lone_plans:
        program.lone_plans[key] = program.lone_plan(params, tangents, buffers, x)
    return program.lone_plans[key]


#: The folded trace of each network seen (None: nothing to fold), until it is collected.
_FOLDED: weakref.WeakKeyDictionary[nn.Module, FoldedNetwork | None] = (
    weakref.WeakKeyDictionary())


def _folded(model: nn.Module) -> FoldedNetwork | None:
    """``model``'s batch-norm-folded trace, made on first use (in eval mode, so that mode
    checks in ``forward`` are traced as they run here) and again if its submodules change."""
    return _cached(_FOLDED, model, fold_batch_norm)


#: The tangent-rule program of each network seen (None: some layer has no rule).
_PROGRAMS: weakref.WeakKeyDictionary[nn.Module, TangentProgram | None] = (
    weakref.WeakKeyDictionary())


def _program(network: nn.Module, check: bool = True) -> TangentProgram | None:
    """``network``'s :class:`TangentProgram`, compiled on first use and again if its
    submodules change (``check=False`` skips that walk over the submodules, for a folded
    network, which is a new module whenever it is refolded; docs/performance.md,
    "Optimisations made", measures the walk)."""
    return _cached(_PROGRAMS, network, compile_rules, check)


def _cached(cache: weakref.WeakKeyDictionary, network: nn.Module, build: Callable,
            check: bool = True):
    """``build(network)`` from ``cache``, rebuilt when ``network`` no longer holds the
    submodules it was built from (``None``, nothing to build, is kept as it is)."""
    if network in cache:
        built = cache[network]
        if built is None or not check or built.matches(network):
            return built
    cache[network] = built = build(network)
    return built


def tangent_like(params: Mapping[str, Tensor], target: Target) -> dict[str, Tensor]:
    """``target`` aligned with ``params``: same keys, dtypes, devices and memory layouts,
    zeros where missing."""
    unknown = sorted(set(target) - set(params))
    if unknown:
        raise ValueError(f"target has entries the model does not: {unknown[:3]}")
    tangents = {}
    for name, param in params.items():
        direction = target.get(name)
        if direction is None:
            tangents[name] = torch.zeros_like(param)
            continue
        if direction.shape != param.shape:
            raise ValueError(
                f"target[{name!r}] has shape {tuple(direction.shape)}, the parameter "
                f"{tuple(param.shape)}"
            )
        direction = direction.to(dtype=param.dtype, device=param.device)
        if direction.stride() != param.stride():
            # Same layout as the parameter (a channels-last surrogate): a tangent of
            # another layout is converted by every operation that meets it.
            direction = torch.empty_like(param).copy_(direction)
        tangents[name] = direction
    return tangents


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, then give every submodule its own mode back (a training
    model with frozen batch-norm stays so)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _log_probs(model: nn.Module, buffers: Mapping[str, Tensor], x: Tensor) -> Callable:
    def log_probs(params: Mapping[str, Tensor]) -> Tensor:
        return torch.log_softmax(functional_call(model, (params, buffers), (x,)), dim=-1)

    return log_probs


def _jvp_scores(model, params, buffers, tangents, x) -> Tensor:
    # torch.autograd.forward_ad directly, not torch.func.jvp: the same forward-mode
    # formulas and bit-identical scores, without functorch's per-operation wrapping.
    with forward_ad.dual_level():
        duals = {name: forward_ad.make_dual(p, tangents[name]) for name, p in params.items()}
        logits = functional_call(model, (duals, buffers), (x,))
        log_probs = torch.log_softmax(logits, dim=-1)
        tangent = forward_ad.unpack_dual(log_probs).tangent
    if tangent is None:  # nothing in the output depends on the parameters
        return torch.zeros_like(log_probs)
    return tangent


def _double_backward_scores(model, params, buffers, tangents, x) -> Tensor:
    leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
    log_probs = _log_probs(model, buffers, x)(leaves)
    # ⟨∇_θ Σ u·ℓ, t⟩ is linear in u with coefficients c = G t, whatever the value of u.
    weights = torch.zeros_like(log_probs, requires_grad=True)
    names = [name for name, tangent in tangents.items() if tangent.any()]
    if not names:
        return torch.zeros_like(log_probs)
    grads = torch.autograd.grad(
        (log_probs * weights).sum(), [leaves[n] for n in names], create_graph=True
    )
    inner = sum((grad * tangents[n]).sum() for grad, n in zip(grads, names))
    (scores,) = torch.autograd.grad(inner, weights)
    return scores


def _finite_difference_scores(model, params, buffers, tangents, x) -> Tensor:
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in tangents.values())).item()
    log_probs = _log_probs(model, buffers, x)
    if norm == 0:
        return torch.zeros_like(log_probs(params))
    # The cube root of machine epsilon balances truncation (h²) against rounding (ε/h).
    step = torch.finfo(x.dtype).eps ** (1 / 3) / norm
    with torch.no_grad():
        forward = log_probs({n: p + step * tangents[n] for n, p in params.items()})
        backward = log_probs({n: p - step * tangents[n] for n, p in params.items()})
    return (forward - backward) / (2 * step)


_METHODS = {
    "jvp": _jvp_scores,
    "double_backward": _double_backward_scores,
    "finite_difference": _finite_difference_scores,
}
