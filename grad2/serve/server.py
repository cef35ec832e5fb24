"""Run TorchServe 0.12: ``grad2 serve``.

:func:`start_server`/:func:`stop_server`/:func:`read_tokens` run one TorchServe per work
directory (its own temp dir, logs, ``key_file.json`` and generated ``config.properties``)
for the CLI, the tests, the demo and the attack tools. The default ``config.properties``
and metrics declarations ship in the wheel (:mod:`grad2.serve.templates`).

The worker runs with the Python that runs TorchServe and imports :mod:`grad2`: every
server of a fleet needs ``pip install grad2-serve`` next to ``torchserve``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from grad2.serve.archive import read_manifest
from grad2.serve.templates import template_path

DEFAULT_TS_CONFIG = template_path("config.properties")
DEFAULT_WORKDIR = Path("runs") / "torchserve"
_TS_NAMESPACE = "org.pytorch.serve.ModelServer"


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
        """``GET /models/NAME/all`` on the management API (one dict per version); the
        standard library's HTTP client, so serving needs no ``requests``."""
        request = urllib.request.Request(
            f"{self.management_url}/models/{urllib.parse.quote(name)}/all",
            headers=self.tokens().header("management"),
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return list(json.loads(response.read()))
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return []
            raise

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
