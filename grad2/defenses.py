"""Output-perturbation defenses behind one interface: ``defense(x, probs) -> ỹ``.

``x`` is the victim's input batch ``[B, ...]`` and ``probs`` its clean probabilities
``[B, K]``; the result is ``[B, K]``. Parameters are validated at construction. Every
defense is built from a ``defense:`` config section by :func:`build_defense`, which looks
the class up by method name: a new defense is one class plus one registry entry.

The served methods are the classes in :data:`DEFENSES` (the one list of method names);
each class says what it needs (``budgeted``, ``needs_surrogate``) and whether it can keep
the top-1 label (``can_keep_top1``), and :class:`grad2.config.DefenseConfig` validates
against that. The evaluation's controls live in the lab (:mod:`grad2.lab.controls`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from grad2 import gate, targets
from grad2.batching import invariant_map, lone_agrees, probe_sizes
from grad2.config import ConfigError, DefenseConfig
from grad2.models import last_linear, penultimate
from grad2.redirect import redirect, separate_top
from grad2.scores import METHODS as SCORE_METHODS
from grad2.scores import Target, redirection_scores, tangent_like

#: How far a top-1-preserving answer keeps the clean top class above every other class,
#: so that a client's ``argmax`` never reads a tie as a flip.
TOP1_MARGIN = 1e-6


class Defense(ABC):
    """Maps clean probabilities to defended ones; subclasses implement :meth:`defend`."""

    #: The ``defense.method`` name that selects this class, if any.
    method: ClassVar[str | None] = None
    #: Whether ``defense.epsilon`` (an L1 budget) applies.
    budgeted: ClassVar[bool] = False
    #: Whether it needs a surrogate network (``defense.surrogate``).
    needs_surrogate: ClassVar[bool] = False
    #: Whether its answers can keep the clean top-1 label (``defense.preserve_top1``).
    can_keep_top1: ClassVar[bool] = False
    #: Whether it follows a target direction (``defense.target``/``target_file``).
    takes_target: ClassVar[bool] = False
    #: Whether an OOD gate sets its strength (``defense.gate_*``), whether that gate may
    #: read a feature detector (``gate_score: features``), and whether it moves OOD answers
    #: by a keyed class mapping (``defense.mapping_key``).
    gated: ClassVar[bool] = False
    feature_gate: ClassVar[bool] = False
    keyed: ClassVar[bool] = False
    #: Whether each answer is a function of its own row, computed by a network whose CPU
    #: kernels depend on the batch size (:meth:`network_rows`): then :meth:`plan_batches`
    #: applies.
    plans_batches: bool = False
    #: The batch sizes answers are computed in (see :meth:`plan_batches`); ``None``: as given.
    batch_sizes: tuple[int, ...] | None = None
    #: Whether a lone row computed alone has the bits of the row as a pair with itself
    #: (checked by :meth:`plan_batches`); else a lone row runs as a pair.
    lone: bool = False

    def __call__(self, x: Tensor, probs: Tensor) -> Tensor:
        """Defended probabilities ``[B, K]`` for inputs ``x`` ``[B, ...]``."""
        if probs.ndim != 2 or probs.shape[0] != x.shape[0]:
            raise ValueError(
                f"probs must be [B, K] with B = len(x) = {x.shape[0]}, got {tuple(probs.shape)}"
            )
        if not torch.isfinite(probs).all():
            raise ValueError("probs has non-finite values")
        if self.batch_sizes is None:
            return self.defend(x, probs.detach())
        return invariant_map(self.defend, (x, probs.detach()), self.batch_sizes,
                             self.defend if self.lone else None)

    def plan_batches(self, x: Tensor, probs: Tensor, max_batch: int) -> tuple[int, ...] | None:
        """Make every later answer the one its query gets as a pair with itself, whatever
        its batch-mates: probe which batch sizes up to ``max_batch`` give every row that
        answer, then defend in chunks of those sizes (:mod:`grad2.batching`).

        Args:
            x: example inputs ``[N, ...]``, ``N >= max_batch``.
            probs: their clean probabilities ``[N, K]``.
            max_batch: the largest batch the defense will be given.

        Returns:
            The sizes found, or ``None`` when this defense needs no plan.
        """
        if not self.plans_batches:
            return None
        # The network's raw output is probed, not the answer: a kernel's other last bits
        # show in every row there, while an answer hides them whenever they move no mass.
        self.batch_sizes = probe_sizes(self.network_rows, (x, probs.detach()), max_batch)
        inputs = (x, probs.detach())
        self.lone = lone_agrees(self.network_rows, inputs) and lone_agrees(self.defend, inputs)
        return self.batch_sizes

    def network_rows(self, x: Tensor, probs: Tensor) -> Tensor:
        """``[B, ...]``: the network computation whose bits an answer follows (only for
        defenses with :attr:`plans_batches`)."""
        raise NotImplementedError(f"{type(self).__name__} runs no network")

    @abstractmethod
    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        """The defense proper; inputs already checked."""

    @classmethod
    def from_config(
        cls, config: DefenseConfig, surrogate: nn.Module | None, target: Target | None,
        key: bytes | None = None, gate_tensors: Mapping[str, Tensor] | None = None,
    ) -> Defense:
        """Build from a validated ``defense:`` section (default: no parameters); ``key``
        is the secret of ``defense.mapping_key`` and ``gate_tensors`` the feature gate of
        ``defense.gate_file``, for the methods that use them."""
        return cls()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if _is_scalar(v))
        return f"{type(self).__name__}({fields})"


def _is_scalar(value: object) -> bool:
    return isinstance(value, int | float | str | bool)


def _check_epsilon(epsilon: float) -> float:
    epsilon = float(epsilon)
    if math.isnan(epsilon) or not 0 <= epsilon <= 2:
        raise ValueError(f"epsilon must lie in [0, 2], got {epsilon}")
    return epsilon


class NoDefense(Defense):
    """Returns the clean probabilities (the undefended reference)."""

    method = "none"
    can_keep_top1 = True

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        return probs.clone()


class Top1(Defense):
    """Returns the one-hot top-1 label only."""

    method = "top1"
    can_keep_top1 = True

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        return torch.zeros_like(probs).scatter_(1, probs.argmax(dim=1, keepdim=True), 1.0)


class Rounding(Defense):
    """Rounds every probability to ``decimals`` decimals (rows may sum to 1 ± K·10⁻ᵈ/2)."""

    method = "rounding"

    def __init__(self, decimals: int = 2) -> None:
        if not isinstance(decimals, int) or not 0 <= decimals <= 8:
            raise ValueError(f"decimals must be an integer in [0, 8], got {decimals!r}")
        self.decimals = decimals

    @classmethod
    def from_config(cls, config, surrogate, target, key=None, gate_tensors=None) -> Rounding:
        return cls(config.decimals)

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        return torch.round(probs, decimals=self.decimals)


class ReverseSigmoid(Defense):
    """Lee et al. 2019: ``ỹ ∝ (y − β (σ(γ σ⁻¹(y)) − ½))⁺``, renormalised."""

    method = "reverse_sigmoid"

    def __init__(self, beta: float = 0.7, gamma: float = 0.4) -> None:
        if not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {beta}")
        if not (gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"gamma must be a finite number > 0, got {gamma}")
        self.beta, self.gamma = float(beta), float(gamma)

    @classmethod
    def from_config(cls, config, surrogate, target, key=None, gate_tensors=None) -> ReverseSigmoid:
        return cls(config.beta, config.gamma)

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        tiny = torch.finfo(probs.dtype).tiny
        logit = torch.logit(probs.clamp(tiny, 1 - 1e-7))
        perturbed = (probs - self.beta * (torch.sigmoid(self.gamma * logit) - 0.5)).clamp_min(0)
        total = perturbed.sum(dim=1, keepdim=True)
        # A row clipped to all zeros keeps its label rather than becoming undefined.
        fallback = Top1().defend(x, probs)
        return torch.where(total > 0, perturbed / total.clamp_min(tiny), fallback)


class Redirection(Defense):
    """Score-driven defenses: ``ỹ = redirect(probs, scores(x, probs), epsilon)``."""

    budgeted = True
    can_keep_top1 = True

    def __init__(self, epsilon: float, preserve_top1: bool = False) -> None:
        self.epsilon = _check_epsilon(epsilon)
        self.preserve_top1 = bool(preserve_top1)

    @abstractmethod
    def scores(self, x: Tensor, probs: Tensor) -> Tensor:
        """``[B, K]`` scores; mass moves toward the highest."""

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        if self.epsilon == 0:
            return probs.clone()
        return self.solve(probs, self.scores(x, probs))

    def solve(self, probs: Tensor, scores: Tensor) -> Tensor:
        """``[B, K]`` answers for given ``scores`` ``[B, K]``: this defense's budget and
        constraint, without computing scores (what calibrations such as
        :func:`grad2.balance.balance_offsets` iterate on)."""
        if self.epsilon == 0:
            return probs.clone()
        return solve_answers(probs, scores, self.epsilon, self.preserve_top1)


def solve_answers(probs: Tensor, scores: Tensor, epsilon: float | Tensor,
                  preserve_top1: bool) -> Tensor:
    """``[B, K]`` answers of the redirection LP for ``scores`` ``[B, K]`` within ``epsilon``
    (a float or a ``[B]`` tensor); with ``preserve_top1`` the clean top class is kept
    ``TOP1_MARGIN`` above every other class, that margin paid from the budget."""
    if not preserve_top1:
        return redirect(probs, scores, epsilon)
    # Reserve the L1 that separating ties costs, then separate; a budget too small for
    # the full margin gets a smaller one, so the answer never spends more than epsilon.
    others = max(probs.shape[1] - 1, 1)
    if isinstance(epsilon, Tensor):
        margin = (epsilon.to(probs.dtype) / (2 * others)).clamp(max=TOP1_MARGIN).unsqueeze(1)
        budget = (epsilon.to(probs.dtype) - 2 * margin.squeeze(1) * others).clamp_min(0)
    else:
        margin = min(TOP1_MARGIN, epsilon / (2 * others))
        budget = max(epsilon - 2 * margin * others, 0.0)
    defended = redirect(probs, scores, budget, preserve_top1=True)
    return separate_top(defended, probs, margin)


class GRAD2(Redirection):
    """Gradient redirection: scores ``c = G t`` of a surrogate along target ``t``.

    Args:
        surrogate: the defender's copy of the clone (used in eval mode).
        epsilon: L1 budget in ``[0, 2]``.
        target: ``"all_ones"``, ``"min_ip"`` (recomputed per batch), or a tensor dict
            keyed like ``surrogate.named_parameters()`` (watermark, random, from file).
        score_method: one of :data:`grad2.scores.METHODS`.
        preserve_top1: never flip the clean top-1 label.
    """

    method = "grad2"
    needs_surrogate = True
    takes_target = True

    def __init__(
        self,
        surrogate: nn.Module,
        epsilon: float,
        target: str | Target = "all_ones",
        score_method: str = "jvp",
        preserve_top1: bool = False,
    ) -> None:
        super().__init__(epsilon, preserve_top1)
        if not isinstance(surrogate, nn.Module):
            raise ValueError("GRAD2 needs a surrogate nn.Module")
        self.surrogate = surrogate.eval()
        self.score_method = score_method
        if target == "min_ip":
            self.target_name, self.target = "min_ip", None
        elif target == "all_ones":
            self.target_name, self.target = "all_ones", targets.all_ones(surrogate)
        elif isinstance(target, Mapping):
            targets.check(target, surrogate)
            params = dict(surrogate.named_parameters())
            self.target_name, self.target = "tensor", tangent_like(params, target)
        else:
            raise ValueError(
                f"target must be 'all_ones', 'min_ip' or a tensor dict, got {target!r}"
            )
        if score_method not in SCORE_METHODS:
            raise ValueError(f"unknown score method {score_method!r}; "
                             f"known: {', '.join(SCORE_METHODS)}")

    @staticmethod
    def config_target(config: DefenseConfig, surrogate: nn.Module,
                      target: Target | None) -> str | Target:
        """The ``target`` argument a ``defense:`` section means: a target name, a seeded
        ``random`` direction, or the tensor dict read from ``target_file`` (checked against
        ``surrogate``; a mismatch raises :class:`ConfigError` naming ``target_file``)."""
        if config.target == "random":
            return targets.random(surrogate, config.seed)
        if config.target in ("all_ones", "min_ip"):
            return config.target
        if target is None:
            raise ConfigError(
                "defense.target_file", f"target {config.target} needs its tensor file"
            )
        try:
            targets.check(target, surrogate)
        except ValueError as error:
            raise ConfigError("defense.target_file", str(error)) from error
        return target

    @classmethod
    def from_config(cls, config, surrogate, target, key=None, gate_tensors=None) -> GRAD2:
        target = cls.config_target(config, surrogate, target)
        try:
            return cls(surrogate, config.epsilon, target, config.scores, config.preserve_top1)
        except ValueError as error:
            raise ConfigError("defense.target_file", str(error)) from error

    def scores(self, x: Tensor, probs: Tensor) -> Tensor:
        target = self.target
        if target is None:
            target = targets.min_ip(self.surrogate, x, probs)
        scores = redirection_scores(self.surrogate, x, target, self.score_method)
        if scores.shape != probs.shape:
            raise ValueError(
                f"surrogate gives {scores.shape[-1]} classes, the victim {probs.shape[-1]}"
            )
        return scores.to(probs.dtype)

    @property
    def plans_batches(self) -> bool:  # min_ip answers depend on the batch by design
        return self.target_name != "min_ip"

    def network_rows(self, x: Tensor, probs: Tensor) -> Tensor:
        return self.scores(x, probs)


class GatedGRAD2(GRAD2):
    """GRAD² with a per-query budget from an out-of-distribution gate.

    ``α(x) = sigmoid(ν (τ − s(x)))`` (:func:`grad2.gate.gate_weight`) splits the budget, with
    ``s`` the victim's maximum softmax probability or, given ``gate_tensors``, the
    Mahalanobis score of the surrogate's penultimate features
    (:func:`grad2.gate.feature_score`):
    ``ε (1 − α)`` of gradient redirection for every query and, on top, ``ε_ood α`` spent
    by ``ood_answer``:

    - ``"permute"``: the redirected row moves toward its relabelling by a keyed class
      permutation ``σ`` without fixed points (:func:`grad2.gate.permuted_mix`): an OOD
      answer becomes a natural-looking vector under other class names, and a clone
      trained on it inherits ``σ`` (what ``grad2 verify`` tests).
    - ``"redirect"``: the whole budget ``ε (1 − α) + ε_ood α`` goes to the redirection LP,
      label flips allowed (the target chooses where the mass goes).

    The achieved L1 never exceeds ``ε (1 − α) + ε_ood α``. Every step is a function of
    the row alone, so answers keep the bits of :class:`GRAD2`'s batch plans.

    Args:
        surrogate, epsilon, target, score_method, preserve_top1: as :class:`GRAD2`
            (``preserve_top1`` applies to the redirection of in-distribution queries).
        epsilon_ood: the extra L1 budget of a fully gated query, in ``[0, 2]``.
        threshold: ``τ``, the score below which a query counts as OOD (calibrate it on
            in-distribution validation images).
        slope: ``ν > 0``, the sharpness of the gate.
        ood_answer: ``"permute"`` or ``"redirect"``.
        mapping: ``[K]`` permutation without fixed points (needed by ``"permute"``).
        gate_tensors: ``{means [K, D], precision [D, D]}`` of
            :func:`grad2.gate.fit_feature_gate` on the surrogate's features; ``None``: the
            maximum softmax probability.
    """

    method = "grad2_gated"
    gated = feature_gate = keyed = True
    OOD_ANSWERS: ClassVar[tuple[str, ...]] = ("permute", "redirect")

    def __init__(
        self,
        surrogate: nn.Module,
        epsilon: float,
        epsilon_ood: float,
        threshold: float,
        slope: float,
        ood_answer: str = "permute",
        mapping: Tensor | None = None,
        target: str | Target = "all_ones",
        score_method: str = "jvp",
        preserve_top1: bool = False,
        gate_tensors: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__(surrogate, epsilon, target, score_method, preserve_top1)
        if target == "min_ip":
            raise ValueError("a gated defense needs a fixed target, not min_ip")
        self.epsilon_ood = _check_epsilon(epsilon_ood)
        self.threshold, self.slope = _check_gate(threshold, slope, gate_tensors is None)
        if gate_tensors is not None:
            gate_tensors = dict(gate_tensors)
            gate.check_feature_gate(gate_tensors, last_linear(surrogate)[1].in_features)
        self.gate_tensors = gate_tensors
        if ood_answer not in self.OOD_ANSWERS:
            raise ValueError(f"ood_answer must be one of {', '.join(self.OOD_ANSWERS)}, "
                             f"got {ood_answer!r}")
        self.ood_answer = ood_answer
        if ood_answer == "permute":
            if mapping is None:
                raise ValueError("ood_answer permute needs a class mapping (a mapping key)")
            mapping = torch.as_tensor(mapping, dtype=torch.int64)
            size = mapping.numel()
            if (mapping.ndim != 1 or not torch.equal(mapping.sort().values, torch.arange(size))
                    or (mapping == torch.arange(size)).any()):
                raise ValueError("mapping must be a permutation of 0..K-1 without fixed points")
        self.mapping = mapping

    @classmethod
    def from_config(cls, config, surrogate, target, key=None, gate_tensors=None
                    ) -> GatedGRAD2:
        target = cls.config_target(config, surrogate, target)
        mapping = None
        if config.ood_answer == "permute":
            if key is None:
                raise ConfigError("defense.mapping_key", "ood_answer permute needs a key file")
            with torch.no_grad():
                num_classes = _output_size(surrogate)
            mapping = gate.keyed_mapping(key, num_classes)
        try:
            return cls(surrogate, config.epsilon, config.epsilon_ood, config.gate_threshold,
                       config.gate_slope, config.ood_answer, mapping, target,
                       config.scores, config.preserve_top1, gate_tensors)
        except ValueError as error:
            raise ConfigError("defense.gate_file" if gate_tensors is not None
                              else "defense.ood_answer", str(error)) from error

    def gate_scores(self, x: Tensor, probs: Tensor) -> Tensor:
        """``[B]`` in-distribution scores ``s(x)`` (low = likely OOD)."""
        if self.gate_tensors is None:
            return gate.max_softmax(probs)
        features = penultimate(self.surrogate, x)
        return gate.feature_score(features, self.gate_tensors).to(probs.dtype)

    def gate_weights(self, x: Tensor, probs: Tensor) -> Tensor:
        """``[B]`` gate ``α(x)`` in ``[0, 1]`` (1: treated as OOD)."""
        weight = gate.gate_weight(self.gate_scores(x, probs), self.threshold, self.slope)
        return weight.to(probs.dtype)

    def budgets(self, x: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        """``([B], [B])``: each query's redirection budget and its OOD budget."""
        weight = self.gate_weights(x, probs)
        return self.epsilon * (1 - weight), self.epsilon_ood * weight

    def network_rows(self, x: Tensor, probs: Tensor) -> Tensor:
        return torch.cat([self.scores(x, probs), self.gate_scores(x, probs).unsqueeze(1)], 1)

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        inside, outside = self.budgets(x, probs)
        scores = self.scores(x, probs)
        if self.ood_answer == "redirect":
            return solve_answers(probs, scores, (inside + outside).clamp(0, 2),
                                 self.preserve_top1)
        redirected = solve_answers(probs, scores, inside, self.preserve_top1)
        return gate.permuted_mix(redirected, self.mapping, outside)


