"""Typed, validated sections of ``model-config.yaml``.

``defense:`` selects and parameterises the defense; ``input:`` says how request images
become the victim's input tensor. Every bad value raises :class:`ConfigError` naming the
key and what is allowed, so a model with a wrong configuration refuses to load instead
of serving undefended answers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from grad2.scores import METHODS as SCORE_METHODS

TARGETS = ("all_ones", "min_ip", "watermark", "random", "file")
ON_FAILURE = ("reject", "top1")
OUTPUTS = ("probabilities", "topk")
#: How ``grad2_gated`` spends the budget of out-of-distribution queries.
OOD_ANSWERS = ("permute", "redirect")
#: What a gate scores: the maximum softmax probability, or the Mahalanobis score of the
#: surrogate's features (``defense.gate_file``).
GATE_SCORES = ("msp", "features")
#: Targets read from a tensor file packed in the archive.
FILE_TARGETS = ("watermark", "file")
#: The ε grid that tuning and the evaluation sweep by default.
EPSILON_GRID: tuple[float, ...] = tuple(round(0.1 * step, 1) for step in range(11))


def defense_classes() -> dict[str, type]:
    """The served methods, ``name -> class`` (:data:`grad2.defenses.DEFENSES`, the one list
    of method names; each class says what it needs)."""
    from grad2.defenses import DEFENSES  # defenses imports this module

    return DEFENSES


class ConfigError(ValueError):
    """A configuration value is missing or out of range; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def _number(section: str, key: str, value: Any, low: float, high: float) -> float:
    name = f"{section}.{key}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, f"must be a number in [{low:g}, {high:g}], got {value!r}")
    value = float(value)
    if math.isnan(value) or not low <= value <= high:
        raise ConfigError(name, f"must be a number in [{low:g}, {high:g}], got {value!r}")
    return value


def _integer(section: str, key: str, value: Any, low: int, high: int) -> int:
    name = f"{section}.{key}"
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(name, f"must be an integer in [{low}, {high}], got {value!r}")
    return value


