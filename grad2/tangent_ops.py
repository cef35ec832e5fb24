"""The per-operation tangent rules of :mod:`grad2.tangent_rules`: what a rule sees
(:class:`RuleContext`, each node's :class:`Dual`), and :func:`rule_for`, which picks the
rule of a traced ``torch.fx`` node (or raises :class:`NoRuleError`)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn


@dataclass(frozen=True, slots=True)
class Dual:
    """A node's value and its tangent (``None``: the value does not depend on the
    parameters)."""

    value: object
    tangent: Tensor | None = None


#: What a rule returns: the node's value and tangent.
Pair = tuple[object, Tensor | None]


class NoRuleError(Exception):
    """A node of the traced network has no explicit tangent rule."""


# -- the context a rule sees ----------------------------------------------------------------

@dataclass
class RuleContext:
    params: Mapping[str, Tensor]
    tangents: Mapping[str, Tensor]
    buffers: Mapping[str, Tensor]

    def parameter(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        if name in self.params:
            return self.params[name], self.tangents.get(name)
        return self.buffers.get(name), None


def lookup(values: dict[fx.Node, Dual], structure):
    """``structure`` with every node replaced by its :class:`Dual`."""
    return fx.node.map_arg(structure, lambda node: values[node])


def _value(item) -> object:
    return item.value if isinstance(item, Dual) else item


def split_arg(item) -> Pair:
    """``(value, tangent)`` of a rule argument: a node's :class:`Dual` or a constant."""
    if isinstance(item, Dual):
        return item.value, item.tangent
    return item, None


def _like(value: Tensor, tangent: Tensor | None) -> Tensor | None:
    """``tangent`` broadcast to ``value``'s shape and memory layout (a bias-only tangent
    is a per-channel vector)."""
    if tangent is None or tangent.shape == value.shape:
        return tangent
    return torch.empty_like(value).copy_(tangent.expand_as(value))


def _add(*tangents: Tensor | None) -> Tensor | None:
    present = [t for t in tangents if t is not None]
    if not present:
        return None
    total = present[0]
    for tangent in present[1:]:
        total = total + tangent
    return total


# -- rules --------------------------------------------------------------------------------

def rule_for(node: fx.Node, submodules: dict[str, nn.Module]) -> Callable:
    if node.op in ("placeholder", "output"):
        return _no_rule
    if node.op == "get_attr":
        owner, _, attribute = node.target.rpartition(".")
        holder = submodules.get(owner)
        if holder is None or not (attribute in holder._parameters
                                  or attribute in holder._buffers):
            raise NoRuleError(f"attribute {node.target} is neither a parameter nor a buffer")
        return _get_attr
    if _overwrites_shared_input(node, submodules):
        raise NoRuleError(f"{node.name} overwrites an input that later nodes read")
    if node.op == "call_module":
        module = submodules[node.target]
        if type(module) is nn.ReLU and _owns_input(node, submodules):
            return _relu_in_place
        for kinds, make in _MODULE_RULES:
            # The exact type: a subclass may change ``forward`` (weight standardisation...).
            if type(module) in kinds:
                rule = make(module, node.target)
                if rule is not None:
                    return rule
        raise NoRuleError(f"module {node.target} ({type(module).__name__})")
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu) and _owns_input(node, submodules):
            return _relu_in_place
        rule = _FUNCTION_RULES.get(node.target)
        if rule is None:
            raise NoRuleError(f"function {getattr(node.target, '__name__', node.target)}")
        return rule
    if node.op == "call_method":
        rule = _METHOD_RULES.get(node.target)
        if rule is None:
            raise NoRuleError(f"method {node.target}")
        return rule
    raise NoRuleError(f"node {node.op}")  # pragma: no cover


def _overwrites_shared_input(node: fx.Node, submodules: dict[str, nn.Module]) -> bool:
    """An in-place activation (``inplace=True`` on the module, or as an argument) whose
    input other nodes also read: those readers see the overwritten values, which rules
    that never overwrite would not reproduce."""
    if node.op == "call_module":
        inplace = getattr(submodules[node.target], "inplace", False)
    elif node.op == "call_function" and node.target in _INPLACE_POSITION:
        position = _INPLACE_POSITION[node.target]
        inplace = node.kwargs.get("inplace", node.args[position]
                                  if len(node.args) > position else False)
    else:
        return False
    source = node.args[0] if node.args else None
    return inplace is True and isinstance(source, fx.Node) and len(source.users) > 1


def _no_rule(context, node, args, kwargs):  # pragma: no cover - handled by the runner
    raise AssertionError


def _get_attr(context: RuleContext, node: fx.Node, args, kwargs) -> Pair:
    return context.parameter(node.target)


