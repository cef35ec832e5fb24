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

import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, fx, nn
from torch.autograd import forward_ad
from torch.func import functional_call
from torch.utils.weak import WeakIdKeyDictionary

from grad2.folding import FoldedNetwork, fold_batch_norm, folded_inputs
from grad2.models import last_linear
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

    Parameters missing from ``target`` have no direction (a zero one): with ``jvp`` the
    layers that no direction reaches run as a plain forward pass. ``method`` is one of
    :data:`METHODS`.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return _scores(model, x, target, method, *JVP_PATHS["rules"])[0]


def scores_and_features(model: nn.Module, x: Tensor, target: Target, method: str = "jvp"
                        ) -> tuple[Tensor, Tensor]:
    """``([B, K] scores, [B, D] features)``: :func:`redirection_scores` and the input of
    ``model``'s last ``nn.Linear`` (flattened), from one pass where the ``jvp`` engine has
    a tangent program (the program's primal), else from a second plain pass. The features
    have the bits :func:`penultimate_features` gives (the batch-norm-folded network's
    primal), which are those of :func:`grad2.models.penultimate` up to rounding."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if method != "jvp":
        return redirection_scores(model, x, target, method), penultimate_features(model, x)
    scores, features = _scores(model, x, target, method, *JVP_PATHS["rules"], features=True)
    return scores, features


def penultimate_features(model: nn.Module, x: Tensor) -> Tensor:
    """``[B, D]``: the input of ``model``'s last ``nn.Linear`` (flattened) at inputs ``x``,
    by a plain pass of the network the ``jvp`` engine runs (batch-norms folded), with the
    bits :func:`scores_and_features` gives, a lone query's included."""
    return _scores(model, x, {}, "jvp", *JVP_PATHS["rules"], features=True)[1]


def path_scores(model: nn.Module, x: Tensor, target: Target, path: str) -> Tensor:
    """:func:`redirection_scores` by ``jvp`` along one of :data:`JVP_PATHS` (for
    comparing the engine's paths)."""
    if path not in JVP_PATHS:
        raise ValueError(f"path must be one of {', '.join(JVP_PATHS)}; got {path!r}")
    return _scores(model, x, target, "jvp", *JVP_PATHS[path])[0]


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
    tangents = _dense(params, tangents)
    program = _program(network) if rules else None

    def scores(x: Tensor) -> Tensor:
        if program is not None:
            return _log_softmax_scores(*program(params, tangents, buffers, x))
        return _jvp_scores(network, params, buffers, tangents, x)

    return scores


