"""Build a ``.mar``: ``grad2 archive``.

:func:`build_archive` checks a model's files and ``model-config.yaml`` exactly as the
worker will (same loader, plus one test batch through victim and defense) before it calls
``torch-model-archiver``, so a bad ``defense:`` section is refused at packaging time with
the key named. The archive's handler is the packaged entry file
(``grad2/serve/templates/grad2_handler.py``): a few lines that import
:class:`grad2.serve.handler.Grad2Handler` from the ``grad2-serve`` installed beside
TorchServe, so an archive never carries a stale copy of the handler.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grad2.config import ConfigError, DefenseConfig, HandlerConfig, InputConfig
from grad2.defenses import parse_config
from grad2.serve.codec import check_defended, normalise
from grad2.serve.loader import (
    INDEX_TO_NAME_FILE,
    MODEL_CONFIG_FILE,
    VICTIM_FILE,
    ServedModel,
    clean_probabilities,
    load_served_model,
    read_model_config,
)
from grad2.serve.templates import template_path

DEFAULT_HANDLER = template_path("grad2_handler.py")
DEFAULT_MODEL_STORE = Path("model_store")

#: TorchServe keys of ``model-config.yaml`` checked here, with their smallest value.
TORCHSERVE_INT_KEYS: dict[str, int] = {
    "minWorkers": 0,
    "maxWorkers": 1,
    "batchSize": 1,
    "maxBatchDelay": 0,
    "responseTimeout": 1,
    "startupTimeout": 1,
}
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Seconds TorchServe 0.12 gives a worker to start when ``startupTimeout`` is not set.
DEFAULT_STARTUP_TIMEOUT = 120


def check_model_config(raw: Mapping[str, Any]) -> tuple[DefenseConfig, InputConfig]:
    """Validate a whole ``model-config.yaml`` mapping: ``defense:``, ``input:`` and the
    TorchServe keys this project relies on. Raises :class:`ConfigError` naming the key."""
    defense = parse_config(raw.get("defense"))
    spec = InputConfig.from_dict(raw.get("input"))
    HandlerConfig.from_dict(raw.get("handler"))
    for key, low in TORCHSERVE_INT_KEYS.items():
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(key, f"must be an integer >= {low}, got {value!r}")
    if "minWorkers" in raw and "maxWorkers" in raw and raw["minWorkers"] > raw["maxWorkers"]:
        raise ConfigError("minWorkers", "must not exceed maxWorkers")
    return defense, spec


def _checkpoint_pair(path: Path, what: str) -> tuple[Path, Path]:
    path = Path(path)
    metadata = path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    if not metadata.is_file():
        raise FileNotFoundError(
            f"{what} metadata {metadata} not found (grad2.models.save_checkpoint writes it)"
        )
    return path, metadata


#: ``grad2 archive`` options that pack the file of a ``defense:`` key: key -> option.
FILE_OPTIONS = {"target_file": "--target", "mapping_key": "--mapping-key",
                "gate_file": "--gate-file"}


def stage_archive_files(
    staging: Path,
    config_path: Path,
    victim: Path,
    surrogate: Path | None = None,
    index_to_name: Path | None = None,
    files: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """Copy the archive's files into ``staging`` under the names the handler reads
    (``victim.pt``/``.json``, ``defense.surrogate`` and its ``.json``, the file of every
    ``defense:`` file key the method uses, given in ``files`` as ``key -> path``,
    ``index_to_name.json``, ``model-config.yaml``). Returns the parsed
    ``model-config.yaml``."""
    raw = read_model_config(Path(config_path))
    defense, _ = check_model_config(raw)
    files = dict(files or {})
    copies: dict[str, Path] = {}

    def add(name: str, source: Path, key: str) -> None:
        if name.lower() in (existing.lower() for existing in copies):
            raise ConfigError(key, f"file name {name} collides with another archive file")
        copies[name] = source

    victim_pt, victim_json = _checkpoint_pair(victim, "victim")
    add(VICTIM_FILE, victim_pt, "victim")
    add(Path(VICTIM_FILE).with_suffix(".json").name, victim_json, "victim")
    add(MODEL_CONFIG_FILE, Path(config_path), "config")
    if surrogate is not None:
        surrogate_name = defense.surrogate or "surrogate.pt"
        if not surrogate_name.endswith(".pt"):
            raise ConfigError("defense.surrogate", f"must name a .pt file, got {surrogate_name!r}")
        surrogate_pt, surrogate_json = _checkpoint_pair(surrogate, "surrogate")
        add(surrogate_name, surrogate_pt, "defense.surrogate")
        add(Path(surrogate_name).with_suffix(".json").name, surrogate_json, "defense.surrogate")
    elif defense.needs_surrogate:
        raise ConfigError(
            "defense.surrogate", f"method {defense.method} needs a surrogate: pass --surrogate"
        )
    wanted = defense.files
    for key in files:
        if key not in wanted:
            raise ConfigError(f"defense.{key}", f"is not set, but {_option(key)} was given; "
                                                "name the file there")
    for key, name in wanted.items():
        if key not in files:
            raise ConfigError(f"defense.{key}", f"names {name}: pass it with {_option(key)}")
        add(name, Path(files[key]), f"defense.{key}")
    if index_to_name is not None:
        add(INDEX_TO_NAME_FILE, Path(index_to_name), "index_to_name")
    staging.mkdir(parents=True, exist_ok=True)
    for name, source in copies.items():
        if not source.is_file():
            raise FileNotFoundError(f"{source} not found")
        shutil.copyfile(source, staging / name)
    return raw


def _option(key: str) -> str:
    """How ``grad2 archive`` is given the file of ``defense.<key>``."""
    return FILE_OPTIONS.get(key, f"--file {key}=PATH")


def startup_warning(seconds: float, raw_config: Mapping[str, Any]) -> str | None:
    """What to tell the user when a worker's start (load and batch plan) took ``seconds``
    here, over half of the ``startupTimeout`` TorchServe allows it (a slower or busier
    machine may not start the model); ``None`` when well within it."""
    limit = raw_config.get("startupTimeout", DEFAULT_STARTUP_TIMEOUT)
    if seconds <= limit / 2:
        return None
    return (f"startupTimeout: loading this model and planning its batches took {seconds:.0f} s "
            f"here, over half of the {limit} s TorchServe gives a worker to start (the plan "
            f"probes every batch size up to batchSize = {raw_config.get('batchSize', 1)}); "
            f"raise startupTimeout in model-config.yaml or lower batchSize")


def smoke_test(model_dir: Path, raw_config: Mapping[str, Any], batch_size: int = 2) -> None:
    """Load ``model_dir`` as a worker would (batch plan included) and defend one batch of
    blank images; raises :class:`ConfigError` if the defense cannot answer, and warns
    (:func:`startup_warning`) when the start took over half of ``startupTimeout``."""
    started = time.perf_counter()
    served = load_served_model(model_dir, raw_config)
    spec = served.input_config
    pixels = torch.full((batch_size, spec.channels, spec.height, spec.width), 0.5)
    x = normalise(pixels, spec)
    probs = clean_probabilities(served.victim, x, served.victim_sizes)
    if probs.shape[1] != len(served.class_names):
        raise ConfigError("victim", f"gives {probs.shape[1]} classes, expected "
                          f"{len(served.class_names)}")
    max_batch = raw_config.get("batchSize", 1)
    try:
        served.plan_batches(max_batch if isinstance(max_batch, int) else 1)
        message = startup_warning(time.perf_counter() - started, raw_config)
        if message is not None:
            warnings.warn(message, stacklevel=2)
        with torch.enable_grad():
            defended = served.defense(x, probs)
        check_defended(defended, probs, served.defense.sum_tolerance(probs.shape[1]))
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(
            f"defense.{served.defense_config.method}",
            f"the defense failed on a test batch: {type(error).__name__}: {error}",
        ) from None


def build_archive(
    name: str,
    version: str,
    victim: Path,
    config: Path,
    export_path: Path,
    surrogate: Path | None = None,
    index_to_name: Path | None = None,
    force: bool = False,
    handler: Path = DEFAULT_HANDLER,
    archive_name: str | None = None,
    files: Mapping[str, Path] | None = None,
) -> Path:
    """Validate, then pack a ``.mar`` with ``torch-model-archiver``.

    The victim's state_dict is the serialized file (``victim.pt``); ``victim.json``, the
    surrogate pair, the target, ``index_to_name.json`` ride as extra files; ``config`` is
    the ``model-config.yaml``. Returns ``export_path / f"{archive_name or name}.mar"``.
    Raises :class:`ConfigError` (naming the key) before packing anything if the config,
    the surrogate or the target does not fit.
    """
    for label, value in (("--name", name), ("--version", version)):
        if not _NAME_PATTERN.match(value):
            raise ValueError(f"{label} {value!r}: use letters, digits, '.', '_' or '-'")
    archive_name = archive_name or name
    if not _NAME_PATTERN.match(archive_name):
        raise ValueError(f"--archive-name {archive_name!r}: use letters, digits, '.', '_' or '-'")
    handler = Path(handler)
    if not handler.is_file():
        raise FileNotFoundError(
            f"handler {handler} not found; run from a grad2-serve checkout or pass --handler"
        )
    export_path = Path(export_path)
    destination = export_path / f"{archive_name}.mar"
    if destination.exists() and not force:
        raise FileExistsError(f"{destination} exists; pass --force to replace it")
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".grad2-archive-", dir=export_path) as work:
        staging = Path(work) / "files"
        raw = stage_archive_files(staging, Path(config), Path(victim), surrogate,
                                  index_to_name, files)
        smoke_test(staging, raw)
        extras = sorted(
            str(path) for path in staging.iterdir()
            if path.name not in (VICTIM_FILE, MODEL_CONFIG_FILE)
        )
        output = Path(work) / "out"
        output.mkdir()
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", name,
            "--version", version,
            "--serialized-file", str(staging / VICTIM_FILE),
            "--handler", str(handler),
            "--extra-files", ",".join(extras),
            "--config-file", str(staging / MODEL_CONFIG_FILE),
            "--export-path", str(output),
            "--force",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        built = output / f"{name}.mar"
        if result.returncode != 0 or not built.is_file():
            raise RuntimeError(
                f"torch-model-archiver failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        os.replace(built, destination)
    return destination


def read_manifest(archive: Path) -> dict[str, Any]:
    """``MAR-INF/MANIFEST.json`` of a ``.mar``."""
    with zipfile.ZipFile(archive) as bundle:
        return json.loads(bundle.read("MAR-INF/MANIFEST.json"))


@dataclass
class Archive:
    """A ``.mar`` unpacked into ``folder`` (see :func:`open_archive`): the source of truth
    for every tool that works on a served model version."""

    path: Path
    folder: Path
    config: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["modelName"])

    @property
    def version(self) -> str:
        return str(self.manifest["modelVersion"])

    def file(self, name: str | None) -> Path | None:
        """The archive's file ``name``, or ``None`` when it has none."""
        if not name:
            return None
        path = self.folder / name
        return path if path.is_file() else None

    @property
    def victim_file(self) -> Path:
        return self.folder / self.manifest.get("serializedFile", VICTIM_FILE)

    def load(self, config: Mapping[str, Any] | None = None) -> ServedModel:
        """The model as the worker loads it, with ``config`` (default: the archive's own
        ``model-config.yaml``)."""
        return load_served_model(self.folder, self.config if config is None else config,
                                 victim_file=self.victim_file.name)

    def rebuild(self, version: str, config: Path, export_path: Path,
                surrogate: Path | None = None, archive_name: str | None = None,
                force: bool = False, files: Mapping[str, Path] | None = None) -> Path:
        """A new version of this model: the same victim and class names, ``config`` as its
        ``model-config.yaml``, and this archive's surrogate and the files of the new
        config's file keys, unless others are given (``files``: key -> path); those the new
        config does not use are left out."""
        raw = read_model_config(Path(config))
        defense = parse_config(raw.get("defense"))
        if surrogate is None and defense.needs_surrogate:
            surrogate = self.file(defense.surrogate)
        packed = {key: self.file(name) for key, name in defense.files.items()}
        packed = {key: path for key, path in packed.items() if path is not None}
        return build_archive(
            name=self.name, version=version, victim=self.victim_file, config=Path(config),
            export_path=export_path, surrogate=surrogate,
            index_to_name=self.file(INDEX_TO_NAME_FILE),
            archive_name=archive_name or f"{self.name}_v{version}", force=force,
            files={**packed, **(files or {})},
        )


@contextlib.contextmanager
def open_archive(path: Path) -> Iterator[Archive]:
    """Unpack the ``.mar`` at ``path`` into a temporary folder for the ``with`` block."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"archive {path} not found")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a .mar archive (not a zip file)")
    with tempfile.TemporaryDirectory(prefix="grad2-archive-") as folder:
        with zipfile.ZipFile(path) as bundle:
            bundle.extractall(folder)
        config_path = Path(folder) / MODEL_CONFIG_FILE
        if not config_path.is_file():
            raise ConfigError("model-config.yaml", f"{path} has none; build it with grad2 archive")
        manifest_path = Path(folder) / "MAR-INF" / "MANIFEST.json"
        manifest = json.loads(manifest_path.read_text())["model"]
        yield Archive(path, Path(folder), read_model_config(config_path), manifest)
