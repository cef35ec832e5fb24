"""Cheaper forward-mode rules for common layers, used while the JVP scores are computed.

:class:`CheapTangents` is a ``TorchFunctionMode`` entered around the surrogate's forward
pass inside ``forward_ad.dual_level()``. It replaces PyTorch's generic forward-mode rules
of four functions, where they are slow on a CPU, by equivalent ones:

- **Eval-mode batch-norm** (``F.batch_norm`` with running statistics): the value is the
  plain eval forward; the tangent is that of its affine form ``x · scale + shift``
  (``scale = weight / sqrt(running_var + eps)``, ``shift = bias − running_mean · scale``,
  the form PyTorch's CPU eval kernel computes), ``x_t · scale + x · scale_t + shift_t``,
  with ``scale_t``, ``shift_t`` from the weight's and bias's tangents: two passes over the
  activations instead of the generic rule's seven. Equal up to float rounding.
- **Max-pool** with kernel = stride, no padding, dilation 1, floor mode, no returned
  indices and at least :data:`MIN_POOL_ELEMENTS` inputs: the generic rule runs the slow
  ``max_pool2d_with_indices`` kernel and a gather. Here pairwise ``maximum`` over the
  window and a 0/1 selection of the tangent. Ties: the tangent of the *first* maximal
  element in row-major order, the element ``max_pool2d_with_indices`` picks (and the
  double-backward reference's subgradient), so the result has the same bits as the
  generic rule, ties included.
- **ReLU**: the generic in-place rule computes the masked tangent out of place, then
  copies it back; here the mask is applied in place. Same bits.
- **Convolution of an input without a tangent** (a network's first layer): the generic
  rule also convolves a zero input tangent; here only ``conv(x, W_t, b_t)``. Same bits.

Any other call, and these outside their conditions (training-mode batch-norm, padded or
overlapping pools, inputs that need a reverse-mode gradient), goes to PyTorch unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

_FALLBACK = NotImplemented
#: Max-pool inputs with fewer elements take PyTorch's rule: there the per-operation
#: overhead of the pairwise form outweighs the slow kernel (both give the same bits).
MIN_POOL_ELEMENTS = 1 << 16


class CheapTangents(TorchFunctionMode):
    """Inside ``forward_ad.dual_level()``: eval batch-norm, non-overlapping max-pool, ReLU
    and convolutions of tangent-free inputs through the cheaper rules above."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            result = handler(*args, **kwargs)
            if result is not _FALLBACK:
                return result
        return func(*args, **kwargs)


def _split(tensor: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """``(primal, tangent)`` of a possibly dual tensor (``tangent`` None when it has none)."""
    if tensor is None:
        return None, None
    unpacked = forward_ad.unpack_dual(tensor)
    return unpacked.primal, unpacked.tangent


def _needs_reverse_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                weight: Tensor | None = None, bias: Tensor | None = None,
                training: bool = False, momentum: float | None = 0.1,
                eps: float = 1e-5) -> Any:
    """Eval-mode ``F.batch_norm`` on ``[B, C, ...]``: the plain value and the tangent of
    its affine form ``x · scale + shift``."""
    if training or running_mean is None or running_var is None or input.dim() < 2:
        return _FALLBACK
    if _needs_reverse_grad(input, weight, bias) or eps < 0:
        return _FALLBACK
    x, x_t = _split(input)
    w, w_t = _split(weight)
    b, b_t = _split(bias)
    if x_t is None and w_t is None and b_t is None:
        return _FALLBACK
    with torch.no_grad():
        out = F.batch_norm(x, running_mean, running_var, w, b, False, 0.0, eps)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        inv_std = torch.rsqrt(running_var + eps)
        scale = (inv_std if w is None else w * inv_std).view(shape)
        # Two passes over the activations (parameter part, input part) where the generic
        # rule makes seven; out-of-place addcmul with a broadcast first argument is slow here.
        tangent = None
        if w_t is not None or b_t is not None:
            scale_t = torch.zeros_like(inv_std) if w_t is None else w_t * inv_std
            shift_t = -running_mean * scale_t if b_t is None else b_t - running_mean * scale_t
            tangent = (x * scale_t.view(shape)).add_(shift_t.view(shape))
        if x_t is not None:
            tangent = x_t * scale if tangent is None else tangent.addcmul_(x_t, scale)
    return forward_ad.make_dual(out, tangent)


