"""Target directions ``t`` in the surrogate's parameter space.

A target is a ``dict`` keyed by ``model.named_parameters()`` names with tensors of the
parameters' shapes. Only the direction matters to the solver (it ranks scores), so
targets are not normalised.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from grad2.models import last_linear
from grad2.scores import Target, eval_mode, redirection_scores

__all__ = [
    "all_ones", "centre_scores", "check", "layer_groups", "load", "min_ip", "misdirect",
    "random", "restrict", "save", "shift_scores", "watermark",
]


def all_ones(model: nn.Module) -> dict[str, Tensor]:
    """``t = 1`` over every parameter, batch-norm affine terms included (GRAD²'s default).

    Each tensor is one value expanded to the parameter's shape (stride 0, no memory per
    element: read-only; ``.clone()`` gives a writable copy)."""
    return {name: torch.ones((), dtype=p.dtype, device=p.device).expand(p.shape)
            for name, p in model.named_parameters()}


#: Modules that belong to the weight layer before them in :func:`layer_groups`.
NORMALISATIONS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def layer_groups(model: nn.Module) -> list[list[str]]:
    """``model``'s parameterised layers in module order, each as the names of its
    parameters: a module holding parameters of its own (a convolution, a linear layer...)
    starts a layer; a normalisation (batch, layer, group norm) joins the layer before it."""
    known = dict(model.named_parameters())  # a shared parameter counts once, first
    groups: list[list[str]] = []
    for prefix, module in model.named_modules():
        names = [full for name, _ in module.named_parameters(recurse=False)
                 if (full := f"{prefix}.{name}" if prefix else name) in known]
        if not names:
            continue
        if isinstance(module, NORMALISATIONS) and groups:
            groups[-1].extend(names)
        else:
            groups.append(names)
    return groups


def restrict(target: Target, model: nn.Module, layers: int) -> dict[str, Tensor]:
    """``target`` on the parameters of ``model``'s last ``layers`` layers only
    (:func:`layer_groups`; ``0``: all of them); the others get no direction, so the scores
    engine runs those layers as a plain forward pass. Raises ``ValueError`` when
    ``layers`` is negative or beyond the layer count."""
    groups = layer_groups(model)
    if not 0 <= layers <= len(groups):
        raise ValueError(f"the surrogate has {len(groups)} parameterised layers; "
                         f"got {layers} (0 means all)")
    if layers == 0:
        return dict(target)
    kept = {name for group in groups[-layers:] for name in group}
    return {name: tensor for name, tensor in target.items() if name in kept}


def moves_logits_alike(target: Target, model: nn.Module) -> bool:
    """Does ``target`` lie only on ``model``'s head (its last ``nn.Linear``, the logits)
    with the same direction for every class? Then every logit moves alike, each
    log-probability stays put and the scores are zero up to rounding (``all_ones`` with
    ``target_layers: 1``)."""
    directed = {name for name, tensor in target.items() if bool(tensor.ne(0).any())}
    try:
        head, _ = last_linear(model)
    except ValueError:
        return False
    head_names = {f"{head}.weight", f"{head}.bias"}
    if not directed or not directed <= head_names:
        return False
    return all(bool((target[name] == target[name][:1]).all()) for name in directed)


def random(model: nn.Module, seed: int = 0) -> dict[str, Tensor]:
    """A seeded standard-Gaussian direction, identical on every machine (drawn on CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p)
        for name, p in model.named_parameters()
    }


def min_ip(model: nn.Module, x: Tensor, probs: Tensor) -> dict[str, Tensor]:
    """``t = −mean_b Gᵀ y_b``: oppose the batch's own clean training gradient.

    Depends on the whole batch ("uncoordinated" ablation). ``x``: ``[B, ...]``,
    ``probs``: ``[B, K]``.
    """
    return _gradient(model, x, probs, sign=-1.0)