class AdaptiveMisinformation(Defense):
    """Adaptive Misinformation (Kariyappa and Qureshi, CVPR 2020).

    ``ỹ = (1 − α) y + α softmax(m(x))`` with the gate ``α = sigmoid(ν (τ − max_k y_k))``
    and ``m`` a *misinformation* network trained to put little mass on the true class
    (:func:`grad2.lab.train.train_misinformation`). Served with the network in
    ``defense.surrogate`` and ``τ``, ``ν`` in ``defense.gate_threshold``/``gate_slope``.
    """

    method = "adaptive_misinformation"
    needs_surrogate = True
    gated = True
    plans_batches = True

    def __init__(self, misinformation: nn.Module, threshold: float, slope: float) -> None:
        if not isinstance(misinformation, nn.Module):
            raise ValueError("adaptive misinformation needs a misinformation nn.Module")
        self.misinformation = misinformation.eval()
        self.threshold, self.slope = _check_gate(threshold, slope)

    @classmethod
    def from_config(cls, config, surrogate, target, key=None, gate_tensors=None
                    ) -> AdaptiveMisinformation:
        return cls(surrogate, config.gate_threshold, config.gate_slope)

    def network_rows(self, x: Tensor, probs: Tensor) -> Tensor:
        with torch.no_grad():
            return self.misinformation(x)

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        logits = self.network_rows(x, probs)
        if logits.shape != probs.shape:
            raise ValueError(f"misinformation network gives {logits.shape[-1]} classes, "
                             f"the victim {probs.shape[-1]}")
        weight = gate.ood_weight(probs, self.threshold, self.slope).to(probs.dtype)
        return torch.lerp(probs, torch.softmax(logits.to(probs.dtype), dim=1),
                          weight.unsqueeze(1))


