"""Run KServe's Python model server with the grad2 predictor: ``grad2 serve --runtime
kserve``.

:func:`start_kserve`/:func:`stop_kserve` run one ``python -m grad2.serve.kserve`` process
per work directory (its log and a ``kserve.json`` state file), on a free port bound to
127.0.0.1 unless told otherwise: KServe's model server has no authentication of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grad2.serve.archive import read_manifest

DEFAULT_KSERVE_WORKDIR = Path("runs") / "kserve"


@dataclass
class KServeServer:
    """A KServe model server (:mod:`grad2.serve.kserve`) started by :func:`start_kserve`
    for one archive; its state (``kserve.json``, ``tmp/``, ``logs/kserve.log``) lives in
    ``workdir``. No authentication: it listens on ``host`` only."""

    workdir: Path
    host: str
    port: int
    pid: int
    #: Model name -> the archive it serves.
    models: dict[str, str]

    @property
    def inference_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.inference_url}/metrics"

    @property
    def log_file(self) -> Path:
        return self.workdir / "logs" / "kserve.log"

    def processes(self) -> list[Any]:
        """The model server process (``psutil.Process``) and its children, if running."""
        import psutil

        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE or (
                "grad2.serve.kserve" not in process.cmdline()
            ):
                return []
            return [process, *process.children(recursive=True)]
        except psutil.Error:
            return []

    def is_running(self) -> bool:
        return bool(self.processes())

    def ready(self, timeout: float = 5.0) -> bool:
        """``GET /v2/models/NAME/ready`` answers 200 for every model."""
        for name in self.models:
            url = f"{self.inference_url}/v2/models/{urllib.parse.quote(name)}/ready"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    if response.status != 200:
                        return False
            except (urllib.error.URLError, OSError):
                return False
        return True

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll until the model is READY; ``RuntimeError`` with the log's last lines if the
        process exits (a refused archive) or time runs out."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.is_running():
                raise RuntimeError(f"the KServe model server exited during start-up\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"model(s) {', '.join(self.models)} not READY after "
                                   f"{timeout:.0f} s\n"
                                   f"{self.log_tail()}")
            time.sleep(0.3)

    def log_tail(self, limit: int = 30) -> str:
        if not self.log_file.is_file():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-limit:])

    def stop(self, timeout: float = 30.0) -> list[int]:
        return stop_kserve(self.workdir, timeout)

    def save(self) -> None:
        state = {**asdict(self), "workdir": str(self.workdir)}
        (self.workdir / "kserve.json").write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, workdir: Path) -> KServeServer:
        """The server recorded in ``workdir/kserve.json``."""
        path = Path(workdir) / "kserve.json"
        if not path.is_file():
            raise FileNotFoundError(f"no KServe model server recorded in {workdir}")
        state = json.loads(path.read_text())
        state["workdir"] = Path(workdir)
        return cls(**state)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_kserve(
    models: Mapping[str, Path] | Path,
    name: str | None = None,
    workdir: Path = DEFAULT_KSERVE_WORKDIR,
    host: str = "127.0.0.1",
    port: int | None = None,
    wait: bool = True,
    timeout: float = 180.0,
    extra_env: Mapping[str, str] | None = None,
) -> KServeServer:
    """Start ``python -m grad2.serve.kserve`` for ``models`` (name -> ``.mar`` or unpacked
    archive; or one archive, named ``name`` or by its manifest) on ``host:port`` (default:
    a free port) and, if ``wait``, return once every model is READY. Its temp dir and log
    live under ``workdir``; ``MKL_CBWR=AUTO,STRICT`` as for TorchServe. If a model never
    becomes READY the process is stopped and ``RuntimeError`` carries the log's last lines."""
    workdir = Path(workdir).resolve()
    if not isinstance(models, Mapping):
        archive = Path(models)
        if name is None and archive.is_file():
            name = read_manifest(archive)["model"]["modelName"]
        models = {name or archive.stem: archive}
    models = {key: Path(path).resolve() for key, path in models.items()}
    for path in models.values():
        if not path.exists():
            raise FileNotFoundError(f"archive {path} not found")
    for sub in ("tmp", "logs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    if (workdir / "kserve.json").is_file() and KServeServer.load(workdir).is_running():
        raise RuntimeError(f"a KServe model server already runs from {workdir}; stop it with "
                           f"grad2 serve --stop --workdir {workdir}")
    port = port or free_port(host)
    env = {**os.environ, "MKL_CBWR": os.environ.get("MKL_CBWR", "AUTO,STRICT"),
           "TMPDIR": str(workdir / "tmp"), **(extra_env or {})}
    command = [sys.executable, "-m", "grad2.serve.kserve", "--host", host,
               "--http_port", str(port), "--grpc_port", str(free_port(host))]
    for key, path in models.items():
        command += ["--model_dir", f"{key}={path}"]
    with open(workdir / "logs" / "kserve.log", "ab") as log:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    server = KServeServer(workdir, host, port, process.pid,
                          {key: str(path) for key, path in models.items()})
    server.save()
    if wait:
        try:
            server.wait_ready(timeout)
        except BaseException:
            stop_kserve(workdir)
            raise
    return server


def stop_kserve(workdir: Path = DEFAULT_KSERVE_WORKDIR, timeout: float = 30.0) -> list[int]:
    """Stop the KServe model server recorded in ``workdir`` (SIGTERM, then SIGKILL after
    ``timeout``) and wait until its processes have exited. Returns their pids."""
    import psutil

    workdir = Path(workdir).resolve()
    try:
        server = KServeServer.load(workdir)
    except FileNotFoundError:
        return []
    processes = server.processes()
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
    (workdir / "kserve.json").unlink(missing_ok=True)
    return [process.pid for process in processes]
