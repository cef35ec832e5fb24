"""JVP scores by explicit tangent rules: plain tensor operations, no autograd.

Forward mode through ``torch.autograd.forward_ad`` pays the autograd machinery on every
operation (dual tensors, a forward-mode formula looked up and dispatched per call);
docs/performance.md, "Channels-last and tangent rules", measures what that costs a small
surrogate at serving batch sizes. Most classifiers are built from a handful of layer types
whose tangent rules are short, so :func:`compile_rules` traces a network once with
``torch.fx`` and, when *every* node has a rule here, returns a :class:`TangentProgram`
that runs the primal and the tangent side by side as ordinary tensor operations under
``no_grad``:

- convolution / linear ``y = W x + b``: ``ẏ = W ẋ + Ẇ x + ḃ`` (two calls, one where the
  input has no tangent: the first layer), not one call on ``[W; Ẇ]`` of twice the
  output channels (docs/performance.md, "Channels-last and tangent rules");
- eval batch-norm ``y = (x − μ)·s + β``, ``s = γ / sqrt(σ² + eps)``:
  ``ẏ = ẋ·s + (x − μ)/sqrt(σ² + eps)·γ̇ + β̇``;
- ReLU, Hardswish, Hardsigmoid, SiLU, sigmoid, tanh, GELU: ``ẏ = f'(x)·ẋ`` through the
  same ``aten`` backward kernels PyTorch's own forward-mode formulas call;
- max-pool: the tangent at the index of each window's maximum; linear maps (average
  pools, flatten, reshape, dropout in eval, identity, ``+``, ``−``, concatenation): the
  same map on the tangent; ``*`` by the product rule;
- the head's ``log_softmax``: ``ż − Σ softmax(z)·ż`` (in :func:`log_softmax_tangent`).

Anything else (an unknown module or function, a convolution with another padding mode, a
max-pool that returns its indices) makes :func:`compile_rules` return ``None``, and the
scores are computed by ``forward_ad`` as before; a batch-norm or dropout found in training
mode at run time raises (scores are defined in eval mode). The two computations agree up
to float rounding (tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from grad2.batching import memory_layout
from grad2.folding import holds_leaves
from grad2.tangent_ops import Dual, NoRuleError, RuleContext, lookup, rule_for, split_arg

log = logging.getLogger(__name__)


@dataclass
class TangentProgram:
    """A traced network whose every node has an explicit tangent rule."""

    module: fx.GraphModule
    steps: tuple[tuple[fx.Node, Callable], ...]
    #: Which submodule each name referred to when the network was traced.
    leaves: tuple[tuple[str, nn.Module], ...]
    #: Per step, the nodes it reads last: their values are let go after it, so a call
    #: holds no more activations than a plain forward pass does.
    releases: tuple[tuple[fx.Node, ...], ...]
    #: Lone-query plans found so far, by input (shape, dtype, device, strides), the
    #: parameters with a tangent and the node kept.
    lone_plans: dict[tuple, frozenset[fx.Node] | None] = field(default_factory=dict)
    #: The input node of each module name asked for by :meth:`input_of`.
    inputs_of: dict[str, fx.Node | None] = field(default_factory=dict)

    def matches(self, network: nn.Module) -> bool:
        """Does ``network`` still hold the submodules it was compiled with?"""
        return holds_leaves(network, self.leaves)

    def input_of(self, module_name: str) -> fx.Node | None:
        """The node whose value is the (first) input of the last call of submodule
        ``module_name`` (``None`` when the network never calls it or its input is no
        node)."""
        if module_name not in self.inputs_of:
            calls = [node for node, _ in self.steps
                     if node.op == "call_module" and node.target == module_name]
            source = calls[-1].args[0] if calls and calls[-1].args else None
            self.inputs_of[module_name] = source if isinstance(source, fx.Node) else None
        return self.inputs_of[module_name]

    def __call__(self, params: Mapping[str, Tensor], tangents: Mapping[str, Tensor],
                 buffers: Mapping[str, Tensor], x: Tensor, paired: Collection[fx.Node] = ()
                 ) -> tuple[Tensor, Tensor | None]:
        """``(logits, logits_tangent)`` of the network at ``x`` with parameters ``params``
        moved along ``tangents`` (all keyed like ``named_parameters()``/``named_buffers()``
        of the traced module; a parameter without a tangent has no direction, and layers
        that no direction reaches run as plain forward). The nodes in ``paired`` run on
        their batch-carrying inputs stacked twice and keep the first half (see
        :meth:`lone_plan`)."""
        logits, logits_tangent, _ = self.run(params, tangents, buffers, x, paired)
        return logits, logits_tangent

    def run(self, params: Mapping[str, Tensor], tangents: Mapping[str, Tensor],
            buffers: Mapping[str, Tensor], x: Tensor, paired: Collection[fx.Node] = (),
            keep: fx.Node | None = None) -> tuple[Tensor, Tensor | None, object]:
        """:meth:`__call__` and the primal value of node ``keep`` (``None`` without one),
        e.g. the features the last linear layer reads, from the same pass."""
        context = RuleContext(params, tangents, buffers)
        values: dict[fx.Node, Dual] = {}
        batched: set[fx.Node] = set()
        kept = None
        with torch.no_grad():
            for (node, rule), released in zip(self.steps, self.releases, strict=True):
                if node.op == "placeholder":
                    values[node] = Dual(x)
                    batched.add(node)
                    if node is keep:
                        kept = x
                    continue
                if node.op == "output":
                    return (*split_arg(lookup(values, node.args[0])), kept)
                # Which values carry the batch matters only to paired nodes: not tracked
                # on the serving path of a batch (no pairs).
                if paired and any(read in batched for read in node.all_input_nodes):
                    batched.add(node)
                if node in paired:
                    values[node] = _run_paired(rule, context, node, values, batched)
                else:
                    args = lookup(values, node.args)
                    kwargs = lookup(values, node.kwargs)
                    values[node] = Dual(*rule(context, node, args, kwargs))
                if node is keep:
                    kept = values[node].value
                for done in released:
                    del values[done]
        raise RuntimeError("traced network has no output")  # pragma: no cover

    def lone_plan(self, params: Mapping[str, Tensor], tangents: Mapping[str, Tensor],
                  buffers: Mapping[str, Tensor], example: Tensor, trials: int = 3,
                  keep: fx.Node | None = None) -> frozenset[fx.Node] | None:
        """The nodes a lone query (batch 1) must run as a pair so that its logits, their
        tangent and the value of node ``keep`` have the bits the query gets as a pair with
        itself, on inputs like ``example`` (``[1, ...]``: same shape, dtype and layout);
        ``None`` when no plan reproduces them (then the whole query runs as a pair).

        CPU kernels may take another path at batch 1 (oneDNN convolutions of small images,
        MKL's matrix-vector product for a linear layer, the scalar tail of a vectorised
        activation): each node is tried alone at batch 1 on the pair run's own inputs and
        paired only if its bits differ; the plan is then checked end to end on ``trials``
        seeded inputs.
        """
        generator = torch.Generator().manual_seed(0)

        def draw() -> Tensor:
            return torch.randn(example.shape, generator=generator, dtype=example.dtype).to(
                example.device).contiguous(memory_format=memory_layout(example))

        try:
            paired: set[fx.Node] = set()
            for trial in range(trials):
                x = example if trial == 0 else draw()
                paired |= self._differing_nodes(params, tangents, buffers, x)
            plan = frozenset(paired)
            for _ in range(trials):
                x = draw()
                alone = self.run(params, tangents, buffers, x, plan, keep)
                pair = self.run(params, tangents, buffers, torch.cat([x, x]), (), keep)
                if not all(_same(a, b if b is None else b[:1])
                           for a, b in zip(alone, pair, strict=True)):
                    return None
        except (RuntimeError, ValueError, IndexError, TypeError):
            return None  # e.g. a shape computed from the batch size: no plan, a pair
        return plan

    def _differing_nodes(self, params, tangents, buffers, x: Tensor) -> set[fx.Node]:
        """Nodes whose batch-1 result differs from the first row of their result on the
        same inputs stacked twice, along the pair run of ``x``."""
        context = RuleContext(params, tangents, buffers)
        values: dict[fx.Node, Dual] = {}
        batched: set[fx.Node] = set()
        differing: set[fx.Node] = set()
        with torch.no_grad():
            for node, rule in self.steps:
                if node.op == "placeholder":
                    values[node] = Dual(x)
                    batched.add(node)
                    continue
                if node.op == "output":
                    break
                if any(read in batched for read in node.all_input_nodes):
                    batched.add(node)
                # The pair run's result, then the node alone on the same (first) rows.
                reference = _run_paired(rule, context, node, values, batched)
                if node in batched:
                    args = lookup(_cloned(values, node), node.args)
                    kwargs = lookup(_cloned(values, node), node.kwargs)
                    alone = Dual(*rule(context, node, args, kwargs))
                    if not (_same(alone.value, reference.value)
                            and _same(alone.tangent, reference.tangent)):
                        differing.add(node)
                values[node] = reference
        return differing


def _same(a: object, b: object) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return (a is None and b is None) or (not isinstance(a, Tensor) and a == b)


def _cloned(values: dict[fx.Node, Dual], node: fx.Node) -> dict[fx.Node, Dual]:
    """The values ``node`` reads, copied (a rule may overwrite its input in place)."""
    def copy(item: Dual) -> Dual:
        value = item.value.clone() if isinstance(item.value, Tensor) else item.value
        tangent = None if item.tangent is None else item.tangent.clone()
        return Dual(value, tangent)

    return {read: copy(values[read]) for read in node.all_input_nodes}


def _run_paired(rule: Callable, context: RuleContext, node: fx.Node,
                values: dict[fx.Node, Dual], batched: set[fx.Node]) -> Dual:
    """``node`` on its batch-carrying inputs stacked twice; the first half of its result."""
    def doubled(read: fx.Node) -> Dual:
        item = values[read]
        if read not in batched:
            return item
        value = torch.cat([item.value, item.value]) if isinstance(item.value, Tensor) \
            else item.value
        tangent = None if item.tangent is None else torch.cat([item.tangent, item.tangent])
        return Dual(value, tangent)

    args = fx.node.map_arg(node.args, doubled)
    kwargs = fx.node.map_arg(node.kwargs, doubled)
    value, tangent = rule(context, node, args, kwargs)
    if node not in batched:
        return Dual(value, tangent)
    half = value.shape[0] // 2 if isinstance(value, Tensor) else None
    return Dual(value[:half] if half else value,
                None if tangent is None else tangent[: tangent.shape[0] // 2])


def compile_rules(network: nn.Module) -> TangentProgram | None:
    """A :class:`TangentProgram` for ``network`` (a module or an already traced
    ``fx.GraphModule``), or ``None`` when it cannot be traced, has several inputs, or a
    node has no rule here."""
    try:
        module = network if isinstance(network, fx.GraphModule) else fx.symbolic_trace(network)
    except Exception as error:  # tracing fails in many ways on data-dependent code
        log.debug("no tangent rules for %s: %s", type(network).__name__, error)
        return None
    submodules = dict(module.named_modules())
    steps = []
    try:
        placeholders = [node for node in module.graph.nodes if node.op == "placeholder"]
        if len(placeholders) != 1:
            raise NoRuleError(f"{len(placeholders)} inputs")
        for node in module.graph.nodes:
            steps.append((node, rule_for(node, submodules)))
    except NoRuleError as reason:
        log.debug("no tangent rules for %s: %s", type(network).__name__, reason)
        return None
    leaves = tuple((node.target, submodules[node.target]) for node in module.graph.nodes
                   if node.op == "call_module")
    return TangentProgram(module, tuple(steps), leaves, _last_reads(module.graph))


def _last_reads(graph: fx.Graph) -> tuple[tuple[fx.Node, ...], ...]:
    """Per node of ``graph``, in order, the nodes whose last reader it is (the output
    node releases nothing: the run ends there)."""
    last: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        for read in node.all_input_nodes:
            last[read] = node
    releases: dict[fx.Node, list[fx.Node]] = {}
    for read, reader in last.items():
        if reader.op != "output":
            releases.setdefault(reader, []).append(read)
    return tuple(tuple(releases.get(node, ())) for node in graph.nodes)


def log_softmax_tangent(logits: Tensor, logits_tangent: Tensor) -> Tensor:
    """Tangent of ``log_softmax(z)`` along ``ż``: ``ż − Σ_k softmax(z)_k ż_k`` (``[B, K]``)."""
    weights = torch.softmax(logits, dim=-1)
    return logits_tangent - (weights * logits_tangent).sum(dim=-1, keepdim=True)


