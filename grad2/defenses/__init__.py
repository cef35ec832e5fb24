"""Output-perturbation defenses behind one interface: ``defense(x, probs) -> ỹ``.

One module per family: :mod:`~grad2.defenses.base` (the interface and shared keys),
:mod:`~grad2.defenses.baselines`, :mod:`~grad2.defenses.grad2`,
:mod:`~grad2.defenses.gated`, :mod:`~grad2.defenses.mad` and
:mod:`~grad2.defenses.misinformation`. :data:`DEFENSES` is the one list of served method
names; each class declares its own ``defense:`` keys, so adding a method is one module
plus one line below (or :func:`register` from outside the package). The evaluation's
controls and research targets live in the lab.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from grad2.config import COMMON_KEYS, ConfigError, DefenseConfig
from grad2.defenses.base import Defense, Redirection
from grad2.defenses.baselines import NoDefense, RandomNoise, ReverseSigmoid, Rounding, Top1
from grad2.defenses.gated import GatedGRAD2
from grad2.defenses.grad2 import GRAD2
from grad2.defenses.mad import MAD, MADArgmax, last_layer_mad_deviation
from grad2.defenses.misinformation import AdaptiveMisinformation

__all__ = [
    "DEFENSES",
    "GRAD2",
    "MAD",
    "AdaptiveMisinformation",
    "Defense",
    "GatedGRAD2",
    "MADArgmax",
    "NoDefense",
    "RandomNoise",
    "Redirection",
    "ReverseSigmoid",
    "Rounding",
    "Top1",
    "build_defense",
    "keys_table",
    "last_layer_mad_deviation",
    "parse_config",
    "register",
]

#: The served methods: ``defense.method`` name -> class.
DEFENSES: dict[str, type[Defense]] = {}


def register(cls: type[Defense]) -> type[Defense]:
    """Serve ``cls`` under ``cls.method`` (usable as a class decorator); a name taken by
    another class is refused."""
    name = getattr(cls, "method", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} must name its method (a class attribute 'method')")
    if DEFENSES.get(name, cls) is not cls:
        raise ValueError(f"method {name} is already served by {DEFENSES[name].__name__}")
    clashes = sorted({param.name for param in cls.params} & set(COMMON_KEYS))
    if clashes:
        raise ValueError(f"{cls.__name__} declares common keys: {', '.join(clashes)}")
    DEFENSES[name] = cls
    return cls


for _cls in (NoDefense, Top1, Rounding, ReverseSigmoid, RandomNoise, GRAD2, GatedGRAD2, MAD,
             MADArgmax, AdaptiveMisinformation):
    register(_cls)


def takes(key: str) -> list[str]:
    """The served methods whose ``defense:`` section takes ``key`` (``takes("epsilon")``:
    the budgeted ones)."""
    return [name for name, cls in DEFENSES.items() if any(p.name == key for p in cls.params)]


def parse_config(raw: Mapping[str, Any] | None) -> DefenseConfig:
    """The ``defense:`` section validated against the served methods; raises
    :class:`ConfigError` naming the key."""
    return DefenseConfig.from_dict(raw, DEFENSES)


def build_defense(
    config: DefenseConfig | Mapping[str, Any],
    surrogate: nn.Module | None = None,
    files: Mapping[str, Any] | None = None,
) -> Defense:
    """Build the defense a ``defense:`` section names.

    Args:
        config: a :class:`DefenseConfig` or the raw mapping (validated here).
        surrogate: the defense's network: the surrogate of ``grad2``, ``grad2_gated``,
            ``mad`` and ``mad_argmax``, the misinformation model of
            ``adaptive_misinformation``.
        files: what each file key holds, loaded (``{"target_file": tensor dict}``,
            ``{"mapping_key": bytes}``, ``{"gate_file": tensor dict}``); the archive
            loader reads them with each key's reader.

    Raises:
        ConfigError: naming the key, when the section or the objects do not fit.
    """
    if not isinstance(config, DefenseConfig):
        config = parse_config(config)
    if config.needs_surrogate and surrogate is None:
        raise ConfigError("defense.surrogate", f"method {config.method} needs a surrogate model")
    return config.defense.from_config(config.params, surrogate, dict(files or {}))


def keys_table() -> str:
    """The ``defense:`` keys as a markdown table: the common keys, then each method's own
    (what docs/configuration.md shows)."""
    rows = ["| key | methods | allowed (default) | meaning |", "| --- | --- | --- | --- |"]
    for name, param in COMMON_KEYS.items():
        allowed = " \\| ".join(DEFENSES) if name == "method" else param.allowed
        rows.append(f"| `{name}` | all | {allowed} ({_default(param.default)}) | {param.doc} |")
    seen: dict[tuple, list[str]] = {}
    for method, cls in DEFENSES.items():
        for param in cls.params:
            seen.setdefault((param.name, param.allowed, _default(param.default), param.doc),
                            []).append(method)
    for (name, allowed, default, doc), methods in seen.items():
        rows.append(f"| `{name}` | {', '.join(methods)} | {allowed} ({default}) | {doc} |")
    return "\n".join(rows)


def _default(value: Any) -> str:
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)