def _affine_rule(module: nn.Module, name: str) -> Callable | None:
    """Convolutions and linear layers: ``ẏ = W ẋ + Ẇ x + ḃ``."""
    if isinstance(module, nn.Linear):
        apply = F.linear
    elif module.padding_mode == "zeros":
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(module.kernel_size)]
        options = (module.stride, module.padding, module.dilation, module.groups)

        def apply(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            return conv(x, weight, bias, *options)
    else:
        return None

    def rule(context: RuleContext, node, args, kwargs) -> Pair:
        x, x_t = split_arg(args[0])
        weight, weight_t = context.parameter(f"{name}.weight")
        bias, bias_t = (context.parameter(f"{name}.bias") if module.bias is not None
                        else (None, None))
        value = apply(x, weight, bias)
        tangent = None
        if weight_t is not None:
            tangent = apply(x, weight_t, bias_t)
        elif bias_t is not None:  # a fresh tensor: it may be added to in place below
            per_channel = bias_t.view((-1,) + (1,) * max(value.dim() - 2, 0))
            tangent = torch.empty_like(value).copy_(per_channel.expand_as(value))
        if x_t is not None:
            through = apply(x_t, weight, None)
            tangent = through if tangent is None else tangent.add_(through)  # ours to change
        return value, tangent

    return rule


def _batch_norm_rule(module: nn.Module, name: str) -> Callable | None:
    """Eval-mode batch-norm with running statistics (checked at every call: the mode
    can change after compiling)."""
    if not module.track_running_stats:
        return None

    def rule(context: RuleContext, node, args, kwargs) -> Pair:
        x, x_t = split_arg(args[0])
        if module.training:
            raise RuntimeError("tangent rules need eval-mode batch-norm")
        mean = context.buffers[f"{name}.running_mean"]
        inv_std = torch.rsqrt(context.buffers[f"{name}.running_var"] + module.eps)
        weight, weight_t = (context.parameter(f"{name}.weight") if module.affine
                            else (None, None))
        bias, bias_t = context.parameter(f"{name}.bias") if module.affine else (None, None)
        value = F.batch_norm(x, mean, context.buffers[f"{name}.running_var"], weight, bias,
                             False, 0.0, module.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = inv_std if weight is None else weight * inv_std
        tangents = [None if x_t is None else x_t * scale.view(shape)]
        if weight_t is not None:
            tangents.append((x - mean.view(shape)) * (inv_std * weight_t).view(shape))
        if bias_t is not None:
            tangents.append(bias_t.view(shape))
        return value, _like(value, _add(*tangents))

    return rule


def _pointwise(forward: Callable, derivative: Callable, names: tuple[str, ...],
               fixed: dict | None = None) -> Callable:
    """An elementwise function of its first argument, ``ẏ = derivative(ẋ, x, y, **options)``.
    Options come by keyword or by position in the order ``names`` (``F.relu(x, True)`` is
    ``inplace=True``), or fixed by a module; ``inplace`` is dropped: a rule never
    overwrites its input (another node may read it)."""

    def rule(context, node, args, kwargs) -> Pair:
        x, x_t = split_arg(args[0])
        options = dict(zip(names, (_value(a) for a in args[1:]), strict=False))
        options |= {k: _value(v) for k, v in kwargs.items()} | (fixed or {})
        options.pop("inplace", None)
        value = forward(x, **options)
        return value, (None if x_t is None else derivative(x_t, x, value, **options))

    return rule


def _relu_tangent(x_t: Tensor, x: Tensor, value: Tensor, **options) -> Tensor:
    return torch.ops.aten.threshold_backward(x_t, value, 0)


def _relu_in_place(context, node, args, kwargs) -> Pair:
    """ReLU of a convolution's or linear layer's output that nothing else reads: value and
    tangent are overwritten (one pass each, no new activation-sized buffers; same bits)."""
    x, x_t = split_arg(args[0])
    value = torch.relu_(x)
    if x_t is not None:
        torch.ops.aten.threshold_backward.grad_input(x_t, value, 0, grad_input=x_t)
    return value, x_t


def _owns_input(node: fx.Node, submodules: dict[str, nn.Module]) -> bool:
    """Is ``node`` the only reader of its input, and is that input a fresh result of a
    convolution or linear layer (whose rule allocates both value and tangent), so that
    ``node`` may overwrite it?"""
    source = node.args[0] if node.args else None
    return (isinstance(source, fx.Node) and len(source.users) == 1
            and source.op == "call_module"
            and type(submodules[source.target]) in _AFFINE)


#: name -> (function, derivative(ẋ, x, y, **options), its options in positional order).
_POINTWISE: dict[str, tuple[Callable, Callable, tuple[str, ...]]] = {
    "relu": (F.relu, _relu_tangent, ("inplace",)),
    "hardswish": (F.hardswish, lambda t, x, y: torch.ops.aten.hardswish_backward(t, x),
                  ("inplace",)),
    "hardsigmoid": (F.hardsigmoid, lambda t, x, y: torch.ops.aten.hardsigmoid_backward(t, x),
                    ("inplace",)),
    "silu": (F.silu, lambda t, x, y: torch.ops.aten.silu_backward(t, x), ("inplace",)),
    "sigmoid": (torch.sigmoid, lambda t, x, y: torch.ops.aten.sigmoid_backward(t, y), ()),
    "tanh": (torch.tanh, lambda t, x, y: torch.ops.aten.tanh_backward(t, y), ()),
    "gelu": (F.gelu, lambda t, x, y, approximate="none": torch.ops.aten.gelu_backward(
        t, x, approximate=approximate), ("approximate",)),
}


def _module_pointwise(kind: str) -> Callable:
    """The rule of an activation module (``nn.GELU`` fixes its ``approximate``)."""
    def make(module: nn.Module, name: str) -> Callable:
        fixed = {"approximate": module.approximate} if kind == "gelu" else None
        return _pointwise(*_POINTWISE[kind], fixed=fixed)
    return make


def _max_pool_rule(module: nn.Module, name: str) -> Callable | None:
    if getattr(module, "return_indices", False):
        return None
    pool = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d,
            nn.MaxPool3d: F.max_pool3d}[type(module)]
    options = dict(kernel_size=module.kernel_size, stride=module.stride,
                   padding=module.padding, dilation=module.dilation,
                   ceil_mode=module.ceil_mode)
    return _max_pool(pool, options)


def _max_pool(pool: Callable, options: dict) -> Callable:
    def rule(context, node, args, kwargs) -> Pair:
        x, x_t = split_arg(args[0])
        if x_t is None:
            return pool(x, **options), None
        value, indices = pool(x, return_indices=True, **options)
        return value, _gather_planes(x_t, indices)
    return rule


def _gather_planes(source: Tensor, indices: Tensor) -> Tensor:
    """``source[b, c].flatten()[indices[b, c]]`` for ``[B, C, *spatial]`` tensors, in
    ``source``'s memory format (a channels-last tangent stays channels-last, so the next
    convolution and pointwise rules need no layout conversion)."""
    if source.dim() == 4 and not source.is_contiguous() and source.is_contiguous(
            memory_format=torch.channels_last):
        batch, channels = source.shape[:2]
        planes = source.permute(0, 2, 3, 1).reshape(batch, -1, channels)  # a view
        where = indices.permute(0, 2, 3, 1).reshape(batch, -1, channels)
        picked = planes.gather(1, where).view(batch, *indices.shape[2:], channels)
        return picked.permute(0, 3, 1, 2)
    return source.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)


