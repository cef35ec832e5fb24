"""The KServe predictor of GRAD²-defended classifiers: the same ``.mar`` and the same answers
as the TorchServe handler, on KServe's Python model server (``pip install
'grad2-serve[kserve]'``).

``python -m grad2.serve.kserve --model_dir PATH [--model_name NAME] [--http_port N]`` loads an
archive (a ``.mar``, a folder holding one, or its unpacked files; ``--model_dir NAME=PATH``
repeated serves several), plans its batch sizes as the TorchServe worker does, and serves:

- ``POST /v1/models/NAME:predict``: a KServe v1 body (``{"instances": [...]}``), a plain JSON
  body (``{"image": b64}``, ``{"tensor": [...]}``) or image bytes (``Content-Type:
  image/*`` or ``application/octet-stream``); answers as the TorchServe handler does;
- ``POST /v2/models/NAME/infer``: Open Inference Protocol, one BYTES (base64 images) or
  FP32/FP64 ``[N, C, H, W]`` input; one BYTES output of JSON answers;
- ``/v1/models/NAME:explain`` → 403; gRPC off unless ``--enable_grpc true``;
- ``GET /metrics``: KServe's latency histograms and the handler's metrics (``DefenseTime``,
  ``DefenseL1``, ``DefendedAnswers``, ``DefenseLabelFlips``, ``DefenseFailures``,
  ``RejectedRequests``, ``HandlerTime``) with the same labels.

Per batch it runs :class:`grad2.serve.pipeline.Pipeline`, the TorchServe handler's own path.
Concurrent requests are gathered into batches of at most ``batchSize`` requests within
``maxBatchDelay`` ms (``model-config.yaml``) and run one batch at a time on one thread, as
one TorchServe worker does. KServe's model server has no authentication: run it on loopback
(the default here) or behind a gateway that authenticates clients.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import kserve
import numpy as np
import torch
from kserve.protocol.infer_type import InferRequest
from PIL import Image

from grad2.config import ConfigError, InputConfig
from grad2.serve import codec, loader
from grad2.serve.pipeline import (
    EXPLAIN_REFUSED,
    MODEL_FAILED,
    Pipeline,
    Reply,
    log_failure,
)

logger = logging.getLogger(__name__)

#: TorchServe's default ``max_request_size``: larger bodies get 413 here too.
DEFAULT_BODY_LIMIT = 6_553_500
#: The metrics the TorchServe handler emits (``templates/metrics.yaml``): name -> help.
METRIC_HELP: dict[str, str] = {
    "HandlerTime": "whole batch, decode to answers (ms)",
    "DefenseTime": "defense(x, y) per batch (ms)",
    "DefenseL1": "mean effective L1 |y~ - y|_1 of the batch's answers",
    "DefendedAnswers": "answers given with defended probabilities",
    "DefenseLabelFlips": "answers whose argmax differs from the clean argmax",
    "DefenseFailures": "answers withheld (503) or cut to the label (on_failure)",
    "RejectedRequests": "requests refused with a 4xx before the model ran",
}


class RefusedError(Exception):
    """A request answered with ``status`` and TorchServe's error body (never a value)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.body["message"])
        self.reply = reply


# --------------------------------------------------------------------------- archive


def unpack_model(path: Path, into: Path) -> tuple[Path, dict[str, Any]]:
    """The folder holding a model's files and its manifest's ``model`` entry (``{}`` when
    there is none). ``path`` is a ``.mar``, a folder with exactly one ``.mar`` (KServe's
    ``/mnt/models``), or an unpacked archive; a ``.mar`` is extracted into ``into``."""
    path = Path(path)
    if path.is_dir() and not (path / loader.MODEL_CONFIG_FILE).is_file():
        archives = sorted(path.glob("*.mar"))
        if len(archives) != 1:
            raise ConfigError("model_dir", f"{path} holds {len(archives)} .mar files and no "
                              f"{loader.MODEL_CONFIG_FILE}; give one archive")
        path = archives[0]
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ConfigError("model_dir", f"{path} is not a .mar archive (not a zip file)")
        with zipfile.ZipFile(path) as bundle:
            bundle.extractall(into)
        path = Path(into)
    if not (path / loader.MODEL_CONFIG_FILE).is_file():
        raise ConfigError("model_dir", f"{path} has no {loader.MODEL_CONFIG_FILE}")
    manifest_path = path / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())["model"] if manifest_path.is_file() else {}
    return path, manifest


