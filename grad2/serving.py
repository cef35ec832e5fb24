"""Package and serve defended models with TorchServe 0.12: ``grad2 archive`` and
``grad2 serve``.

``build_archive`` checks a model's files and ``model-config.yaml`` exactly as the worker
will (same loader, plus one test batch through victim and defense) before it calls
``torch-model-archiver``, so a bad ``defense:`` section is refused at packaging time with
the key named. ``start_server``/``stop_server``/``read_tokens`` run one TorchServe per work
directory (its own temp dir, logs, ``key_file.json`` and generated ``config.properties``)
for the CLI, the tests, the demo and the attack tools.

The worker runs with the Python that runs TorchServe and imports :mod:`grad2`: every
server of a fleet needs ``pip install grad2-serve`` next to ``torchserve``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from grad2.config import ConfigError, DefenseConfig, HandlerConfig, InputConfig
from grad2.serving_io import (
    INDEX_TO_NAME_FILE,
    MODEL_CONFIG_FILE,
    VICTIM_FILE,
    check_defended,
    clean_probabilities,
    load_served_model,
    normalise,
    read_model_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HANDLER = REPO_ROOT / "handler" / "grad2_handler.py"
DEFAULT_TS_CONFIG = REPO_ROOT / "config" / "config.properties"
DEFAULT_WORKDIR = Path("runs") / "torchserve"
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
_TS_NAMESPACE = "org.pytorch.serve.ModelServer"


# =========================================================================== archive


def check_model_config(raw: Mapping[str, Any]) -> tuple[DefenseConfig, InputConfig]:
    """Validate a whole ``model-config.yaml`` mapping: ``defense:``, ``input:`` and the
    TorchServe keys this project relies on. Raises :class:`ConfigError` naming the key."""
    defense = DefenseConfig.from_dict(raw.get("defense"))
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


def stage_archive_files(
    staging: Path,
    config_path: Path,
    victim: Path,
    surrogate: Path | None = None,
    target: Path | None = None,
    index_to_name: Path | None = None,
) -> dict[str, Any]:
    """Copy the archive's files into ``staging`` under the names the handler reads
    (``victim.pt``/``.json``, ``defense.surrogate`` and its ``.json``,
    ``defense.target_file``, ``index_to_name.json``, ``model-config.yaml``).
    Returns the parsed ``model-config.yaml``."""
    raw = read_model_config(Path(config_path))
    defense, _ = check_model_config(raw)
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
    if defense.target_file is not None:
        if target is None:
            raise ConfigError(
                "defense.target_file", f"names {defense.target_file}: pass it with --target"
            )
        add(defense.target_file, Path(target), "defense.target_file")
    elif target is not None:
        raise ConfigError(
            "defense.target_file", "is not set, but --target was given; name the file there"
        )
    if index_to_name is not None:
        add(INDEX_TO_NAME_FILE, Path(index_to_name), "index_to_name")
    staging.mkdir(parents=True, exist_ok=True)
    for name, source in copies.items():
        if not source.is_file():
            raise FileNotFoundError(f"{source} not found")
        shutil.copyfile(source, staging / name)
    return raw


def smoke_test(model_dir: Path, raw_config: Mapping[str, Any], batch_size: int = 2) -> None:
    """Load ``model_dir`` as a worker would (batch plan included) and defend one batch of
    blank images; raises :class:`ConfigError` if the defense cannot answer."""
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
        with torch.enable_grad():
            defended = served.defense(x, probs)
        check_defended(defended, probs)
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
    target: Path | None = None,
    index_to_name: Path | None = None,
    force: bool = False,
    handler: Path = DEFAULT_HANDLER,
    archive_name: str | None = None,
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
        raw = stage_archive_files(staging, Path(config), Path(victim), surrogate, target,
                                  index_to_name)
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


# =========================================================================== server


@dataclass(frozen=True)
class Ports:
    """The five ports of one TorchServe."""

    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> Ports:
        """Five ports the OS says are free now."""
        sockets = []
        try:
            for _ in fields(cls):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind((host, 0))
                sockets.append(sock)
            return cls(*(sock.getsockname()[1] for sock in sockets))
        finally:
            for sock in sockets:
                sock.close()


@dataclass(frozen=True)
class Tokens:
    """Keys of ``key_file.json``; send ``Authorization: Bearer <key>``."""

    management: str
    inference: str
    api: str

    def header(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {getattr(self, kind)}"}


def read_tokens(workdir: Path, timeout: float = 30.0) -> Tokens:
    """Read ``key_file.json`` from a server's work directory, waiting up to ``timeout``
    seconds for TorchServe to write it."""
    path = Path(workdir) / "key_file.json"
    deadline = time.monotonic() + timeout
    while True:
        try:
            keys = json.loads(path.read_text())
            return Tokens(
                management=keys["management"]["key"],
                inference=keys["inference"]["key"],
                api=keys["API"]["key"],
            )
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no token file {path} after {timeout:.0f} s") from None
            time.sleep(0.2)


@dataclass
class TorchServeServer:
    """A TorchServe started by :func:`start_server`; its state lives in ``workdir``."""

    workdir: Path
    host: str
    ports: Ports
    pid: int
    models: list[str]
    model_store: str = ""

    @property
    def inference_url(self) -> str:
        return f"http://{self.host}:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://{self.host}:{self.ports.management}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    @property
    def grpc_inference_target(self) -> str:
        return f"{self.host}:{self.ports.grpc_inference}"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def tokens(self, timeout: float = 30.0) -> Tokens:
        return read_tokens(self.workdir, timeout)

    def is_running(self) -> bool:
        return _java_process(self.pid) is not None

    def processes(self) -> list[Any]:
        """The Java frontend and its worker processes (``psutil.Process``)."""
        java = _java_process(self.pid)
        if java is None:
            return []
        import psutil

        try:
            return [java, *java.children(recursive=True)]
        except psutil.Error:
            return [java]

    def model_versions(self, name: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """``GET /models/NAME/all`` on the management API (one dict per version)."""
        import requests

        response = requests.get(
            f"{self.management_url}/models/{name}/all",
            headers=self.tokens().header("management"),
            timeout=timeout,
        )
        if response.status_code == 404:
            return []
        response.raise_for_status()
        return list(response.json())

    def ready(self, name: str) -> bool:
        """Every registered version of ``name`` has at least one READY worker."""
        try:
            versions = self.model_versions(name)
        except Exception:
            return False
        return bool(versions) and all(
            any(worker.get("status") == "READY" for worker in version.get("workers", []))
            for version in versions
        )

    def wait_ready(self, names: Iterable[str] | None = None, timeout: float = 180.0) -> None:
        """Poll until every model in ``names`` (default: all started) is READY; raises
        ``RuntimeError`` with the log's error lines if the server dies or time runs out."""
        waiting = list(self.models if names is None else names)
        deadline = time.monotonic() + timeout
        while waiting:
            if not self.is_running():
                raise RuntimeError(f"TorchServe exited during start-up\n{self.log_errors()}")
            waiting = [name for name in waiting if not self.ready(name)]
            if not waiting:
                return
            refusals = self.load_refusals(waiting)
            if refusals:
                raise RuntimeError("\n".join(refusals))
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"model(s) {', '.join(waiting)} not READY after {timeout:.0f} s\n"
                    f"{self.log_errors()}"
                )
            time.sleep(0.5)

    def load_refusals(self, names: Iterable[str]) -> list[str]:
        """``model NAME version V refused to load: <key>: <why>`` lines the grad2 handler
        logged for models in ``names`` (a bad ``defense:`` section never turns READY)."""
        path = self.log_dir / "model_log.log"
        if not path.is_file():
            return []
        wanted = tuple(f"model {name} version " for name in names)
        found = []
        for line in path.read_text(errors="replace").splitlines():
            if "refused to load:" in line:
                message = line[line.find("model "):]
                if message.startswith(wanted) and message not in found:
                    found.append(message)
        return found

    def log_errors(self, limit: int = 40) -> str:
        """The last error lines of the server's and workers' logs."""
        lines: list[str] = []
        for log in ("model_log.log", "ts_log.log"):
            path = self.log_dir / log
            if path.is_file():
                for line in path.read_text(errors="replace").splitlines():
                    if re.search(r"ERROR|Error|error:|Exception|refused", line):
                        lines.append(f"{log}: {line}")
        return "\n".join(lines[-limit:])

    def stop(self, timeout: float = 60.0) -> list[int]:
        return stop_server(self.workdir, timeout)

    def save(self) -> None:
        state = {**asdict(self), "workdir": str(self.workdir), "ports": asdict(self.ports)}
        (self.workdir / "server.json").write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, workdir: Path) -> TorchServeServer:
        """The server recorded in ``workdir/server.json``."""
        path = Path(workdir) / "server.json"
        if not path.is_file():
            raise FileNotFoundError(f"no TorchServe recorded in {workdir} ({path} missing)")
        state = json.loads(path.read_text())
        state["workdir"] = Path(workdir)
        state["ports"] = Ports(**state["ports"])
        return cls(**state)