def _functional_max_pool(dims: int) -> Callable:
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")

    def rule(context, node, args, kwargs) -> Pair:
        options = dict(zip(names, (_value(a) for a in args[1:]), strict=False))
        options |= {k: _value(v) for k, v in kwargs.items()}
        if options.pop("return_indices", False):
            raise RuntimeError("max-pool returning indices has no tangent rule")
        return _max_pool(pool, options)(context, node, args[:1], {})
    return rule


def _linear_map(function: Callable) -> Callable:
    """A function linear in its tensor arguments (the rest are constants): the tangent is
    the same function of the tangents (a missing tangent is zero)."""

    def rule(context, node, args, kwargs) -> Pair:
        value = function(*_values(args), **_values(kwargs))
        pairs = _tensor_pairs(args, kwargs)
        if all(pair.tangent is None for pair in pairs):
            return value, None
        tangent_args = _tangents_in(args)
        tangent_kwargs = _tangents_in(kwargs)
        return value, function(*tangent_args, **tangent_kwargs)

    return rule


def _values(structure):
    """``structure`` with every :class:`Dual` replaced by its value."""
    if isinstance(structure, dict):
        return {k: _values(v) for k, v in structure.items()}
    if isinstance(structure, list | tuple):
        return type(structure)(_values(v) for v in structure)
    return _value(structure)


def _tensor_pairs(args, kwargs) -> list[Dual]:
    found: list[Dual] = []

    def visit(item):
        if isinstance(item, Dual):
            found.append(item)
        elif isinstance(item, list | tuple):
            for inner in item:
                visit(inner)
        elif isinstance(item, dict):
            for inner in item.values():
                visit(inner)

    visit(args)
    visit(kwargs)
    return found


def _tangents_in(structure):
    """``structure`` with each tensor pair replaced by its tangent (zeros where None)."""
    if isinstance(structure, dict):
        return {k: _tangents_in(v) for k, v in structure.items()}
    if isinstance(structure, Dual):
        if isinstance(structure.value, Tensor):
            return (torch.zeros_like(structure.value) if structure.tangent is None
                    else structure.tangent)
        return structure.value
    if isinstance(structure, list | tuple):
        return type(structure)(_tangents_in(v) for v in structure)
    return structure