# --------------------------------------------------------------------------- batching


class Batcher:
    """Gathers concurrent requests into batches of at most ``size`` within ``delay``
    seconds of the first, and runs ``run(items) -> replies`` on one thread, one batch at a
    time (TorchServe's frontend batching in front of one worker)."""

    def __init__(self, run: Callable[[list[Any]], list[Reply]], size: int, delay: float,
                 threads: int = 1) -> None:
        self.run = run
        self.size = max(1, size)
        self.delay = max(0.0, delay)
        # torch's thread count is per OS thread: the batch thread sets its own.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="grad2-batch",
                                           initializer=torch.set_num_threads,
                                           initargs=(threads,))
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, item: Any) -> Reply:
        """The reply to ``item``, computed in some batch."""
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        getter: asyncio.Future | None = None
        while True:
            batch = [await (getter or self._queue.get())]
            getter = None
            deadline = loop.time() + self.delay
            while len(batch) < self.size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                getter = asyncio.ensure_future(self._queue.get())
                done, _ = await asyncio.wait({getter}, timeout=remaining)
                if not done:
                    break  # the getter waits on for the next batch's first request
                batch.append(getter.result())
                getter = None
            await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Any, Any]]) -> None:
        items = [item for item, _ in batch]
        try:
            replies = await loop.run_in_executor(self.executor, self.run, items)
        except Exception as error:
            log_failure("batch", error, len(items))
            replies = [Reply.refusal(503, MODEL_FAILED)] * len(items)
        for (_, future), reply in zip(batch, replies):
            if not future.done():
                future.set_result(reply)


# --------------------------------------------------------------------------- metrics


class PrometheusMetrics:
    """The pipeline's metrics as Prometheus gauges and counters in the registry KServe's
    ``/metrics`` serves: TorchServe's names and labels (counters get the ``_total``
    suffix of the Prometheus client)."""

    _families: ClassVar[dict[str, Any]] = {}

    def __init__(self, model_name: str, model_version: str) -> None:
        self.labels = {"ModelName": model_name, "ModelVersion": model_version,
                       "Level": "Model", "Hostname": socket.gethostname()}

    def __call__(self, name: str, value: float, unit: str, counter: bool = False,
                 versioned: bool = True) -> None:
        """Record one value (an :class:`~grad2.serve.pipeline.Emit`); never raises."""
        labels = dict(self.labels)
        if not versioned:
            del labels["ModelVersion"]
        try:
            metric = self._family(name, counter, tuple(labels)).labels(**labels)
            if counter:
                metric.inc(value)
            else:
                metric.set(value)
        except Exception as error:
            logger.warning("metric %s not emitted: %s", name, type(error).__name__)

    @classmethod
    def _family(cls, name: str, counter: bool, label_names: tuple[str, ...]) -> Any:
        from prometheus_client import Counter, Gauge

        if name not in cls._families:
            kind = Counter if counter else Gauge
            cls._families[name] = kind(name, METRIC_HELP.get(name, name), label_names)
        return cls._families[name]


# --------------------------------------------------------------------------- predictor


