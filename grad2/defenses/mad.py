"""MAD, prediction poisoning (Orekondy et al., ICLR 2020), and MAD-argmax."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from grad2.defenses.base import EPSILON, KEEPS_TOP1, Defense, check_epsilon
from grad2.models import last_linear


class MAD(Defense):
    """Prediction poisoning (Orekondy et al. 2020), faithful to its cost.

    Per query, the Jacobian ``G`` of the surrogate's log-probabilities with respect to its
    last linear layer (``K`` backward passes, vectorised with ``vmap(jacrev)``); among the
    ``K`` one-hot vertices, the one whose gradient ``Gᵀe_k`` deviates most in angle from
    the clean ``Gᵀy``; then a step from ``y`` toward it, within the L1 budget.

    With ``closed_form=True`` the same choice is made without the Jacobian. When the logits
    are the last layer's output, ``z = W h + b``, row ``k`` of ``G`` is ``(e_k − s) ⊗ [h, 1]``
    (``s`` the surrogate's probabilities), so ``Gᵀa = (a − s) ⊗ [h, 1]`` for every ``a`` on
    the simplex and the angle between ``Gᵀe_k`` and ``Gᵀy`` is the angle between
    ``e_k − s`` and ``y − s``: one surrogate forward and ``O(K)`` per query
    (:func:`last_layer_mad_deviation`). Each call checks that the surrogate's output is the
    last ``nn.Linear``'s output, and refuses it otherwise.
    """

    method = "mad"
    params = (EPSILON,)
    needs_surrogate = True
    keep_top1: ClassVar[bool] = False
    plans_batches = True

    def __init__(self, surrogate: nn.Module, epsilon: float, closed_form: bool = False) -> None:
        if not isinstance(surrogate, nn.Module):
            raise ValueError(f"{type(self).__name__} needs a surrogate nn.Module")
        if not isinstance(closed_form, bool):
            raise ValueError(f"closed_form must be true or false, got {closed_form!r}")
        self.surrogate = surrogate.eval()
        self.epsilon = check_epsilon(epsilon)
        self.closed_form = closed_form
        self.last_layer = _last_linear_names(surrogate)

    @classmethod
    def from_config(cls, params, surrogate, files) -> MAD:
        return cls(surrogate, params["epsilon"])

    def last_layer_jacobian(self, x: Tensor) -> Tensor:
        """``[B, K, P]``: per-query Jacobian of log-probabilities w.r.t. the last layer."""
        params = {n: p.detach() for n, p in self.surrogate.named_parameters()}
        buffers = dict(self.surrogate.named_buffers())
        last = {n: params[n] for n in self.last_layer}

        def log_probs(last_params: dict[str, Tensor], single: Tensor) -> Tensor:
            merged = {**params, **last_params}
            logits = functional_call(self.surrogate, (merged, buffers), (single.unsqueeze(0),))
            return torch.log_softmax(logits, dim=-1).squeeze(0)

        with torch.enable_grad():
            jacobian = vmap(jacrev(log_probs), in_dims=(None, 0))(last, x)
        return torch.cat([jacobian[n].flatten(2) for n in self.last_layer], dim=2).detach()

    def last_layer_logits(self, x: Tensor) -> Tensor:
        """``[B, K]``: the surrogate's logits, checked to be its last ``nn.Linear``'s output
        (what the closed form assumes)."""
        layer = self.surrogate.get_submodule(self.last_layer[0].rsplit(".", 1)[0])
        captured: list[Tensor] = []
        handle = layer.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            with torch.inference_mode():
                logits = self.surrogate(x)
        finally:
            handle.remove()
        if not captured or not torch.equal(captured[-1], logits):
            raise ValueError("closed-form MAD needs a surrogate whose output is its last "
                             "nn.Linear's output; use closed_form=False")
        return logits

    def network_rows(self, x: Tensor, probs: Tensor) -> Tensor:
        if self.closed_form:
            return self.last_layer_logits(x)
        return self.last_layer_jacobian(x.clone() if x.is_inference() else x)

    def deviation(self, x: Tensor, probs: Tensor) -> Tensor:
        """``[B, K]``: squared distance between the normalised ``Gᵀe_k`` and ``Gᵀy``."""
        if self.closed_form:
            surrogate_probs = torch.softmax(self.last_layer_logits(x).to(probs.dtype), dim=1)
            return last_layer_mad_deviation(surrogate_probs, probs)
        x = x.clone() if x.is_inference() else x
        jacobian = self.last_layer_jacobian(x).to(probs.dtype)  # [B, K, P]
        clean = torch.nn.functional.normalize(torch.einsum("bk,bkp->bp", probs, jacobian), dim=1)
        vertices = torch.nn.functional.normalize(jacobian, dim=2)
        return (vertices - clean.unsqueeze(1)).pow(2).sum(dim=2)

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        if self.epsilon == 0:
            return probs.clone()
        deviation = self.deviation(x, probs)
        # Step size toward each vertex e_k so that ‖ỹ − y‖₁ = 2 α (1 − y_k) ≤ ε.
        distance = 2 * (1 - probs)
        step = torch.where(
            distance > 0, (self.epsilon / distance.clamp_min(1e-12)).clamp_max(1), 0
        )
        if self.keep_top1:
            deviation = deviation.masked_fill(~_keeps_top1(probs, step), -torch.inf)
        vertex = deviation.argmax(dim=1, keepdim=True)
        alpha = step.gather(1, vertex)
        one_hot = torch.zeros_like(probs).scatter_(1, vertex, 1.0)
        return (1 - alpha) * probs + alpha * one_hot


def last_layer_mad_deviation(surrogate_probs: Tensor, probs: Tensor) -> Tensor:
    """``[B, K]``: MAD's last-layer deviation ``‖n(e_k − s) − n(y − s)‖²`` in closed form.

    ``surrogate_probs`` (``s``) and ``probs`` (``y``) are ``[B, K]``; ``n`` normalises (a zero
    vector stays zero, as :func:`torch.nn.functional.normalize` leaves it). Equals the
    deviation computed from the Jacobian ``G`` of the log-probabilities w.r.t. a last linear
    layer, since ``Gᵀa = (a − s) ⊗ [h, 1]`` on the simplex.
    """
    # Σ_k y_k (e_k − s) = y − s·Σy: exact even where the answer's mass is not exactly 1.
    clean = torch.nn.functional.normalize(probs - surrogate_probs * probs.sum(1, keepdim=True),
                                          dim=1)
    # ‖e_k − s‖² = 1 − 2 s_k + ‖s‖²; (e_k − s)·n(y − s) = n_k − s·n.
    vertex_norm = (1 - 2 * surrogate_probs + surrogate_probs.pow(2).sum(1, keepdim=True))
    vertex_norm = vertex_norm.clamp_min(0).sqrt().clamp_min(1e-12)
    cosine = (clean - (surrogate_probs * clean).sum(1, keepdim=True)) / vertex_norm
    clean_norm = clean.pow(2).sum(1, keepdim=True)  # 1, or 0 where y = s
    return 1 + clean_norm - 2 * cosine


class MADArgmax(MAD):
    """MAD restricted to vertices whose step keeps the clean top-1 label."""

    method = "mad_argmax"
    params = (EPSILON, KEEPS_TOP1)
    keep_top1 = True


def _keeps_top1(probs: Tensor, step: Tensor) -> Tensor:
    """``[B, K]``: does stepping by ``step[b, k]`` toward ``e_k`` keep ``argmax probs``?"""
    top = probs.argmax(dim=1, keepdim=True)
    top_prob = probs.gather(1, top)
    # After the step the top class holds (1−α) y_a and class k holds (1−α) y_k + α.
    keeps = (1 - step) * (top_prob - probs) >= step
    return keeps.scatter(1, top, True)


def _last_linear_names(model: nn.Module) -> list[str]:
    try:
        prefix, _ = last_linear(model)
    except ValueError:
        raise ValueError("MAD needs a surrogate whose last layer is nn.Linear") from None
    return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] == prefix]