def _java_process(pid: int | None) -> Any:
    """The TorchServe Java process with ``pid``, or ``None`` if gone."""
    if not pid:
        return None
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        if _TS_NAMESPACE not in process.cmdline():
            return None
        return process
    except psutil.Error:
        return None


#: TorchServe's default request/response body limit, kept when a template names none.
DEFAULT_BODY_LIMIT = 6_553_500
_PROPERTY_LINE = re.compile(r"((?:\\.|[^=:\s\\])*)\s*[=:]?\s*(.*)$")
_ODD_TRAILING_BACKSLASHES = re.compile(r"(?<!\\)(\\\\)*\\$")


def read_java_properties(text: str) -> dict[str, str]:
    """``key -> value`` as Java's ``Properties.load`` (which TorchServe uses) reads
    ``text``: ``#``/``!`` comments, keys ending at ``=``, ``:`` or whitespace, backslash
    continuations and escapes, the last occurrence of a key winning."""
    properties: dict[str, str] = {}
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.lstrip(" \t\f")
        if not line or line[0] in "#!":
            continue
        while _ODD_TRAILING_BACKSLASHES.search(line):
            line = line[:-1] + next(lines, "").lstrip(" \t\f")
        match = _PROPERTY_LINE.match(line)
        key, value = (re.sub(r"\\(.)", r"\1", part) for part in match.groups())
        properties[key] = value
    return properties