def watermark(
    model: nn.Module, triggers: Tensor, labels: Tensor, equalize: bool = False,
    references: Tensor | None = None,
) -> dict[str, Tensor]:
    """``t = mean_w ∇_θ log s_θ(y_w | x_w)``: clones learn ``triggers → labels``.

    ``triggers``: ``[W, ...]`` inputs; ``labels``: ``[W]`` class indices. With
    ``equalize``, each trigger's gradient is scaled to unit norm (over all parameters)
    before the mean, so no trigger dominates the direction because its gradient is large.

    ``references`` ``[R, ...]`` (inputs like the thief's) make the target contrastive:
    ``t = mean_w (g(x_w, y_w) − mean_r g(r, y_w))`` with ``g(x, k) = ∇_θ log s_θ(k | x)``
    (each trigger's term scaled as above). The subtracted part raises the watermark
    labels on every input alike: without it the scores of most queries favour the same
    one or two labels (a class-bias push) instead of the label of the nearest trigger.
    """
    with torch.no_grad(), eval_mode(model):
        num_classes = model(triggers[:1]).shape[-1]
    one_hot = torch.nn.functional.one_hot(labels.long(), num_classes).to(triggers.dtype)
    if equalize:
        per_trigger = _per_example_gradients(model, triggers, one_hot)
        norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_trigger.values()))
        weights = 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny) / len(triggers)
        target = {name: torch.einsum("w,w...->...", weights, g)
                  for name, g in per_trigger.items()}
    else:
        weights = torch.full((len(triggers),), 1.0 / len(triggers), dtype=triggers.dtype)
        target = _gradient(model, triggers, one_hot, sign=1.0)
    if references is None:
        return target
    # mean_r Σ_w weight_w g(r, y_w) = the reference gradient of one soft label per input.
    label_mix = (weights.to(one_hot.dtype)[:, None] * one_hot).sum(dim=0)
    common = _gradient(model, references, label_mix.expand(len(references), -1), sign=1.0)
    return {name: target[name] - common[name] for name in target}


