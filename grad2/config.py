"""Typed, validated sections of ``model-config.yaml``.

``defense:`` selects and parameterises the defense; ``input:`` says how request images
become the victim's input tensor; ``handler:`` how the worker runs the networks. Every bad
value raises :class:`ConfigError` naming the key and what is allowed, so a model with a
wrong configuration refuses to load instead of serving undefended answers.

The ``defense:`` section has a few keys every method shares (:data:`COMMON_KEYS`); the
rest belong to the chosen method, whose class declares them as :class:`Param` objects
(:mod:`grad2.defenses`). This module holds the checks, never the list of methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

ON_FAILURE = ("reject", "top1")
OUTPUTS = ("probabilities", "topk")


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


#: Reads a file a ``defense:`` key names: ``read(path, surrogate) -> object``.
FileReader = Callable[[Path, Any], Any]


@dataclass(frozen=True)
class Param:
    """One ``defense:`` key of a method: its name, default, kind and allowed values.

    ``kind`` is ``number`` (in ``[low, high]``), ``integer`` (in ``[low, high]``),
    ``choice`` (one of ``choices``), ``flag`` (true/false) or ``file`` (a file name
    packed in the archive, or null; the loader reads it with ``read`` and hands the result
    to the defense).
    """

    name: str
    default: Any
    kind: str
    doc: str
    low: float = -math.inf
    high: float = math.inf
    choices: tuple[str, ...] = ()
    read: FileReader | None = None

    KINDS: ClassVar[tuple[str, ...]] = ("number", "integer", "choice", "flag", "file")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"Param {self.name}: kind must be one of {self.KINDS}")
        if self.read is not None and self.kind != "file":
            raise ValueError(f"Param {self.name}: only a file key has a reader")

    def validate(self, value: Any) -> Any:
        """``value`` checked (numbers as floats); raises :class:`ConfigError` naming
        ``defense.<name>``."""
        section = "defense"
        if self.kind == "number":
            return _number(section, self.name, value, self.low, self.high)
        if self.kind == "integer":
            return _integer(section, self.name, value, int(self.low), int(self.high))
        if self.kind == "choice":
            return _choice(section, self.name, value, self.choices)
        if self.kind == "flag":
            return _flag(section, self.name, value)
        return _optional_name(section, self.name, value)

    @property
    def allowed(self) -> str:
        """The allowed values, for docs and messages."""
        if self.kind == "integer":
            return f"{int(self.low)} to {int(self.high)}"
        if self.kind == "number":
            return f"{self.low:g} to {self.high:g}"
        if self.kind == "choice":
            return " \\| ".join(self.choices)
        return "true \\| false" if self.kind == "flag" else "a file in the archive"


def number(name: str, default: float, low: float, high: float, doc: str) -> Param:
    """A number key in ``[low, high]``."""
    return Param(name, float(default), "number", doc, low, high)


def integer(name: str, default: int, low: int, high: int, doc: str) -> Param:
    """An integer key in ``[low, high]``."""
    return Param(name, default, "integer", doc, low, high)


def choice(name: str, default: str, choices: tuple[str, ...], doc: str) -> Param:
    """A key taking one of ``choices``."""
    return Param(name, default, "choice", doc, choices=choices)


def flag(name: str, default: bool, doc: str) -> Param:
    """A true/false key."""
    return Param(name, default, "flag", doc)


def packed_file(name: str, doc: str, read: FileReader) -> Param:
    """A key naming a file packed in the archive (default: none), loaded by ``read``."""
    return Param(name, None, "file", doc, read=read)


class DefenseSpec(Protocol):
    """What :meth:`DefenseConfig.from_dict` asks of a method's class."""

    params: ClassVar[tuple[Param, ...]]
    needs_surrogate: ClassVar[bool]

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None: ...


#: Keys every method takes: ``name -> Param``.
COMMON_KEYS: dict[str, Param] = {param.name: param for param in (
    choice("method", "grad2", (), "the defense (see the methods below)"),
    Param("surrogate", "surrogate.pt", "file", "the defense's network, packed in the archive "
          "(state_dict + .json); ignored by methods that need none"),
    choice("on_failure", "reject", ON_FAILURE,
           "when the defense fails: 503 without probabilities, or the top-1 label only"),
    choice("output", "probabilities", OUTPUTS, "all classes, or the topk largest"),
    integer("topk", 5, 1, 100_000, "classes in a topk answer"),
)}


@dataclass(frozen=True)
class DefenseConfig:
    """The ``defense:`` section, validated: the common keys and the method's own
    ``params`` (every key its class declares, defaults filled in)."""

    method: str = "grad2"
    defense: Any = field(default=None, compare=False, repr=False)
    params: Mapping[str, Any] = field(default_factory=dict)
    surrogate: str | None = "surrogate.pt"
    on_failure: str = "reject"
    output: str = "probabilities"
    topk: int = 5

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None,
                  defenses: Mapping[str, DefenseSpec]) -> DefenseConfig:
        """Validate a ``defense:`` mapping against the method classes ``defenses``
        (``name -> class``; :func:`grad2.defenses.parse_config` passes the registry);
        raises :class:`ConfigError` naming the key."""
        section = "defense"
        if raw is None:
            raise ConfigError(section, "missing; a served model must name its defense")
        if not isinstance(raw, Mapping):
            raise ConfigError(section, f"must be a mapping, got {type(raw).__name__}")
        method = _choice(section, "method", raw.get("method", "grad2"), tuple(defenses))
        spec = defenses[method]
        own = {param.name: param for param in spec.params}
        for key in sorted(set(raw) - set(COMMON_KEYS) - set(own)):
            takers = sorted(name for name, other in defenses.items()
                            if any(param.name == key for param in other.params))
            if takers:
                raise ConfigError(f"{section}.{key}", f"method {method} does not take it; "
                                                      f"methods that do: {', '.join(takers)}")
            raise ConfigError(f"{section}.{key}", "unknown key; allowed keys for method "
                              f"{method} are {', '.join(sorted({*COMMON_KEYS, *own}))}")
        params = {name: param.validate(raw.get(name, param.default))
                  for name, param in own.items()}
        common = {name: param.validate(raw.get(name, param.default))
                  for name, param in COMMON_KEYS.items() if name != "method"}
        if spec.needs_surrogate and common["surrogate"] is None:
            raise ConfigError(f"{section}.surrogate",
                              f"method {method} needs a surrogate state_dict file")
        spec.check_params(params)
        return cls(method=method, defense=spec, params=MappingProxyType(params), **common)

    @property
    def files(self) -> dict[str, str]:
        """``key -> file name`` of the method's files the loader reads (keys set, with a
        reader)."""
        return {param.name: self.params[param.name] for param in self.defense.params
                if param.read is not None and self.params[param.name] is not None}

    @property
    def needs_surrogate(self) -> bool:
        return self.defense.needs_surrogate

    @property
    def budgeted(self) -> bool:
        """Whether ``epsilon`` (an L1 budget) applies to this method."""
        return "epsilon" in self.params

    def to_dict(self) -> dict[str, Any]:
        """The section as ``model-config.yaml`` spells it (defaults filled in)."""
        return {"method": self.method, **self.params, "surrogate": self.surrogate,
                "on_failure": self.on_failure, "output": self.output, "topk": self.topk}


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