def write_server_config(
    template: Path, destination: Path, host: str, ports: Ports
) -> Path:
    """Copy a ``config.properties`` with this server's addresses and ports, token
    authorization on, the model API off and ``metrics_config`` made absolute."""
    template = Path(template)
    if not template.is_file():
        raise FileNotFoundError(f"TorchServe config {template} not found")
    properties = read_java_properties(template.read_text())
    for key in ("max_request_size", "max_response_size"):
        properties.setdefault(key, str(DEFAULT_BODY_LIMIT))
    properties.update(
        # TS_* environment variables must not be able to override what is forced here.
        enable_envvars_config="false",
        inference_address=f"http://{host}:{ports.inference}",
        management_address=f"http://{host}:{ports.management}",
        metrics_address=f"http://{host}:{ports.metrics}",
        grpc_inference_address=host,
        grpc_management_address=host,
        grpc_inference_port=str(ports.grpc_inference),
        grpc_management_port=str(ports.grpc_management),
        disable_token_authorization="false",
        enable_model_api="false",
    )
    if "metrics_config" in properties:
        metrics = Path(properties["metrics_config"])
        if not metrics.is_absolute():
            metrics = (template.parent / metrics).resolve()
        if not metrics.is_file():
            raise FileNotFoundError(f"metrics_config {metrics} (from {template}) not found")
        properties["metrics_config"] = str(metrics)
    destination.write_text(
        f"# generated by grad2 serve from {template}\n"
        + "".join(f"{key}={value}\n" for key, value in properties.items())
    )
    return destination


def parse_model_specs(model_store: Path, models: Sequence[str] | None) -> list[str]:
    """``name=file.mar`` specs; ``None`` or empty means every ``.mar`` in the store, named
    by its manifest."""
    if models:
        specs = []
        for spec in models:
            name, sep, file = spec.partition("=")
            if not sep:
                file, name = spec, read_manifest(Path(model_store) / spec)["model"]["modelName"]
            if not (Path(model_store) / file).is_file():
                raise FileNotFoundError(f"{file} not found in model store {model_store}")
            specs.append(f"{name}={file}")
        return specs
    archives = sorted(Path(model_store).glob("*.mar"))
    if not archives:
        raise FileNotFoundError(f"no .mar archives in {model_store}; build one with grad2 archive")
    return [f"{read_manifest(path)['model']['modelName']}={path.name}" for path in archives]