def _per_example_gradients(model: nn.Module, x: Tensor, weights: Tensor) -> dict[str, Tensor]:
    """``[B, *p.shape]`` per parameter: ``∇_θ Σ_k weights_bk log s_θ(k | x_b)`` for each
    row ``b`` (``x [B, ...]``, ``weights [B, K]``), model in eval mode, one vmap."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def objective(parameters: dict[str, Tensor], single: Tensor, weight: Tensor) -> Tensor:
        logits = functional_call(model, (parameters, buffers), (single.unsqueeze(0),))
        return (weight * torch.log_softmax(logits, dim=-1).squeeze(0)).sum()

    with eval_mode(model), torch.enable_grad():
        x = x.clone() if x.is_inference() else x
        grads = vmap(grad(objective), in_dims=(None, 0, 0))(params, x, weights.to(x.dtype))
    return {name: g.detach() for name, g in grads.items()}


def centre_scores(model: nn.Module, target: Target, references: Tensor) -> dict[str, Tensor]:
    """``target`` shifted (:func:`shift_scores`) so that every class's score ``c_k = (G t)_k``
    averages the same over ``references`` ``[R, ...]``: a query's receiving class is then
    the one unusually favoured *at this query*, not the class the target favours
    everywhere (a class-bias push).
    """
    scores = redirection_scores(model, references, target)
    return shift_scores(model, target, -scores.mean(dim=0))


def shift_scores(model: nn.Module, target: Target, offsets: Tensor) -> dict[str, Tensor]:
    """``target`` with ``offsets`` ``[K]`` added to its last linear layer's bias component,
    which adds ``offsets_k`` to every query's score ``c_k`` (plus a constant per query).

    ``∂ log s(k | x) / ∂b = e_k − p(x)`` for that bias ``b``, so the shift changes the
    scores by ``offsets − p(x)·offsets``; the second term is the same for every class of a
    query, and the GRAD² solver ignores such constants (it maximises ``c·ỹ`` with
    ``Σ ỹ = 1``). A per-class offset is thus a property of the target file: it needs no
    change to the handler.
    """
    bias = last_linear(model)[1].bias  # ValueError without an nn.Linear
    if bias is None:
        raise ValueError("shifting scores needs a last nn.Linear layer with a bias")
    if offsets.shape != bias.shape:
        raise ValueError(f"offsets must have shape {tuple(bias.shape)}, got {tuple(offsets.shape)}")
    bias_name = next(n for n, p in model.named_parameters() if p is bias)
    shifted = {name: tensor.clone() for name, tensor in target.items()}
    base = shifted.get(bias_name, torch.zeros_like(bias))
    shifted[bias_name] = base + offsets.to(base)
    return shifted


def misdirect(model: nn.Module, references: Tensor, shift: int = 1) -> dict[str, Tensor]:
    """A fixed direction that teaches clones a wrong labelling: class ``k → k + shift``.

    ``t = mean_x ∇_θ log s_θ((ŷ(x) + shift) mod K | x)`` over ``references`` ``[N, ...]``
    (inputs like the thief's, e.g. the surrogate's training pool), with ``ŷ`` the
    surrogate's own label. Computed once, so answers stay a pure function of the query and
    every query pushes clones the same way (coordinated, as ``all_ones``); unlike
    ``all_ones`` the last layer contributes, so the receiving class depends on the query.
    """
    with torch.no_grad(), eval_mode(model):
        logits = model(references)
    num_classes = logits.shape[-1]
    if shift % num_classes == 0:
        raise ValueError(f"shift must not be a multiple of the class count {num_classes}")
    wrong = (logits.argmax(dim=-1) + shift) % num_classes
    one_hot = torch.nn.functional.one_hot(wrong, num_classes).to(references.dtype)
    return _gradient(model, references, one_hot, sign=1.0)


def _gradient(model: nn.Module, x: Tensor, weights: Tensor, sign: float) -> dict[str, Tensor]:
    """``sign · mean_b ∇_θ Σ_k weights_bk log s_θ(k | x_b)``, model in eval mode."""
    leaves = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    with eval_mode(model), torch.enable_grad():
        x = x.clone() if x.is_inference() else x
        logits = functional_call(model, (leaves, buffers), (x,))
        log_probs = torch.log_softmax(logits, dim=-1)
        objective = (weights.detach().to(log_probs.dtype) * log_probs).sum() / x.shape[0]
        grads = torch.autograd.grad(objective, list(leaves.values()))
    return {name: sign * grad.detach() for name, grad in zip(leaves, grads)}


def check(target: Target, model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``target`` matches ``model``'s parameters (names, shapes)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(target) - set(params))
    if unknown:
        raise ValueError(f"target has tensors the surrogate does not: {unknown[:3]}")
    if not target:
        raise ValueError("target is empty")
    for name, tensor in target.items():
        if not isinstance(tensor, Tensor):
            raise ValueError(f"target[{name!r}] is not a tensor")
        if tensor.shape != params[name].shape:
            raise ValueError(
                f"target[{name!r}] has shape {tuple(tensor.shape)}, the surrogate's parameter "
                f"{tuple(params[name].shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"target[{name!r}] has non-finite values")


def save(target: Target, path: str | PathLike) -> Path:
    """Write ``target`` as a plain tensor dict (loadable with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # An expanded constant (all_ones) is written out whole: a file holds plain tensors.
    torch.save({name: t.detach().cpu().contiguous() if any(st == 0 for st in t.stride())
                else t.detach().cpu() for name, t in target.items()}, path)
    return path


def load(path: str | PathLike, model: nn.Module) -> dict[str, Tensor]:
    """Read a target saved by :func:`save` and check it against ``model``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"target file {path} not found")
    try:
        target = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors all mean "not a target"
        raise ValueError(f"target file {path} is not a saved tensor dict: {error}") from error
    if not isinstance(target, dict):
        raise ValueError(f"target file {path} holds a {type(target).__name__}, not a dict")
    check(target, model)
    reference = next(model.parameters())
    return {n: t.to(dtype=reference.dtype, device=reference.device) for n, t in target.items()}