def _scores(model: nn.Module, x: Tensor, target: Target, method: str, fold: bool,
            rules: bool, features: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(scores, features or None)``; with an empty ``target`` the scores are zeros and
    only the primal runs."""
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
        tangents = _dense(params, tangents)
        # A folded network was just checked against ``model`` by ``_folded``.
        program = (_program(network, check=network is model) if rules and method == "jvp"
                   else None)
        keep = None
        if features:
            keep_name = last_linear(model)[0]
            keep = program.input_of(keep_name) if program is not None else None
        plan = _lone_plan(program, params, tangents, buffers, x, keep) if (
            alone and program is not None) else None
        pair = torch.cat([x, x]) if alone else x
        found = None
        if program is not None:
            logits, logits_tangent, kept = program.run(
                params, tangents, buffers, x if plan is not None else pair, plan or (), keep)
            if plan is not None:  # the head's softmax as a pair, like every other row
                logits, logits_tangent = _twice(logits), _twice(logits_tangent)
            scores = _log_softmax_scores(logits, logits_tangent)
            if kept is not None:
                found = kept.flatten(1)
        elif tangents or not features:
            scores = compute(network, params, buffers, tangents, pair).detach()
        else:
            scores = None  # features only, no program: no scores to compute
        if features and found is None:  # no program, or no node to keep: a second pass
            found = _hooked_features(network, keep_name, params, buffers, pair)
    if alone:
        scores = None if scores is None else scores[:1]
        found = None if found is None else found[:1]
    return scores, found


def _twice(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else torch.cat([tensor, tensor])


def _log_softmax_scores(logits: Tensor, logits_tangent: Tensor | None) -> Tensor:
    """The scores from the logits and their tangent (``None``: no direction reached the
    logits, zero scores)."""
    if logits_tangent is None:
        return torch.zeros_like(logits)
    return log_softmax_tangent(logits, logits_tangent)


def _hooked_features(network: nn.Module, name: str, params, buffers, x: Tensor) -> Tensor:
    """``[B, D]``: the input of ``network``'s submodule ``name`` in a plain pass with
    ``params`` and ``buffers`` (where no tangent program runs)."""
    captured: list[Tensor] = []
    handle = network.get_submodule(name).register_forward_hook(
        lambda module, args, out: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            functional_call(network, (params, buffers), (x,))
    finally:
        handle.remove()
    return captured[-1].flatten(1)


def _lone_plan(program: TangentProgram, params, tangents, buffers, x: Tensor,
               keep: fx.Node | None = None) -> frozenset | None:
    """The nodes a lone query of ``x``'s kind runs as a pair (planned on first use, kept
    with the program; the parameters that carry a tangent and the kept node are part of
    the kind)."""
    key = (tuple(x.shape), x.dtype, x.device, x.stride(), frozenset(tangents), keep)
    if key not in program.lone_plans:
        program.lone_plans[key] = program.lone_plan(params, tangents, buffers, x, keep=keep)
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
    """``target`` aligned with ``params``: dtypes, devices and memory layouts of the
    parameters (a parameter missing from ``target`` stays missing: no direction). A
    constant direction expanded from one value (stride 0, :func:`grad2.targets.all_ones`)
    stays so; the engine makes a dense copy only of those it reads directly, once."""
    unknown = sorted(set(target) - set(params))
    if unknown:
        raise ValueError(f"target has entries the model does not: {unknown[:3]}")
    tangents = {}
    for name, direction in target.items():
        param = params[name]
        if direction.shape != param.shape:
            raise ValueError(
                f"target[{name!r}] has shape {tuple(direction.shape)}, the parameter "
                f"{tuple(param.shape)}"
            )
        direction = direction.to(dtype=param.dtype, device=param.device)
        if direction.stride() != param.stride() and not is_expanded(direction):
            # Same layout as the parameter (a channels-last surrogate): a tangent of
            # another layout is converted by every operation that meets it.
            direction = torch.empty_like(param).copy_(direction)
        tangents[name] = direction
    return tangents


def nonzero_directions(target: Target) -> dict[str, Tensor]:
    """``target`` without its all-zero tensors (no direction: the layers they belong to
    need no tangent)."""
    return {name: t for name, t in target.items() if is_expanded(t) or bool(t.any())}


def is_expanded(tensor: Tensor) -> bool:
    """Does ``tensor`` repeat its values along some dimension (a stride-0 view)?"""
    return any(stride == 0 and size > 1 for stride, size in zip(tensor.stride(), tensor.shape))


#: The dense copy of each expanded tangent the engine read directly, with its version.
_DENSE = WeakIdKeyDictionary()


def _dense(params: Mapping[str, Tensor], tangents: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tangents`` with each expanded one replaced by a dense copy in its parameter's
    layout (made once per expanded tensor and kept while it lives): kernels read them as
    the dense tangents they replace, with the same bits."""
    dense = dict(tangents)
    for name, tangent in tangents.items():
        if not is_expanded(tangent):
            continue
        param = params[name]
        made = _DENSE.get(tangent)
        if made is None or made[0] != tangent._version or made[1].stride() != param.stride():
            made = (tangent._version, torch.empty_like(param).copy_(tangent))
            _DENSE[tangent] = made
        dense[name] = made[1]
    return dense


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
        duals = {name: forward_ad.make_dual(p, tangents[name]) if name in tangents else p
                 for name, p in params.items()}
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
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in tangents.values()))
    log_probs = _log_probs(model, buffers, x)
    if norm == 0:
        return torch.zeros_like(log_probs(params))
    # The cube root of machine epsilon balances truncation (h²) against rounding (ε/h).
    step = torch.finfo(x.dtype).eps ** (1 / 3) / norm
    with torch.no_grad():
        forward = log_probs({n: p + step * tangents[n] if n in tangents else p
                             for n, p in params.items()})
        backward = log_probs({n: p - step * tangents[n] if n in tangents else p
                              for n, p in params.items()})
    return (forward - backward) / (2 * step)


_METHODS = {
    "jvp": _jvp_scores,
    "double_backward": _double_backward_scores,
    "finite_difference": _finite_difference_scores,
}