class Grad2Predictor(kserve.Model):
    """Serves ``defense(x, softmax(victim(x)))`` of the archive at ``model_dir``."""

    def __init__(self, name: str | None, model_dir: Path) -> None:
        super().__init__(name or "")
        self.model_dir = Path(model_dir)
        self.model_version = ""
        self.pipeline: Pipeline | None = None
        self.batcher: Batcher | None = None

    def load(self) -> bool:
        """Unpack and load the archive as the TorchServe worker does (any problem raises,
        naming the key), then plan batch sizes up to ``batchSize``."""
        with tempfile.TemporaryDirectory(prefix="grad2-kserve-") as scratch:
            folder, manifest = unpack_model(self.model_dir, Path(scratch))
            config = loader.read_model_config(folder / loader.MODEL_CONFIG_FILE)
            self.name = self.name or str(manifest.get("modelName") or "model")
            self.model_version = str(manifest.get("modelVersion", ""))
            threads = InputConfig.from_dict(config.get("input")).threads
            torch.set_num_threads(threads)
            served = loader.load_served_model(
                folder, config,
                victim_file=manifest.get("serializedFile", loader.VICTIM_FILE),
            )
        Image.MAX_IMAGE_PIXELS = served.input_config.max_side ** 2
        emit = PrometheusMetrics(self.name, self.model_version)
        self.pipeline = Pipeline(served, self.name, self.model_version, emit)
        batch_size = int(config.get("batchSize", 1) or 1)
        self.pipeline.plan(batch_size)
        delay = float(config.get("maxBatchDelay", 100)) / 1000
        self.batcher = Batcher(self._run_batch, batch_size, delay, threads)
        self.ready = True
        logger.info("model %s version %s ready: %d classes, defense %s, batches of up to %d "
                    "requests within %.0f ms", self.name, self.model_version,
                    len(served.class_names), type(served.defense).__name__, batch_size,
                    delay * 1000)
        return self.ready

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        """One request's answer (v1: a JSON object; v2: an inference response), or
        :class:`RefusedError` with its 4xx/5xx."""
        headers = headers or {}
        if isinstance(payload, InferRequest):
            payload = v2_body(payload, headers)
        reply = await self.batcher.submit(({"body": payload}, _content_type(payload, headers)))
        if reply.status != 200:
            raise RefusedError(reply)
        return reply.body

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        """Explanations would expose the undefended model: refused."""
        raise RefusedError(Reply.refusal(403, EXPLAIN_REFUSED))

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": "probabilities", "datatype": "BYTES", "shape": [-1]}]

    def _run_batch(self, rows: Sequence[tuple[Mapping[str, Any], str | None]]) -> list[Reply]:
        """Decode and answer one batch of requests (on the batcher's thread)."""
        started = time.perf_counter()
        replies = self.pipeline.handle(rows)
        self.pipeline.emit("HandlerTime", (time.perf_counter() - started) * 1000, "ms",
                           versioned=False)
        return replies


def _content_type(payload: Any, headers: Mapping[str, str]) -> str | None:
    """The declared type of a body KServe already parsed (JSON), else the header's."""
    if isinstance(payload, Mapping | list):
        return "application/json"
    return headers.get("content-type")


def v2_body(request: InferRequest, headers: Mapping[str, str]) -> dict[str, Any]:
    """An Open Inference Protocol request as the JSON mapping the codec decodes: BYTES
    items as base64 strings (gRPC and binary-extension requests carry raw bytes), and the
    request's ``id`` (else ``x-request-id``, else a new one: KServe's v2 answer needs one)."""
    inputs = []
    for item in request.inputs:
        data = item.data
        if isinstance(data, np.ndarray):
            data = data.tolist()
        if str(item.datatype).upper() == "BYTES":
            data = _base64_items(data)
        inputs.append({"name": item.name, "shape": list(item.shape or []),
                       "datatype": item.datatype, "data": data})
    request_id = request.id or headers.get("x-request-id") or str(uuid.uuid4())
    return {"id": str(request_id), "inputs": inputs}


def _base64_items(data: Any) -> Any:
    if isinstance(data, bytes | bytearray):
        return base64.b64encode(bytes(data)).decode("ascii")
    if isinstance(data, list):
        return [_base64_items(item) for item in data]
    return data