def _check_gate(threshold: float, slope: float, probability: bool = True
                ) -> tuple[float, float]:
    threshold, slope = float(threshold), float(slope)
    if probability and not 0 <= threshold <= 1:
        raise ValueError(f"gate threshold must lie in [0, 1], got {threshold}")
    if not math.isfinite(threshold):
        raise ValueError(f"gate threshold must be finite, got {threshold}")
    if not (slope > 0 and math.isfinite(slope)):
        raise ValueError(f"gate slope must be a finite number > 0, got {slope}")
    return threshold, slope


def _output_size(model: nn.Module) -> int:
    """The class count of a classifier: its last ``nn.Linear``'s output size."""
    try:
        return last_linear(model)[1].out_features
    except ValueError:
        raise ConfigError("defense.surrogate", "cannot tell the class count: no nn.Linear"
                          ) from None


def push_scores(probs: Tensor, receivers: Tensor) -> Tensor:
    """Scores that send the budget to ``receivers`` ``[B]``, taken from the likeliest first."""
    return (-probs).scatter(1, receivers.unsqueeze(1), 2.0)


class RandomNoise(Redirection):
    """Moves ``ε/2`` of mass to one random non-top class (seeded, fresh per query)."""

    method = "random"

    def __init__(self, epsilon: float, seed: int = 0, preserve_top1: bool = False) -> None:
        super().__init__(epsilon, preserve_top1)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_config(cls, config, surrogate, target, key=None, gate_tensors=None) -> RandomNoise:
        return cls(config.epsilon, config.seed, config.preserve_top1)

    def scores(self, x: Tensor, probs: Tensor) -> Tensor:
        batch, num_classes = probs.shape
        offset = torch.randint(1, max(num_classes, 2), (batch,), generator=self._generator)
        receivers = (probs.argmax(dim=1).cpu() + offset) % num_classes
        return push_scores(probs, receivers.to(probs.device))


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
    budgeted = True
    needs_surrogate = True
    keep_top1: ClassVar[bool] = False
    plans_batches = True

    def __init__(self, surrogate: nn.Module, epsilon: float, closed_form: bool = False) -> None:
        if not isinstance(surrogate, nn.Module):
            raise ValueError(f"{type(self).__name__} needs a surrogate nn.Module")
        if not isinstance(closed_form, bool):
            raise ValueError(f"closed_form must be true or false, got {closed_form!r}")
        self.surrogate = surrogate.eval()
        self.epsilon = _check_epsilon(epsilon)
        self.closed_form = closed_form
        self.last_layer = _last_linear_names(surrogate)

    @classmethod
    def from_config(cls, config, surrogate, target, key=None, gate_tensors=None) -> MAD:
        return cls(surrogate, config.epsilon)

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
    keep_top1 = True
    can_keep_top1 = True