def start_server(
    model_store: Path,
    models: Sequence[str] | None = None,
    workdir: Path = DEFAULT_WORKDIR,
    ts_config: Path = DEFAULT_TS_CONFIG,
    ports: Ports | None = None,
    host: str = "127.0.0.1",
    wait: bool = True,
    timeout: float = 180.0,
    extra_env: Mapping[str, str] | None = None,
) -> TorchServeServer:
    """Start TorchServe with the archives ``models`` (``name=file.mar``; several versions
    of one name are allowed, the first is the default) and, if ``wait``, return once all
    are READY. Its temp dir (``TMPDIR``/``TEMP``), logs (``LOG_LOCATION``), generated
    ``config.properties`` and ``key_file.json`` live under ``workdir``. If a model never
    becomes READY the server is stopped and ``RuntimeError`` carries the log's errors."""
    workdir = Path(workdir).resolve()
    model_store = Path(model_store).resolve()
    specs = parse_model_specs(model_store, models)
    ports = ports or Ports()
    for sub in ("tmp", "logs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    if (workdir / "server.json").is_file():
        previous = TorchServeServer.load(workdir)
        if previous.is_running():
            raise RuntimeError(
                f"a TorchServe (pid {previous.pid}) already runs from {workdir}; stop it with "
                f"grad2 serve --stop --workdir {workdir}"
            )
    (workdir / "key_file.json").unlink(missing_ok=True)
    (workdir / "tmp" / ".model_server.pid").unlink(missing_ok=True)
    config = write_server_config(Path(ts_config), workdir / "config.properties", host, ports)
    env = {key: value for key, value in os.environ.items() if key != "TS_CONFIG_FILE"}
    # MKL's matrix products give a row other last bits at other batch sizes unless its
    # conditional bit-wise reproducibility is strict: needed for batch-independent answers.
    env.setdefault("MKL_CBWR", "AUTO,STRICT")
    env.update(
        TMPDIR=str(workdir / "tmp"),
        TEMP=str(workdir / "tmp"),
        LOG_LOCATION=str(workdir / "logs"),
        METRICS_LOCATION=str(workdir / "logs"),
        **(extra_env or {}),
    )
    command = [
        sys.executable, "-m", "ts.model_server", "--start", "--ncs",
        "--model-store", str(model_store), "--ts-config", str(config),
        "--models", *specs,
    ]
    with open(workdir / "logs" / "console.log", "ab") as console:
        launcher = subprocess.run(
            command, cwd=workdir, env=env, stdout=console, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, check=False, timeout=120,
        )
    pid_file = workdir / "tmp" / ".model_server.pid"
    if launcher.returncode != 0 or not pid_file.is_file():
        raise RuntimeError(
            f"torchserve --start failed (exit {launcher.returncode}); see "
            f"{workdir / 'logs' / 'console.log'}"
        )
    server = TorchServeServer(
        workdir=workdir,
        host=host,
        ports=ports,
        pid=int(pid_file.read_text().split()[0]),
        models=list(dict.fromkeys(spec.split("=", 1)[0] for spec in specs)),
        model_store=str(model_store),
    )
    server.save()
    if wait:
        try:
            server.wait_ready(timeout=timeout)
        except BaseException:
            stop_server(workdir)
            raise
    return server


def stop_server(workdir: Path = DEFAULT_WORKDIR, timeout: float = 60.0) -> list[int]:
    """Stop the TorchServe recorded in ``workdir`` and wait until its Java process and
    every worker have exited (killing stragglers after ``timeout``). Returns their pids."""
    import psutil

    workdir = Path(workdir).resolve()
    try:
        server = TorchServeServer.load(workdir)
    except FileNotFoundError:
        pid_file = workdir / "tmp" / ".model_server.pid"
        if not pid_file.is_file():
            return []
        server = TorchServeServer(workdir, "127.0.0.1", Ports(), int(pid_file.read_text()), [])
    processes = server.processes()
    if processes:
        env = {**os.environ, "TMPDIR": str(workdir / "tmp"), "TEMP": str(workdir / "tmp")}
        subprocess.run(
            [sys.executable, "-m", "ts.model_server", "--stop"], cwd=workdir, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=60,
        )
        _, alive = psutil.wait_procs(processes, timeout=timeout)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=10)
    (workdir / "server.json").unlink(missing_ok=True)
    (workdir / "key_file.json").unlink(missing_ok=True)
    return [process.pid for process in processes]