def _choice(section: str, key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{section}.{key}", f"must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _flag(section: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{section}.{key}", f"must be true or false, got {value!r}")
    return value


def _optional_name(section: str, key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or "/" in value or "\\" in value:
        raise ConfigError(
            f"{section}.{key}", f"must be a file name packed in the archive, got {value!r}"
        )
    return value


def _reject_unknown(section: str, raw: Mapping[str, Any], known: set[str]) -> None:
    if not isinstance(raw, Mapping):
        raise ConfigError(section, f"must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]}",
            f"unknown key; allowed keys are {', '.join(sorted(known))}",
        )


@dataclass(frozen=True)
class DefenseConfig:
    """The ``defense:`` section. Field defaults are the product's defaults."""

    method: str = "grad2"
    epsilon: float = 0.5
    target: str = "all_ones"
    target_file: str | None = None
    surrogate: str | None = "surrogate.pt"
    preserve_top1: bool = False
    scores: str = "jvp"
    on_failure: str = "reject"
    output: str = "probabilities"
    topk: int = 5
    #: Seed of the ``random`` target and of the ``random`` defense.
    seed: int = 0
    #: Decimals kept by ``rounding``.
    decimals: int = 2
    #: Strength and slope of ``reverse_sigmoid``.
    beta: float = 0.7
    gamma: float = 0.4
    #: Out-of-distribution gate (``grad2_gated``, ``adaptive_misinformation``): queries
    #: whose ``gate_score`` falls below ``gate_threshold`` count as OOD, with a sigmoid of
    #: slope ``gate_slope``; ``features`` reads its detector from ``gate_file``.
    gate_score: str = "msp"
    gate_threshold: float = 0.9
    gate_slope: float = 50.0
    gate_file: str | None = None
    #: ``grad2_gated``: the extra L1 budget of an OOD query, and how it is spent.
    epsilon_ood: float = 2.0
    ood_answer: str = "permute"
    #: ``grad2_gated`` with ``permute``: the archive's file holding the secret key of the
    #: class mapping (kept out of this public config).
    mapping_key: str | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> DefenseConfig:
        """Validate a ``defense:`` mapping; raises :class:`ConfigError` naming the key."""
        section = "defense"
        if raw is None:
            raise ConfigError(section, "missing; a served model must name its defense")
        known = {f.name for f in fields(cls)}
        _reject_unknown(section, raw, known)
        merged = {**asdict(cls()), **raw}
        method = _choice(section, "method", merged["method"], tuple(defense_classes()))
        config = cls(
            method=method,
            epsilon=_number(section, "epsilon", merged["epsilon"], 0.0, 2.0),
            target=_choice(section, "target", merged["target"], TARGETS),
            target_file=_optional_name(section, "target_file", merged["target_file"]),
            surrogate=_optional_name(section, "surrogate", merged["surrogate"]),
            preserve_top1=_flag(section, "preserve_top1", merged["preserve_top1"]),
            scores=_choice(section, "scores", merged["scores"], SCORE_METHODS),
            on_failure=_choice(section, "on_failure", merged["on_failure"], ON_FAILURE),
            output=_choice(section, "output", merged["output"], OUTPUTS),
            topk=_integer(section, "topk", merged["topk"], 1, 100_000),
            seed=_integer(section, "seed", merged["seed"], 0, 2**63 - 1),
            decimals=_integer(section, "decimals", merged["decimals"], 0, 8),
            beta=_number(section, "beta", merged["beta"], 0.0, 1e6),
            gamma=_number(section, "gamma", merged["gamma"], 1e-6, 1e6),
            gate_score=_choice(section, "gate_score", merged["gate_score"], GATE_SCORES),
            gate_threshold=_number(section, "gate_threshold", merged["gate_threshold"],
                                   -1e12, 1e12),
            gate_file=_optional_name(section, "gate_file", merged["gate_file"]),
            gate_slope=_number(section, "gate_slope", merged["gate_slope"], 1e-3, 1e6),
            epsilon_ood=_number(section, "epsilon_ood", merged["epsilon_ood"], 0.0, 2.0),
            ood_answer=_choice(section, "ood_answer", merged["ood_answer"], OOD_ANSWERS),
            mapping_key=_optional_name(section, "mapping_key", merged["mapping_key"]),
        )
        config._check_combination()
        return config

    def _check_combination(self) -> None:
        if self.needs_surrogate and self.surrogate is None:
            raise ConfigError(
                "defense.surrogate", f"method {self.method} needs a surrogate state_dict file"
            )
        if self.preserve_top1 and not defense_classes()[self.method].can_keep_top1:
            hint = "; use method mad_argmax" if self.method == "mad" else ""
            capable = [name for name, cls in defense_classes().items() if cls.can_keep_top1]
            raise ConfigError(
                "defense.preserve_top1",
                f"method {self.method} cannot keep the top-1 label{hint}; "
                f"methods that can: {', '.join(capable)}",
            )
        uses_key = defense_classes()[self.method].keyed and self.ood_answer == "permute"
        if uses_key and self.mapping_key is None:
            raise ConfigError("defense.mapping_key",
                              "ood_answer permute needs the file of its secret key "
                              "(grad2 keygen writes one; grad2 archive --mapping-key packs it)")
        if self.mapping_key is not None and not uses_key:
            raise ConfigError("defense.mapping_key",
                              "only used by method grad2_gated with ood_answer permute; remove it")
        method = defense_classes()[self.method]
        if self.gate_score == "msp" and method.gated and not 0 <= self.gate_threshold <= 1:
            raise ConfigError("defense.gate_threshold",
                              f"a maximum softmax probability threshold lies in [0, 1], got "
                              f"{self.gate_threshold}")
        if self.gate_score == "features" and not method.feature_gate:
            capable = [name for name, cls in defense_classes().items() if cls.feature_gate]
            raise ConfigError("defense.gate_score",
                              f"method {self.method} gates on msp only; features: "
                              f"{', '.join(capable)}")
        if (self.gate_score == "features") != (self.gate_file is not None):
            raise ConfigError("defense.gate_file",
                              "gate_score features needs a gate_file (grad2 gate writes one), "
                              "and only it uses one")
        if self.method == "grad2_gated" and self.target == "min_ip":
            raise ConfigError("defense.target", "grad2_gated needs a fixed target, not min_ip")
        if self.uses_target_file and self.target in FILE_TARGETS and self.target_file is None:
            raise ConfigError(
                "defense.target_file", f"target {self.target} needs a tensor file in the archive"
            )
        if self.target_file is not None and (
            not self.uses_target_file or self.target not in FILE_TARGETS
        ):
            raise ConfigError(
                "defense.target_file",
                "only used by methods grad2 and grad2_gated with target watermark or file; "
                "remove it",
            )

    @property
    def uses_target_file(self) -> bool:
        """Whether this method reads ``target``/``target_file`` (the GRAD² methods)."""
        return defense_classes()[self.method].takes_target

    @property
    def needs_surrogate(self) -> bool:
        return defense_classes()[self.method].needs_surrogate

    @property
    def budgeted(self) -> bool:
        """Whether ``epsilon`` applies to this method."""
        return defense_classes()[self.method].budgeted


@dataclass(frozen=True)
class InputConfig:
    """The ``input:`` section: how a request image becomes a ``[C, H, W]`` tensor."""

    channels: int = 1
    height: int = 28
    width: int = 28
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    #: Largest accepted image side, in pixels, before decoding (bombs, giant images).
    max_side: int = 4096
    #: Torch threads per worker; TorchServe sets none, and oversubscription is costly.
    threads: int = 1

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> InputConfig:
        """Validate an ``input:`` mapping; raises :class:`ConfigError` naming the key."""
        section = "input"
        raw = {} if raw is None else raw
        known = {f.name for f in fields(cls)}
        _reject_unknown(section, raw, known)
        defaults = cls()
        channels = _integer(section, "channels", raw.get("channels", defaults.channels), 1, 4)
        mean = _vector(section, "mean", raw.get("mean", [0.0] * channels), channels, -1e3, 1e3)
        std = _vector(section, "std", raw.get("std", [1.0] * channels), channels, 1e-8, 1e3)
        return cls(
            channels=channels,
            height=_integer(section, "height", raw.get("height", defaults.height), 1, 8192),
            width=_integer(section, "width", raw.get("width", defaults.width), 1, 8192),
            mean=mean,
            std=std,
            max_side=_integer(
                section, "max_side", raw.get("max_side", defaults.max_side), 1, 65535
            ),
            threads=_integer(section, "threads", raw.get("threads", defaults.threads), 1, 256),
        )


#: How the worker lays out the networks' 4-D tensors (``handler.memory_format``).
MEMORY_FORMATS = ("channels_last", "contiguous")


@dataclass(frozen=True)
class HandlerConfig:
    """The ``handler:`` section: how the worker runs the networks."""

    #: Every answer a bit-exact function of its image, whatever the batching.
    batch_invariant: bool = True
    #: ``channels_last`` runs convolutions and pools in NHWC (oneDNN's native layout on a
    #: CPU; docs/performance.md measures both); ``contiguous`` keeps PyTorch's NCHW.
    memory_format: str = "channels_last"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> HandlerConfig:
        """Validate a ``handler:`` mapping; raises :class:`ConfigError` naming the key."""
        section = "handler"
        raw = {} if raw is None else raw
        _reject_unknown(section, raw, {f.name for f in fields(cls)})
        merged = {**asdict(cls()), **raw}
        return cls(
            batch_invariant=_flag(section, "batch_invariant", merged["batch_invariant"]),
            memory_format=_choice(section, "memory_format", merged["memory_format"],
                                  MEMORY_FORMATS),
        )


def _vector(
    section: str, key: str, value: Any, length: int, low: float, high: float
) -> tuple[float, ...]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value] * length
    if not isinstance(value, list | tuple) or len(value) != length:
        raise ConfigError(
            f"{section}.{key}",
            f"must be a list of {length} numbers (one per channel), got {value!r}",
        )
    return tuple(_number(section, f"{key}[{i}]", v, low, high) for i, v in enumerate(value))