def _keeps_top1(probs: Tensor, step: Tensor) -> Tensor:
    """``[B, K]``: does stepping by ``step[b, k]`` toward ``e_k`` keep ``argmax probs``?"""
    top = probs.argmax(dim=1, keepdim=True)
    top_prob = probs.gather(1, top)
    # After the step the top class holds (1−α) y_a and class k holds (1−α) y_k + α.
    keeps = (1 - step) * (top_prob - probs) >= step
    return keeps.scatter(1, top, True)


def _last_linear_names(model: nn.Module) -> list[str]:
    linear_layers = [n for n, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear_layers:
        raise ValueError("MAD needs a surrogate whose last layer is nn.Linear")
    prefix = linear_layers[-1]
    names = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] == prefix]
    return names


#: The served methods: ``defense.method`` name -> class.
DEFENSES: dict[str, type[Defense]] = {
    cls.method: cls
    for cls in (NoDefense, Top1, Rounding, ReverseSigmoid, GRAD2, GatedGRAD2, RandomNoise, MAD,
                MADArgmax, AdaptiveMisinformation)
}


def build_defense(
    config: DefenseConfig | Mapping,
    surrogate: nn.Module | None = None,
    target: Target | None = None,
    key: bytes | None = None,
    gate_tensors: Mapping[str, Tensor] | None = None,
) -> Defense:
    """Build the defense a ``defense:`` section names.

    Args:
        config: a :class:`DefenseConfig` or the raw mapping (validated here).
        surrogate: the defense's network: the surrogate of ``grad2``, ``grad2_gated``,
            ``mad`` and ``mad_argmax``, the misinformation model of
            ``adaptive_misinformation``.
        target: the tensor dict of a ``watermark`` or ``file`` target.
        key: the secret of ``defense.mapping_key`` (``grad2_gated`` with ``permute``).
        gate_tensors: the feature gate of ``defense.gate_file`` (``gate_score: features``).

    Raises:
        ConfigError: naming the key, when the section or the objects do not fit.
    """
    if not isinstance(config, DefenseConfig):
        config = DefenseConfig.from_dict(config)
    if config.needs_surrogate and surrogate is None:
        raise ConfigError("defense.surrogate", f"method {config.method} needs a surrogate model")
    return DEFENSES[config.method].from_config(config, surrogate, target, key, gate_tensors)