# =========================================================================== CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``archive`` and ``serve`` sub-commands."""
    archive = subparsers.add_parser(
        "archive",
        help="validate a model and its defense config, then pack a TorchServe .mar",
        description="Validate model-config.yaml (defense:, input:) and the files exactly as "
        "the TorchServe worker will, run one test batch, then call torch-model-archiver.",
    )
    archive.add_argument("--name", required=True, help="model name (the URL's NAME)")
    archive.add_argument("--version", required=True, help="model version, e.g. 1.0")
    archive.add_argument("--victim", required=True, type=Path,
                         help="victim state_dict .pt (with its .json metadata beside it)")
    archive.add_argument("--surrogate", type=Path,
                         help="surrogate state_dict .pt (with .json); needed by grad2/mad")
    archive.add_argument("--config", required=True, type=Path, help="model-config.yaml")
    archive.add_argument("--target", type=Path, help="target tensor file (defense.target_file)")
    archive.add_argument("--index-to-name", type=Path, help="index_to_name.json class names")
    archive.add_argument("--export-path", type=Path, default=DEFAULT_MODEL_STORE,
                         help="model store to write NAME.mar into (default: model_store)")
    archive.add_argument("--archive-name", help="file name of the .mar without suffix "
                         "(default: NAME; use NAME-VERSION to keep several versions)")
    archive.add_argument("--handler", type=Path, default=DEFAULT_HANDLER,
                         help="handler file (default: the checkout's handler/grad2_handler.py)")
    archive.add_argument("--force", action="store_true", help="replace an existing .mar")
    archive.set_defaults(func=_archive_command)

    serve = subparsers.add_parser(
        "serve",
        help="start (or --stop) TorchServe with defended models, wait until READY",
        description="Start TorchServe on 127.0.0.1 with token authorization on and the "
        "model API off, wait until every model is READY, print the endpoints.",
    )
    serve.add_argument("--model-store", type=Path, default=DEFAULT_MODEL_STORE)
    serve.add_argument("--models", nargs="+", metavar="NAME=FILE.mar",
                       help="archives to serve (default: every .mar in the store)")
    serve.add_argument("--ts-config", type=Path, default=DEFAULT_TS_CONFIG,
                       help="config.properties template (default: config/config.properties)")
    serve.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                       help="server state: logs, temp files, key_file.json (default: "
                       f"{DEFAULT_WORKDIR})")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    defaults = Ports()
    for field in fields(Ports):
        flag = "--" + field.name.replace("_", "-") + "-port"
        serve.add_argument(flag, dest=f"{field.name}_port", type=int,
                           default=getattr(defaults, field.name))
    serve.add_argument("--free-ports", action="store_true",
                       help="pick five free ports instead of the defaults")
    serve.add_argument("--timeout", type=float, default=180.0,
                       help="seconds to wait for READY (default 180)")
    serve.add_argument("--stop", action="store_true",
                       help="stop the server of --workdir and wait for its processes")
    serve.set_defaults(func=_serve_command)


def _archive_command(args: argparse.Namespace) -> int:
    path = build_archive(
        name=args.name,
        version=args.version,
        victim=args.victim,
        config=args.config,
        export_path=args.export_path,
        surrogate=args.surrogate,
        target=args.target,
        index_to_name=args.index_to_name,
        force=args.force,
        handler=args.handler,
        archive_name=args.archive_name,
    )
    print(f"wrote {path}")
    return 0


def _serve_command(args: argparse.Namespace) -> int:
    if args.stop:
        pids = stop_server(args.workdir)
        print(f"stopped TorchServe ({len(pids)} processes)" if pids
              else f"no TorchServe running from {args.workdir}")
        return 0
    if args.free_ports:
        ports = Ports.free(args.host)
    else:
        ports = Ports(*(getattr(args, f"{field.name}_port") for field in fields(Ports)))
    server = start_server(
        model_store=args.model_store,
        models=args.models,
        workdir=args.workdir,
        ts_config=args.ts_config,
        ports=ports,
        host=args.host,
        timeout=args.timeout,
    )
    print(describe_server(server))
    return 0


def describe_server(server: TorchServeServer) -> str:
    """Endpoints, models and token file of a running server, for people."""
    versions = []
    for name in server.models:
        found = [str(v.get("modelVersion")) for v in server.model_versions(name)]
        versions.append(f"{name} ({', '.join(found)})")
    return "\n".join([
        f"TorchServe is READY (pid {server.pid}), work dir {server.workdir}",
        f"  inference   {server.inference_url}   POST /predictions/NAME[/VERSION], "
        "/v1/models/NAME:predict, /v2/models/NAME/infer",
        f"  management  {server.management_url}",
        f"  metrics     {server.metrics_url}",
        f"  gRPC        {server.grpc_inference_target} (inference), "
        f"{server.host}:{server.ports.grpc_management} (management)",
        f"  models      {'; '.join(versions)}",
        f"  tokens      {server.key_file}  (header 'Authorization: Bearer <inference key>')",
        f"  logs        {server.log_dir}",
        f"Stop it with: grad2 serve --stop --workdir {server.workdir}",
    ])