# --------------------------------------------------------------------------- server


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets TorchServe's 413."""

    class _TooLargeError(Exception):
        pass

    def __init__(self, app: Any, limit: int = DEFAULT_BODY_LIMIT) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            await self._refuse(send)
            return
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise self._TooLargeError
            return message

        try:
            await self.app(scope, limited, send)
        except self._TooLargeError:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(codec.error_body(
            413, f"request body is larger than {self.limit} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _refused_response(_: Any, error: RefusedError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=error.reply.status, content=error.reply.body)


def serve(predictors: Sequence[Grad2Predictor], host: str, args: argparse.Namespace) -> None:
    """Run KServe's model server (REST, and gRPC if ``args.enable_grpc``) for
    ``predictors`` until SIGTERM/SIGINT, with REST bound to ``host``."""
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.model_server import ModelServer, app
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.rest.server import RESTServer

    app.add_exception_handler(RefusedError, _refused_response)
    app.add_middleware(BodyLimit, limit=args.max_request_size)
    server = ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1,
                         enable_grpc=args.enable_grpc)
    for predictor in predictors:
        server.register_model(predictor)
        predictor.enable_latency_logging = server.enable_latency_logging
    rest = RESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane,
                      server.model_repository_extension, args.http_port, workers=1,
                      grace_period=server.grace_period, event_loop=args.event_loop,
                      timeout_keep_alive=args.timeout_keep_alive)
    rest.config.host = host  # KServe binds 0.0.0.0; this server binds where it is told
    server._rest_server = rest
    server.servers.append(rest.start())
    if args.enable_grpc:
        grpc = GRPCServer(args.grpc_port, server.dataplane, server.model_repository_extension,
                          kwargs=vars(args), grace_period=server.grace_period)
        server._grpc_server = grpc
        server.servers.append(grpc.start(args.max_threads))
    server.setup_event_loop()
    asyncio.run(_serve_until_stopped(server.servers))


async def _serve_until_stopped(servers: list[Any]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*servers)


def build_parser() -> argparse.ArgumentParser:
    """KServe's model server options plus ``--model_dir``, ``--host``,
    ``--max_request_size``; gRPC off unless ``--enable_grpc true``."""
    from kserve.model_server import parser as kserve_parser

    parser = argparse.ArgumentParser(
        prog="python -m grad2.serve.kserve", parents=[kserve_parser],
        description="Serve a GRAD²-defended .mar on KServe's model server.")
    parser.add_argument("--model_dir", required=True, action="append",
                        help="a .mar, a folder holding one (KServe's /mnt/models), or an "
                        "unpacked archive; NAME=PATH, repeated, serves several")
    parser.add_argument("--host", default="127.0.0.1",
                        help="REST address (default 127.0.0.1; 0.0.0.0 in a pod)")
    parser.add_argument("--max_request_size", type=int, default=DEFAULT_BODY_LIMIT,
                        help="largest request body in bytes (413 above)")
    parser.set_defaults(model_name=None, enable_grpc=False)
    return parser


def model_specs(specs: Sequence[str], name: str | None = None
                ) -> list[tuple[str | None, Path]]:
    """``(name, path)`` per ``--model_dir`` value (``PATH`` or ``NAME=PATH``); ``name``
    (``--model_name``) names a lone unnamed one; unnamed ones take their manifest's."""
    found = []
    for spec in specs:
        given, separator, path = spec.partition("=")
        if separator and given and not Path(spec).exists():
            found.append((given, Path(path)))
        else:
            found.append((name if len(specs) == 1 else None, Path(spec)))
    return found


def _log_to_stderr() -> None:
    """Show this package's log lines (load, batch plans, failures) beside KServe's."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s "
                                           "%(message)s"))
    package = logging.getLogger("grad2")
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m grad2.serve.kserve``."""
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    if "MKL_CBWR" not in os.environ:
        logger.warning("MKL_CBWR is not set: set MKL_CBWR=AUTO,STRICT for answers that are "
                       "bit-identical at every batch size")
    predictors = [Grad2Predictor(name, path)
                  for name, path in model_specs(args.model_dir, args.model_name)]
    for predictor in predictors:
        try:
            predictor.load()
        except Exception as error:
            where = predictor.name or predictor.model_dir
            logger.error("model %s refused to load: %s", where, error)
            print(f"model {where} refused to load: {error}", file=sys.stderr)
            return 2
    serve(predictors, args.host, args)
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this ``__main__`` copy: one set of classes and
    # metrics, and log lines under ``grad2.serve.kserve``.
    from grad2.serve.kserve import main as module_main

    sys.exit(module_main())