def _pair(value: Any) -> tuple[int, int] | None:
    """``(a, b)`` from an int or a one- or two-int sequence; None for anything else."""
    if isinstance(value, int):
        value = (value,)
    if not isinstance(value, list | tuple) or not all(isinstance(v, int) for v in value):
        return None
    if len(value) == 1:
        return value[0], value[0]
    return (value[0], value[1]) if len(value) == 2 else None


def _max_pool2d(input: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
                dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False) -> Any:
    """Non-overlapping ``F.max_pool2d`` on ``[B, C, H, W]`` -> ``[B, C, H // kh, W // kw]``:
    the window maximum and the tangent of its first maximal element."""
    kernel = _pair(kernel_size)
    stride = kernel if stride is None or (isinstance(stride, list | tuple) and not stride) \
        else _pair(stride)
    if (kernel is None or stride != kernel or _pair(padding) != (0, 0)
            or _pair(dilation) != (1, 1) or ceil_mode or return_indices or input.dim() != 4
            or _needs_reverse_grad(input)):
        return _FALLBACK
    x, x_t = _split(input)
    (kh, kw), (height, width) = kernel, input.shape[-2:]
    out_h, out_w = height // kh, width // kw
    if x_t is None or out_h == 0 or out_w == 0 or input.numel() < MIN_POOL_ELEMENTS:
        return _FALLBACK
    with torch.no_grad():
        x, x_t = x[..., : out_h * kh, : out_w * kw], x_t[..., : out_h * kh, : out_w * kw]
        # Along each row first (the first maximal column), then down the rows (the first
        # row holding the maximum): the first maximal element in row-major order.
        value, tangent = _max_over(
            x.unflatten(-1, (out_w, kw)), x_t.unflatten(-1, (out_w, kw)), dim=-1
        )
        value, tangent = _max_over(
            value.unflatten(-2, (out_h, kh)), tangent.unflatten(-2, (out_h, kh)), dim=-2
        )
    return forward_ad.make_dual(value, tangent)


def _max_over(values: Tensor, tangents: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Max of ``values`` over ``dim`` (a short window axis) and the tangent of its first
    maximal element. ``torch.maximum`` keeps NaNs as ``max_pool2d`` does."""
    value, tangent = values.select(dim, 0), tangents.select(dim, 0)
    for i in range(1, values.shape[dim]):
        candidate = values.select(dim, i)
        # ``later`` is 1.0 where ``candidate > value`` (NaN compares false either way), and
        # lerp with 0/1 weights selects exactly (it returns ``end`` at weight 1): on this CPU
        # build both are several times faster than a bool mask, its cast, or torch.where.
        later = torch.sub(candidate, value).gt_(0)
        value = torch.maximum(value, candidate)
        tangent = torch.lerp(tangent, tangents.select(dim, i), later)
    return value, tangent


def _conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, *args: Any,
            **kwargs: Any) -> Any:
    """``F.conv2d`` of an input without a tangent: ``conv(x, W_t, b_t)`` only."""
    x, x_t = _split(input)
    w, w_t = _split(weight)
    b, b_t = _split(bias)
    if x_t is not None or w_t is None or _needs_reverse_grad(input, weight, bias):
        return _FALLBACK
    with torch.no_grad():
        out = torch.conv2d(x, w, b, *args, **kwargs)
        tangent = torch.conv2d(x, w_t, b_t, *args, **kwargs)
    return forward_ad.make_dual(out, tangent)


def _relu(input: Tensor, inplace: bool = False) -> Any:
    """``F.relu`` with its tangent masked in place (no extra copy for ``inplace=True``)."""
    x, x_t = _split(input)
    if x_t is None or _needs_reverse_grad(input):
        return _FALLBACK
    with torch.no_grad():
        if not inplace:
            out = torch.relu(x)
            return forward_ad.make_dual(out, torch.ops.aten.threshold_backward(x_t, out, 0))
        # Both halves of the dual are updated in place: the caller sees ``input`` changed.
        x.clamp_min_(0)
        torch.ops.aten.threshold_backward.grad_input(x_t, x, 0, grad_input=x_t)
    return input


_HANDLERS: dict[Callable, Callable] = {
    F.relu: _relu,
    F.batch_norm: _batch_norm,
    F.max_pool2d: _max_pool2d,
    torch.conv2d: _conv2d,
}