def _sum_rule(function: Callable, sign: float) -> Callable:
    """``a + alpha·b`` / ``a − alpha·b`` (``alpha`` by keyword, as ``torch.add`` takes it),
    either side a tensor or a number."""

    def rule(context, node, args, kwargs) -> Pair:
        (a, a_t), (b, b_t) = split_arg(args[0]), split_arg(args[1])
        options = {k: _value(v) for k, v in kwargs.items()}
        value = function(a, b, **options)
        factor = sign * options.get("alpha", 1)
        if b_t is not None and factor != 1:
            b_t = b_t * factor
        return value, _like(value, _add(a_t, b_t))
    return rule


def _product_rule(context, node, args, kwargs) -> Pair:
    (a, a_t), (b, b_t) = split_arg(args[0]), split_arg(args[1])
    value = a * b
    return value, _like(value, _add(None if a_t is None else a_t * b,
                                    None if b_t is None else a * b_t))


def _constant(function: Callable) -> Callable:
    """A function whose result does not depend on the parameters (``x.size()``)."""
    def rule(context, node, args, kwargs) -> Pair:
        return function(*_values(args), **_values(kwargs)), None
    return rule


def _identity_rule(context, node, args, kwargs) -> Pair:
    return split_arg(args[0])


_AFFINE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_MODULE_RULES: tuple[tuple[tuple[type, ...], Callable], ...] = (
    (_AFFINE, _affine_rule),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), _batch_norm_rule),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), _max_pool_rule),
    ((nn.ReLU,), _module_pointwise("relu")),
    ((nn.Hardswish,), _module_pointwise("hardswish")),
    ((nn.Hardsigmoid,), _module_pointwise("hardsigmoid")),
    ((nn.SiLU,), _module_pointwise("silu")),
    ((nn.Sigmoid,), _module_pointwise("sigmoid")),
    ((nn.Tanh,), _module_pointwise("tanh")),
    ((nn.GELU,), _module_pointwise("gelu")),
    ((nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Dropout3d),
     lambda module, name: _dropout_rule(module)),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
      nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Unflatten),
     lambda module, name: _linear_map(module.forward)),
)


def _dropout_rule(module: nn.Module) -> Callable:
    def rule(context, node, args, kwargs) -> Pair:
        if module.training and not isinstance(module, nn.Identity) and module.p > 0:
            raise RuntimeError("tangent rules need eval-mode dropout")
        return split_arg(args[0])
    return rule


_FUNCTION_RULES: dict[Callable, Callable] = {
    operator.add: _sum_rule(operator.add, 1.0),
    torch.add: _sum_rule(torch.add, 1.0),
    operator.sub: _sum_rule(operator.sub, -1.0),
    torch.sub: _sum_rule(torch.sub, -1.0),
    operator.mul: _product_rule,
    torch.mul: _product_rule,
    operator.getitem: _linear_map(operator.getitem),
    torch.flatten: _linear_map(torch.flatten),
    torch.cat: _linear_map(torch.cat),
    torch.reshape: _linear_map(torch.reshape),
    torch.mean: _linear_map(torch.mean),
    F.adaptive_avg_pool2d: _linear_map(F.adaptive_avg_pool2d),
    F.avg_pool2d: _linear_map(F.avg_pool2d),
    F.dropout: _identity_rule,
    F.max_pool2d: _functional_max_pool(2),
    torch.relu: _pointwise(*_POINTWISE["relu"]),
    F.relu: _pointwise(*_POINTWISE["relu"]),
    F.hardswish: _pointwise(*_POINTWISE["hardswish"]),
    F.hardsigmoid: _pointwise(*_POINTWISE["hardsigmoid"]),
    F.silu: _pointwise(*_POINTWISE["silu"]),
    torch.sigmoid: _pointwise(*_POINTWISE["sigmoid"]),
    torch.tanh: _pointwise(*_POINTWISE["tanh"]),
    F.gelu: _pointwise(*_POINTWISE["gelu"]),
}

#: Functions taking ``inplace`` as an argument, and its position.
_INPLACE_POSITION = {F.relu: 1, F.hardswish: 1, F.hardsigmoid: 1, F.silu: 1, F.dropout: 3}

_METHOD_RULES: dict[str, Callable] = {
    "view": _linear_map(Tensor.view),
    "reshape": _linear_map(Tensor.reshape),
    "flatten": _linear_map(Tensor.flatten),
    "mean": _linear_map(Tensor.mean),
    "contiguous": _linear_map(Tensor.contiguous),
    "size": _constant(Tensor.size),
    "dim": _constant(Tensor.dim),
    "relu": _pointwise(*_POINTWISE["relu"]),
    "sigmoid": _pointwise(*_POINTWISE["sigmoid"]),
}
