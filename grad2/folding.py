"""Batch-norm folding for the JVP scores.

In eval mode a batch-norm that follows a convolution is an affine map of the convolution's
output, so the pair is one convolution with weight ``W' = W·s`` and bias
``b' = (b − μ)·s + β``, where ``s = γ / sqrt(σ² + eps)``. The network's output depends on
``(W, b, γ, β)`` only through ``(W', b')``, so by the chain rule its JVP along a parameter
direction ``(W_t, b_t, γ_t, β_t)`` is the folded network's JVP along

    W'_t = W_t·s + W·s_t,   b'_t = b_t·s + (b − μ)·s_t + β_t,   s_t = γ_t / sqrt(σ² + eps).

The folded network has no batch-norm to differentiate, whose forward-mode rule is several
passes over the activations (what it saves: docs/performance.md, "Batch-norm folding").
The scores are the same up to float rounding (the tests compare them with the unfolded JVP
and with double backward).

:func:`fold_batch_norm` traces a network once with ``torch.fx`` (``None`` when it cannot be
traced or has no convolution/batch-norm pair to fold); :func:`folded_inputs` maps the
current parameters, their tangents and the buffers onto the folded network, refolding
whenever one of the tensors it reads has been replaced or updated in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, fx, nn

log = logging.getLogger(__name__)

_CONV_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


@dataclass(frozen=True)
class FoldPair:
    """One convolution and the eval batch-norm folded into it (qualified module names)."""

    conv: str
    norm: str
    eps: float
    conv_bias: bool
    affine: bool


@dataclass(frozen=True)
class FoldedNetwork:
    """A traced copy of a network with each foldable batch-norm removed and its convolution
    given a bias. ``module`` shares every other submodule with the original; ``leaves``
    records which original submodule each name referred to when it was traced."""

    module: fx.GraphModule
    pairs: tuple[FoldPair, ...]
    leaves: tuple[tuple[str, nn.Module], ...]
    #: The last folded values with the tensors (and their versions) they came from.
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def replaced(self) -> frozenset[str]:
        """The original parameter names the folded convolutions replace."""
        names = set()
        for pair in self.pairs:
            names.add(f"{pair.conv}.weight")
            if pair.conv_bias:
                names.add(f"{pair.conv}.bias")
            if pair.affine:
                names.update((f"{pair.norm}.weight", f"{pair.norm}.bias"))
        return frozenset(names)

    @cached_property
    def statistics(self) -> tuple[str, ...]:
        """The running statistics the fold reads."""
        return tuple(f"{pair.norm}.{kind}" for pair in self.pairs
                     for kind in ("running_mean", "running_var"))

    def matches(self, model: nn.Module) -> bool:
        """Does ``model`` still hold the submodules it was traced with?"""
        return holds_leaves(model, self.leaves)


def holds_leaves(model: nn.Module, leaves: tuple[tuple[str, nn.Module], ...]) -> bool:
    """Is each ``(name, module)`` of ``leaves`` still ``model``'s submodule of that name?"""
    try:
        return all(model.get_submodule(name) is leaf for name, leaf in leaves)
    except AttributeError:
        return False


def fold_batch_norm(model: nn.Module) -> FoldedNetwork | None:
    """Trace ``model`` and fold every convolution → batch-norm pair where the convolution is
    not grouped, its output feeds only the batch-norm and the batch-norm keeps running
    statistics.

    Returns ``None`` when ``model`` cannot be traced by ``torch.fx`` or has nothing to fold
    (the JVP then runs on ``model`` itself).
    """
    try:
        module = fx.symbolic_trace(model)
    except Exception as error:  # tracing fails in many ways on data-dependent code
        log.debug("no batch-norm folding for %s: %s", type(model).__name__, error)
        return None
    submodules = dict(module.named_modules())
    leaves = tuple((node.target, submodules[node.target]) for node in module.graph.nodes
                   if node.op == "call_module")
    pairs = []
    for node in list(module.graph.nodes):
        norm = submodules.get(node.target) if node.op == "call_module" else None
        source = node.args[0] if node.args else None
        if norm is None or not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        conv = submodules[source.target]
        # Grouped (depthwise) convolutions are left unfolded: on a CPU their forward-mode
        # rule with a bias costs more than the batch-norm's tangent passes (measured on
        # mobilenet_v3_small: docs/performance.md, "Batch-norm folding").
        if (type(norm) is not _CONV_BN.get(type(conv)) or conv.groups != 1
                or len(source.users) != 1
                or len(node.args) != 1 or node.kwargs or not norm.track_running_stats
                or norm.running_mean is None or norm.running_var is None):
            continue
        # The folded convolution's own tensors are never read (its values come from
        # folded_inputs): it shares the original weight, and only its bias is new.
        biased = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size,
                            conv.stride, conv.padding, conv.dilation, conv.groups, True,
                            conv.padding_mode, device="meta", dtype=conv.weight.dtype)
        biased.weight = conv.weight
        biased.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                               device=conv.weight.device))
        parent, _, name = source.target.rpartition(".")
        # fx gives the traced copy its own containers, so this leaves ``model`` unchanged.
        setattr(module.get_submodule(parent) if parent else module, name, biased)
        node.replace_all_uses_with(source)
        module.graph.erase_node(node)
        pairs.append(FoldPair(source.target, node.target, float(norm.eps),
                              conv.bias is not None, norm.affine))
    if not pairs:
        return None
    module.graph.lint()
    module.recompile()
    module.delete_all_unused_submodules()
    return FoldedNetwork(module, tuple(pairs), leaves)


