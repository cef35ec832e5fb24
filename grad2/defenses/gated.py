"""GRAD² with a per-query budget from an out-of-distribution gate, and a keyed class
mapping for the queries it flags."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from grad2 import gate
from grad2.config import ConfigError, choice, number, packed_file
from grad2.defenses.base import GATE_SLOPE, GATE_THRESHOLD, check_epsilon, check_gate
from grad2.defenses.grad2 import GRAD2
from grad2.models import last_linear
from grad2.redirect import solve_answers
from grad2.scores import Target, penultimate_features, scores_and_features

#: How the budget of out-of-distribution queries is spent.
OOD_ANSWERS = ("permute", "redirect")
#: What the gate scores: the victim's maximum softmax probability, or the Mahalanobis
#: score of the surrogate's features (``gate_file``).
GATE_SCORES = ("msp", "features")


def _read_gate(path: Path, surrogate: nn.Module | None) -> dict[str, Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


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
    params = (
        *GRAD2.params,
        number("epsilon_ood", 2.0, 0.0, 2.0, "extra L1 budget of a query the gate flags"),
        choice("ood_answer", "permute", OOD_ANSWERS,
               "how that budget is spent: relabel by the secret mapping, or redirect"),
        packed_file("mapping_key", "the secret key file of the class mapping (grad2 keygen)",
                    lambda path, surrogate: gate.read_key(path)),
        choice("gate_score", "msp", GATE_SCORES, "what the gate scores"),
        GATE_THRESHOLD,
        GATE_SLOPE,
        packed_file("gate_file", "the feature gate of gate_score: features (grad2 gate)",
                    _read_gate),
    )

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
        target_layers: int = 0,
    ) -> None:
        super().__init__(surrogate, epsilon, target, score_method, preserve_top1,
                         target_layers)
        self.epsilon_ood = check_epsilon(epsilon_ood)
        self.threshold, self.slope = check_gate(threshold, slope, gate_tensors is None)
        if gate_tensors is not None:
            gate_tensors = dict(gate_tensors)
            gate.check_feature_gate(gate_tensors, last_linear(surrogate)[1].in_features)
        self.gate_tensors = gate_tensors
        #: The gate's per-class constants, computed once (not per query).
        self.gate_terms = None if gate_tensors is None else gate.mean_terms(gate_tensors)
        if ood_answer not in OOD_ANSWERS:
            raise ValueError(f"ood_answer must be one of {', '.join(OOD_ANSWERS)}, "
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
    def check_params(cls, params: Mapping[str, Any]) -> None:
        super().check_params(params)
        permute = params["ood_answer"] == "permute"
        if permute and params["mapping_key"] is None:
            raise ConfigError("defense.mapping_key",
                              "ood_answer permute needs the file of its secret key "
                              "(grad2 keygen writes one; grad2 archive --mapping-key packs it)")
        if params["mapping_key"] is not None and not permute:
            raise ConfigError("defense.mapping_key", "only used with ood_answer permute; "
                                                     "remove it")
        features = params["gate_score"] == "features"
        if not features and not 0 <= params["gate_threshold"] <= 1:
            raise ConfigError("defense.gate_threshold",
                              f"a maximum softmax probability threshold lies in [0, 1], got "
                              f"{params['gate_threshold']}")
        if features != (params["gate_file"] is not None):
            raise ConfigError("defense.gate_file",
                              "gate_score features needs a gate_file (grad2 gate writes one), "
                              "and only it uses one")

    @classmethod
    def from_config(cls, params, surrogate, files) -> GatedGRAD2:
        target = cls.config_target(params, surrogate, files)
        mapping = None
        if params["ood_answer"] == "permute":
            key = files.get("mapping_key")
            if key is None:
                raise ConfigError("defense.mapping_key", "ood_answer permute needs a key file")
            mapping = gate.keyed_mapping(key, _output_size(surrogate))
        gate_tensors = files.get("gate_file")
        cls.check_target_layers(params, surrogate, target)
        try:
            return cls(surrogate, params["epsilon"], params["epsilon_ood"],
                       params["gate_threshold"], params["gate_slope"], params["ood_answer"],
                       mapping, target, params["scores"], params["preserve_top1"],
                       gate_tensors, params["target_layers"])
        except ValueError as error:
            raise ConfigError("defense.gate_file" if gate_tensors is not None
                              else "defense.ood_answer", str(error)) from error

    def gate_scores(self, x: Tensor, probs: Tensor) -> Tensor:
        """``[B]`` in-distribution scores ``s(x)`` (low = likely OOD); the feature gate
        reads the surrogate's features by a pass of their own, with the bits
        :meth:`scores_and_gate` gets from the scores' pass."""
        if self.gate_tensors is None:
            return gate.max_softmax(probs)
        return self._feature_score(penultimate_features(self.surrogate, x), probs)

    def scores_and_gate(self, x: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        """``([B, K] scores, [B] gate scores)``: with a feature gate, one surrogate pass
        gives both (the JVP's primal computes the features,
        :func:`grad2.scores.scores_and_features`)."""
        if self.gate_tensors is None:
            return self.scores(x, probs), gate.max_softmax(probs)
        scores, features = scores_and_features(self.surrogate, x, self.target,
                                               self.score_method)
        return self.checked(scores, probs), self._feature_score(features, probs)

    def _feature_score(self, features: Tensor, probs: Tensor) -> Tensor:
        return gate.feature_score(features, self.gate_tensors, self.gate_terms).to(probs.dtype)

    def gate_weights(self, x: Tensor, probs: Tensor) -> Tensor:
        """``[B]`` gate ``α(x)`` in ``[0, 1]`` (1: treated as OOD)."""
        return self._weights(self.gate_scores(x, probs), probs)

    def _weights(self, gate_scores: Tensor, probs: Tensor) -> Tensor:
        return gate.gate_weight(gate_scores, self.threshold, self.slope).to(probs.dtype)

    def budgets(self, x: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        """``([B], [B])``: each query's redirection budget and its OOD budget."""
        return self._split(self.gate_weights(x, probs))

    def _split(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return self.epsilon * (1 - weight), self.epsilon_ood * weight

    def network_rows(self, x: Tensor, probs: Tensor) -> Tensor:
        scores, gate_scores = self.scores_and_gate(x, probs)
        return torch.cat([scores, gate_scores.unsqueeze(1)], 1)

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        scores, gate_scores = self.scores_and_gate(x, probs)
        inside, outside = self._split(self._weights(gate_scores, probs))
        if self.ood_answer == "redirect":
            return solve_answers(probs, scores, (inside + outside).clamp(0, 2),
                                 self.preserve_top1)
        redirected = solve_answers(probs, scores, inside, self.preserve_top1)
        return gate.permuted_mix(redirected, self.mapping, outside)


def _output_size(model: nn.Module) -> int:
    """The class count of a classifier: its last ``nn.Linear``'s output size."""
    try:
        return last_linear(model)[1].out_features
    except ValueError:
        raise ConfigError("defense.surrogate", "cannot tell the class count: no nn.Linear"
                          ) from None
