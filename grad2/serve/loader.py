"""Loading what a model archive holds: ``model-config.yaml``, the victim, the defense's
surrogate and target, the class names; and the victim's clean probabilities in the batch
sizes that keep every row independent of its batch-mates."""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from grad2.batching import invariant_map, module_lone_plan, probe_sizes, run_lone
from grad2.config import ConfigError, DefenseConfig, HandlerConfig, InputConfig
from grad2.serve.codec import normalise

#: File names inside an archive (all files unpack flat into the worker's model dir).
VICTIM_FILE = "victim.pt"
INDEX_TO_NAME_FILE = "index_to_name.json"
MODEL_CONFIG_FILE = "model-config.yaml"


@dataclass
class ServedModel:
    """Everything a worker needs, loaded and checked: the victim, the built defense, the
    validated config sections and one class name per output."""

    victim: torch.nn.Module
    defense: Any
    defense_config: DefenseConfig
    input_config: InputConfig
    class_names: list[str]
    surrogate: torch.nn.Module | None = None
    #: Make every answer independent of its batch-mates (``handler.batch_invariant``).
    batch_invariant: bool = True
    #: Batch sizes at which each victim row equals its pair reference, found by
    #: :meth:`plan_batches`; until then every row runs as a pair with itself.
    victim_batch_sizes: tuple[int, ...] = ()
    #: The victim's layers a lone row runs as a pair (:func:`grad2.batching.run_lone`);
    #: ``None``: the whole row as a pair.
    victim_lone_plan: frozenset[str] | None = None

    @property
    def victim_sizes(self) -> tuple[int, ...] | None:
        """The ``batch_sizes`` argument of :func:`clean_probabilities` for this model."""
        return self.victim_batch_sizes if self.batch_invariant else None

    def plan_batches(self, max_batch: int, seed: int = 0) -> dict[str, tuple[int, ...] | None]:
        """With ``batch_invariant``, find the batch sizes up to ``max_batch`` at which the
        victim and the defense give each row its pair-reference result, on seeded random
        inputs of the model's shape (:mod:`grad2.batching`), and use only those from now
        on; and how a lone query keeps the bits it gets as a pair (also with
        ``batchSize: 1``, where every query is lone). Returns what was found, by part
        (empty without ``batch_invariant``)."""
        if not self.batch_invariant:
            return {}
        spec = self.input_config
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.rand((max(max_batch, 4), spec.channels, spec.height, spec.width),
                            generator=generator)
        x = normalise(pixels, spec)
        self.victim_batch_sizes = probe_sizes(
            lambda rows: clean_probabilities(self.victim, rows, None), (x,), max_batch
        ) if max_batch >= 2 else ()
        with torch.no_grad():
            self.victim_lone_plan = module_lone_plan(self.victim, x[:1])
        probs = self.probabilities(x)
        with torch.enable_grad():
            defense_sizes = self.defense.plan_batches(x, probs, max_batch)
        release_free_memory()  # the probes' and lone plans' activations
        return {"victim": self.victim_batch_sizes, "defense": defense_sizes,
                "victim_lone": self.victim_lone_plan,
                "defense_lone": getattr(self.defense, "lone", False)}

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The victim's clean probabilities ``[B, K]`` as the worker computes them: in the
        planned batch sizes, a lone row through the lone plan."""
        return clean_probabilities(self.victim, x, self.victim_sizes, self.victim_lone_plan)


def read_model_config(path: Path) -> dict[str, Any]:
    """Read ``model-config.yaml``; it must be a mapping."""
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("model-config.yaml", "must be a mapping of keys to values")
    return raw


def load_served_model(
    model_dir: Path, model_config: Mapping[str, Any], victim_file: str = VICTIM_FILE
) -> ServedModel:
    """Load and check what an archive holds (``model_dir`` is where it is unpacked).

    Validates ``defense:`` and ``input:``, loads the victim and the surrogate with
    :func:`grad2.models.load_checkpoint`, the files the method's keys name with each key's
    reader, and builds the defense with :func:`grad2.defenses.build_defense`. Any problem raises
    :class:`ConfigError` naming the key, so a model never serves undefended.
    """
    from grad2.defenses import build_defense, parse_config
    from grad2.models import set_memory_format

    if not isinstance(model_config, Mapping):
        raise ConfigError("model-config.yaml", "must be a mapping of keys to values")
    defense_config = parse_config(model_config.get("defense"))
    input_config = InputConfig.from_dict(model_config.get("input"))
    handler_config = HandlerConfig.from_dict(model_config.get("handler"))

    victim_path = model_dir / victim_file
    if not victim_path.is_file():
        raise ConfigError("victim", f"{victim_file} is not in the archive")
    victim, victim_meta = _load_network(victim_path, "victim")
    set_memory_format(victim, handler_config.memory_format)
    num_classes = int(victim_meta.get("num_classes", 0))
    if int(victim_meta.get("in_channels", input_config.channels)) != input_config.channels:
        raise ConfigError(
            "input.channels",
            f"is {input_config.channels} but the victim takes {victim_meta.get('in_channels')}",
        )

    surrogate = None
    if defense_config.surrogate is not None and defense_config.needs_surrogate:
        surrogate_path = model_dir / defense_config.surrogate
        if not surrogate_path.is_file():
            raise ConfigError(
                "defense.surrogate", f"{defense_config.surrogate} is not in the archive"
            )
        surrogate, surrogate_meta = _load_network(surrogate_path, "defense.surrogate")
        set_memory_format(surrogate, handler_config.memory_format)
        for key in ("num_classes", "in_channels"):
            if key in surrogate_meta and key in victim_meta and (
                int(surrogate_meta[key]) != int(victim_meta[key])
            ):
                raise ConfigError(
                    "defense.surrogate",
                    f"surrogate has {key}={surrogate_meta[key]} but the victim has "
                    f"{victim_meta[key]}",
                )

    # Every file key the method declares is read by its own reader; a missing or
    # unreadable file names its key.
    readers = {param.name: param.read for param in defense_config.defense.params}
    files = {key: _read_packed(model_dir, key, name,
                               lambda path, read=readers[key]: read(path, surrogate))
             for key, name in defense_config.files.items()}
    defense = build_defense(defense_config, surrogate=surrogate, files=files)
    class_names = read_class_names(model_dir / INDEX_TO_NAME_FILE, num_classes)
    release_free_memory()  # what unpickling and building freed
    return ServedModel(
        victim=victim,
        defense=defense,
        defense_config=defense_config,
        input_config=input_config,
        class_names=class_names,
        surrogate=surrogate,
        batch_invariant=handler_config.batch_invariant,
    )


def release_free_memory() -> bool:
    """Hand the memory the process has freed back to the system (glibc's
    ``malloc_trim(0)``; docs/performance.md, "Issue 24": a ResNet-18 surrogate's lone
    plan leaves ~100 MB freed but held). Returns whether it ran (not on other C
    libraries)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim  # glibc's name; others: no trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def clean_probabilities(
    victim: torch.nn.Module, x: torch.Tensor, batch_sizes: Sequence[int] | None = (),
    lone_plan: frozenset[str] | None = None,
) -> torch.Tensor:
    """``softmax(victim(x))`` ``[B, K]`` in float32, under ``no_grad`` (not
    ``inference_mode``, so the defense may still differentiate through ``x``).

    ``batch_sizes`` makes each row's result independent of its batch-mates: the victim
    sees chunks of those sizes only and a lone row as a pair with itself
    (:func:`grad2.batching.invariant_map`; ``()``: every row as a pair). CPU kernels pick
    other summation orders for other batch sizes (a small CNN's logits moved by ~1e-7
    between batch 1 and 32) and TorchServe's batches depend on traffic. ``None`` runs the
    batch as it comes (``handler: {batch_invariant: false}``). ``lone_plan`` runs a lone
    row with only the layers that differ at batch 1 paired
    (:func:`grad2.batching.module_lone_plan`)."""
    lone = None if lone_plan is None else (lambda row: run_lone(victim, row, lone_plan))
    with torch.no_grad():
        logits = victim(x) if batch_sizes is None else invariant_map(victim, (x,), batch_sizes,
                                                                    lone)
    return torch.softmax(logits.float(), dim=1)


