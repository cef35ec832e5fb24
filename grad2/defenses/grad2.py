"""GRAD² (Mazeika, Li and Forsyth, ICML 2022): scores ``c = G t`` of a surrogate along a
target direction ``t``, then the exact redirection LP."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from grad2 import targets
from grad2.config import ConfigError, choice, integer, packed_file
from grad2.defenses.base import EPSILON, PRESERVE_TOP1, SEED, Redirection
from grad2.scores import METHODS as SCORE_METHODS
from grad2.scores import Target, nonzero_directions, redirection_scores, tangent_like

#: Served targets: the paper's coordinated direction, a seeded random one, or a tensor
#: file packed in the archive (``grad2 target`` writes one).
TARGETS = ("all_ones", "random", "file")


def _read_target(path: Path, surrogate: nn.Module | None) -> Target:
    if surrogate is None:
        raise ValueError("a target needs a surrogate")
    return targets.load(path, surrogate)


_ALIKE = ("the target is left only on the surrogate's head, with the same direction for "
          "every class: it moves every logit alike, so the scores are zero; keep at least "
          "2 layers (target_layers >= 2, or 0 for all)")


class GRAD2(Redirection):
    """Gradient redirection: scores ``c = G t`` of a surrogate along target ``t``.

    Args:
        surrogate: the defender's copy of the clone (used in eval mode).
        epsilon: L1 budget in ``[0, 2]``.
        target: ``"all_ones"`` or a tensor dict keyed like
            ``surrogate.named_parameters()`` (random, misdirection, from a file).
        score_method: one of :data:`grad2.scores.METHODS`.
        preserve_top1: never flip the clean top-1 label.
        target_layers: keep the target on the surrogate's last ``target_layers``
            parameterised layers only (:func:`grad2.targets.restrict`; 0: all): the
            layers before run as a plain forward pass, so scores cost less.
    """

    method = "grad2"
    needs_surrogate = True
    plans_batches = True
    params = (
        EPSILON,
        choice("target", "all_ones", TARGETS, "the parameter-space direction clones are "
                                              "pushed along"),
        packed_file("target_file", "the tensor file of target: file", _read_target),
        SEED,
        choice("scores", "jvp", SCORE_METHODS, "how c = G t is computed"),
        PRESERVE_TOP1,
        integer("target_layers", 0, 0, 1_000_000,
                "the target only on the surrogate's last N parameterised layers (a "
                "convolution or linear layer with its normalisation), 0: all; the layers "
                "before run as a plain forward pass"),
    )

    def __init__(
        self,
        surrogate: nn.Module,
        epsilon: float,
        target: str | Target = "all_ones",
        score_method: str = "jvp",
        preserve_top1: bool = False,
        target_layers: int = 0,
    ) -> None:
        super().__init__(epsilon, preserve_top1)
        if not isinstance(surrogate, nn.Module):
            raise ValueError(f"{type(self).__name__} needs a surrogate nn.Module")
        self.surrogate = surrogate.eval()
        self.score_method = score_method
        if isinstance(target, str) and target == "all_ones":
            self.target_name, direction = "all_ones", targets.all_ones(surrogate)
        elif isinstance(target, Mapping):
            targets.check(target, surrogate)
            params = dict(surrogate.named_parameters())
            self.target_name, direction = "tensor", tangent_like(params, target)
        else:
            raise ValueError(f"target must be 'all_ones' or a tensor dict, got {target!r}")
        self.target_layers = int(target_layers)
        # Parameters without a direction carry no tangent: the layers before the first
        # one that has a direction run as a plain forward pass.
        self.target = nonzero_directions(
            targets.restrict(direction, surrogate, self.target_layers))
        if targets.moves_logits_alike(self.target, surrogate):
            raise ValueError(_ALIKE)
        if score_method not in SCORE_METHODS:
            raise ValueError(f"unknown score method {score_method!r}; "
                             f"known: {', '.join(SCORE_METHODS)}")

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        if params["target"] == "file" and params["target_file"] is None:
            raise ConfigError("defense.target_file", "target file needs a tensor file in "
                                                     "the archive")
        if params["target"] != "file" and params["target_file"] is not None:
            raise ConfigError("defense.target_file", "only used with target: file; remove it")

    @staticmethod
    def check_target_layers(params: Mapping[str, Any], surrogate: nn.Module,
                            target: str | Target) -> None:
        """Refuse a ``target_layers`` beyond the surrogate's parameterised layers, or one
        that leaves ``target`` only on the head with the same direction for every class
        (zero scores) (:class:`ConfigError` naming ``target_layers``)."""
        layers = params["target_layers"]
        count = len(targets.layer_groups(surrogate))
        if layers > count:
            raise ConfigError("defense.target_layers",
                              f"the surrogate has {count} parameterised layers; got "
                              f"{layers} (0 means all)")
        direction = targets.all_ones(surrogate) if isinstance(target, str) else target
        if layers and targets.moves_logits_alike(
                targets.restrict(direction, surrogate, layers), surrogate):
            raise ConfigError("defense.target_layers", _ALIKE)

    @staticmethod
    def config_target(params: Mapping[str, Any], surrogate: nn.Module,
                      files: Mapping[str, Any]) -> str | Target:
        """The ``target`` argument the validated ``params`` mean: ``all_ones``, a seeded
        ``random`` direction, or the tensor dict read from ``target_file`` (checked against
        ``surrogate``; a mismatch raises :class:`ConfigError` naming ``target_file``)."""
        if params["target"] == "random":
            return targets.random(surrogate, params["seed"])
        if params["target"] == "all_ones":
            return "all_ones"
        target = files.get("target_file")
        if target is None:
            raise ConfigError("defense.target_file", "target file needs its tensor file")
        try:
            targets.check(target, surrogate)
        except ValueError as error:
            raise ConfigError("defense.target_file", str(error)) from error
        return target

    @classmethod
    def from_config(cls, params, surrogate, files) -> GRAD2:
        target = cls.config_target(params, surrogate, files)
        cls.check_target_layers(params, surrogate, target)
        try:
            return cls(surrogate, params["epsilon"], target, params["scores"],
                       params["preserve_top1"], params["target_layers"])
        except ValueError as error:
            raise ConfigError("defense.target_file", str(error)) from error

    def scores(self, x: Tensor, probs: Tensor) -> Tensor:
        return self.checked(redirection_scores(self.surrogate, x, self.target,
                                               self.score_method), probs)

    @staticmethod
    def checked(scores: Tensor, probs: Tensor) -> Tensor:
        """``scores`` in ``probs``' dtype; ``ValueError`` when their class counts differ."""
        if scores.shape != probs.shape:
            raise ValueError(
                f"surrogate gives {scores.shape[-1]} classes, the victim {probs.shape[-1]}"
            )
        return scores.to(probs.dtype)

    def network_rows(self, x: Tensor, probs: Tensor) -> Tensor:
        return self.scores(x, probs)