def folded_inputs(
    folded: FoldedNetwork,
    params: Mapping[str, Tensor],
    tangents: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """``(params, tangents, buffers)`` of ``folded.module`` from the original network's
    (all keyed like ``named_parameters()`` / ``named_buffers()``). A parameter without a
    tangent has no direction; a folded one has none when none of its sources has.

    The folded values are reused while every tensor they come from is the same memory at
    the same version (an in-place update bumps it), so a served network pays the fold once.
    """
    owned = folded.replaced
    statistics = [buffers[n] for n in folded.statistics]
    param_sources = [params[n] for n in owned] + statistics
    folded_params = _reused(folded.cache, "params", param_sources,
                            lambda: _fold_params(folded, params, buffers))
    # One slot per set of parameters with a tangent: a primal-only pass (the gate's
    # features) or another restriction of the target does not refold the others.
    names = frozenset(n for n in owned if n in tangents)
    folded_tangents = _reused(
        folded.cache, ("tangents", names),
        param_sources + [tangents[n] for n in sorted(names)],
        lambda: _fold_tangents(folded, params, tangents, buffers)) if names else {}
    norms = tuple(f"{pair.norm}." for pair in folded.pairs)
    params = {n: v for n, v in params.items() if n not in owned} | folded_params
    tangents = {n: v for n, v in tangents.items() if n not in owned} | folded_tangents
    buffers = {n: v for n, v in buffers.items() if not n.startswith(norms)}
    return params, tangents, buffers


def _reused(cache: dict, slot: object, sources: list[Tensor], fold: Callable[[], dict]
            ) -> dict[str, Tensor]:
    """``fold()``, or its value kept in ``cache[slot]`` while every tensor of
    ``sources`` is the same memory at the same version."""
    key = _versions(sources)
    kept = cache.get(slot)
    if key is not None and kept is not None and kept[0] == key:
        return kept[2]
    values = fold()
    # The sources are kept with the key so that their memory cannot be reused meanwhile.
    cache[slot] = (key, sources, values)
    return values


def _versions(tensors: list[Tensor]) -> tuple | None:
    """Where each tensor's data lives and its version: ``p.detach()`` of the same parameter
    gives a new object each call but the same memory and version counter."""
    try:
        return tuple((t.data_ptr(), t._version, t.dtype, t.shape, t.stride()) for t in tensors)
    except RuntimeError:  # inference tensors keep no version counter: never cache
        return None


def _scales(pair: FoldPair, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(inv_std, scale, beta, centred)`` of one pair: ``s = γ / sqrt(σ² + eps)``, the
    batch-norm's shift and the convolution's centred bias ``b − μ``."""
    mean = buffers[f"{pair.norm}.running_mean"]
    inv_std = torch.rsqrt(buffers[f"{pair.norm}.running_var"] + pair.eps)
    if pair.affine:
        scale, beta = params[f"{pair.norm}.weight"] * inv_std, params[f"{pair.norm}.bias"]
    else:
        scale, beta = inv_std, torch.zeros_like(inv_std)
    centred = params[f"{pair.conv}.bias"] - mean if pair.conv_bias else -mean
    return inv_std, scale, beta, centred


def _fold_params(folded: FoldedNetwork, params: Mapping[str, Tensor],
                 buffers: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The folded convolutions' parameters ``W' = W·s``, ``b' = (b − μ)·s + β``."""
    folded_params: dict[str, Tensor] = {}
    for pair in folded.pairs:
        weight = params[f"{pair.conv}.weight"]
        _, scale, beta, centred = _scales(pair, params, buffers)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        folded_params[f"{pair.conv}.weight"] = _layout_of(weight, weight * scale.view(shape))
        folded_params[f"{pair.conv}.bias"] = centred * scale + beta
    return folded_params


def _fold_tangents(folded: FoldedNetwork, params: Mapping[str, Tensor],
                   tangents: Mapping[str, Tensor], buffers: Mapping[str, Tensor]
                   ) -> dict[str, Tensor]:
    """The folded convolutions' tangents (only where one of its sources has one; a
    missing source tangent counts as zero)."""
    folded_tangents: dict[str, Tensor] = {}
    for pair in folded.pairs:
        weight_t = tangents.get(f"{pair.conv}.weight")
        gamma_t = tangents.get(f"{pair.norm}.weight") if pair.affine else None
        beta_t = tangents.get(f"{pair.norm}.bias") if pair.affine else None
        bias_t = tangents.get(f"{pair.conv}.bias") if pair.conv_bias else None
        if weight_t is None and gamma_t is None and beta_t is None and bias_t is None:
            continue  # no direction reaches this convolution: it runs as a plain one
        weight = params[f"{pair.conv}.weight"]
        inv_std, scale, _, centred = _scales(pair, params, buffers)
        zero = torch.zeros_like(inv_std)
        scale_t = zero if gamma_t is None else gamma_t * inv_std
        weight_t = torch.zeros_like(weight) if weight_t is None else weight_t
        shape = (-1,) + (1,) * (weight.dim() - 1)
        folded_tangents[f"{pair.conv}.weight"] = _layout_of(
            weight, weight_t * scale.view(shape) + weight * scale_t.view(shape))
        folded_bias_t = centred * scale_t + (zero if beta_t is None else beta_t)
        folded_tangents[f"{pair.conv}.bias"] = (folded_bias_t if bias_t is None
                                                else bias_t * scale + folded_bias_t)
    return folded_tangents


def _layout_of(like: Tensor, tensor: Tensor) -> Tensor:
    """``tensor`` in ``like``'s memory layout. Elementwise results of a channels-last
    weight whose layout is ambiguous (one input channel) come out contiguous, and a
    convolution's output takes its weights' layout: one stray layout makes every later
    operation convert."""
    if tensor.stride() == like.stride():
        return tensor
    return torch.empty_like(like).copy_(tensor)