def _read_packed(model_dir: Path, key: str, name: str, read: Callable[[Path], Any]) -> Any:
    """``read(model_dir / name)`` for the file ``defense.<key>`` names; a missing or
    unreadable file raises :class:`ConfigError` naming ``defense.<key>``."""
    path = model_dir / name
    if not path.is_file():
        raise ConfigError(f"defense.{key}", f"{name} is not in the archive")
    try:
        return read(path)
    except ConfigError:
        raise
    except Exception as error:  # pickle, zip, torch and parsing errors: not such a file
        raise ConfigError(f"defense.{key}", f"{name}: {error}") from None


def _load_network(path: Path, key: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """:func:`grad2.models.load_checkpoint`, with its errors as :class:`ConfigError`."""
    from grad2.models import load_checkpoint

    try:
        return load_checkpoint(path)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as error:
        raise ConfigError(key, f"{path.name}: {error}") from None


def read_class_names(path: Path, num_classes: int) -> list[str]:
    """Class names from ``index_to_name.json`` (``{"0": "cat", ...}`` or
    ``{"0": ["n0123", "cat"]}``), else ``"0" .. "K-1"``."""
    names = [str(i) for i in range(num_classes)]
    if not path.is_file():
        return names
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(INDEX_TO_NAME_FILE, f"is not valid JSON: {error}") from None
    if not isinstance(mapping, dict):
        raise ConfigError(INDEX_TO_NAME_FILE, "must map class indices to names")
    for key, value in mapping.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < num_classes):
            raise ConfigError(
                INDEX_TO_NAME_FILE, f"key {key!r} is not a class index below {num_classes}"
            )
        if isinstance(value, list) and value:
            value = value[-1]
        if not isinstance(value, str) or not value:
            raise ConfigError(INDEX_TO_NAME_FILE, f"name of class {key} must be a string")
        names[int(key)] = value
    if len(set(names)) != len(names):
        raise ConfigError(INDEX_TO_NAME_FILE, "class names must be distinct")
    return names
