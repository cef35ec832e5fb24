"""The TorchServe handler of GRAD²-defended classifiers.

Archives do not carry this module: their entry file (``templates/grad2_handler.py``)
subclasses :class:`Grad2Handler` from the installed ``grad2-serve``.

Per batch: decode each request (a bad one gets its own 4xx, the rest go on), run the
victim once, run the configured defense once on the whole batch, answer each request with
its defended probabilities. That path is :class:`grad2.serve.pipeline.Pipeline`, shared with
the KServe predictor; this module is only its TorchServe glue (``Context``, headers,
statuses, metrics, gRPC stream ends). The clean probabilities never leave this file: not in an
answer, an error, a log line or a metric. If the defense cannot run, the batch fails
closed (``on_failure: reject`` → 503 without probabilities; ``top1`` → the label only).
``/explanations``, ``:explain`` and ``describe`` never run the model.

The worker imports :mod:`grad2`, so every TorchServe server needs
``pip install grad2-serve`` in the Python environment that runs ``torchserve``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from grad2.config import InputConfig
from grad2.serve import codec, loader
from grad2.serve.pipeline import (
    DEFENSE_FAILED,
    EXPLAIN_REFUSED,
    MODEL_FAILED,
    Pipeline,
    Reply,
    log_failure,
)

__all__ = ["DEFENSE_FAILED", "EXPLAIN_REFUSED", "MODEL_FAILED", "Grad2Handler"]

logger = logging.getLogger(__name__)


def _header(headers: dict[str, Any], name: str) -> Any:
    """A request header by case-insensitive name (TorchServe keeps the client's case)."""
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name:
            return value
    return None


class Grad2Handler(BaseHandler):
    """Serves ``defense(x, softmax(victim(x)))`` configured by ``model-config.yaml``."""

    def initialize(self, context: Any) -> None:
        """Validate ``defense:``/``input:``, load victim, surrogate, target, build the
        defense. Any problem raises (naming the key), so the model never becomes READY."""
        self.context = context
        self.manifest = context.manifest
        model = self.manifest.get("model", {})
        self.model_name = str(getattr(context, "model_name", None) or model.get("modelName", ""))
        self.model_version = str(model.get("modelVersion", ""))
        self.model_yaml_config = context.model_yaml_config or {}
        model_dir = Path(context.system_properties["model_dir"])
        try:
            threads = InputConfig.from_dict(self.model_yaml_config.get("input")).threads
            torch.set_num_threads(threads)
            self.served = loader.load_served_model(
                model_dir,
                self.model_yaml_config,
                victim_file=model.get("serializedFile", loader.VICTIM_FILE),
            )
            self.pipeline = Pipeline(
                self.served, self.model_name, self.model_version, self._emit
            )
            self.pipeline.plan(int(context.system_properties.get("batch_size") or 1))
        except Exception as error:
            logger.error(
                "model %s version %s refused to load: %s",
                self.model_name,
                self.model_version,
                error,
            )
            raise
        # PIL's own bomb guard, per worker process, on top of the max_side check that
        # codec.decode_image makes before decoding.
        max_side = self.served.input_config.max_side
        Image.MAX_IMAGE_PIXELS = max_side * max_side
        self.device = torch.device("cpu")
        self.map_location = "cpu"
        self.model = self.served.victim
        self.mapping = dict(enumerate(self.served.class_names))
        self.initialized = True
        logger.info(
            "model %s version %s ready: %d classes, defense %s",
            self.model_name,
            self.model_version,
            len(self.served.class_names),
            type(self.served.defense).__name__,
        )

    # ------------------------------------------------------------------ entry point

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        """One response per request, always ``len(data)`` of them."""
        started = time.perf_counter()
        self.context = context
        self._responses: list[Any] = [None] * len(data)
        try:
            rows = self.preprocess(data)
            replies = self.pipeline.handle(
                [(row, content_type) for _, row, content_type in rows],
                self.inference,
                self.postprocess,
            )
            for (index, _, _), reply in zip(rows, replies):
                self._reply(index, reply)
        except Exception as error:  # never let TorchServe log a message that may quote y
            log_failure("handler", error, len(data))
            for index, response in enumerate(self._responses):
                if response is None:
                    self._refuse(index, 503, MODEL_FAILED)
        for index in range(len(data)):
            self._end_grpc_stream(index)
        self._metric("HandlerTime", (time.perf_counter() - started) * 1000, "ms", versioned=False)
        return self._responses

    def preprocess(
        self, data: list[dict[str, Any]]
    ) -> list[tuple[int, dict[str, Any], Callable[[str], str | None]]]:
        """Answer describe and explain requests; returns the rest for the pipeline to
        decode: per request its index in the batch, its row and its payload's declared
        content type as a function of the payload's field."""
        rows = []
        for index, row in enumerate(data):
            headers = self._headers(index)
            if str(_header(headers, "describe")).lower() == "true":
                self._responses[index] = self.describe_handle()
            elif str(_header(headers, "explain")).lower() == "true":
                self._refuse(index, 403, EXPLAIN_REFUSED)
            else:
                rows.append((index, row, partial(self._content_type, headers)))
        return rows

    def inference(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Clean probabilities ``[N, K]`` = ``softmax(victim(x))`` (never answered as is).
        Runs under ``no_grad``, not ``inference_mode``, so the defense may differentiate
        through ``x``; in the planned batch sizes unless ``handler.batch_invariant`` is
        false, and a lone query with only the layers that differ at batch 1 paired."""
        return self.pipeline.probabilities(x, self.model)

    def postprocess(self, x: torch.Tensor, probs: torch.Tensor) -> list[dict[str, Any]] | None:
        """Defend the whole batch once and encode one answer per image; ``None`` when the
        defense failed and ``on_failure`` is ``reject``."""
        return self.pipeline.defend(x, probs)

    # ------------------------------------------------------------------ routes without answers

    def describe_handle(self) -> dict[str, Any]:
        """A static description: what to send and what comes back, never an output."""
        return self.pipeline.describe()

    def explain_handle(self, data_preprocess: Any, raw_data: Any) -> dict[str, Any]:
        """Explanations would expose the undefended model: refused."""
        return codec.error_body(403, EXPLAIN_REFUSED)

    def get_insights(self, tensor_data: Any, _: Any, target: Any = 0) -> dict[str, Any]:
        """Explanations would expose the undefended model: refused."""
        return codec.error_body(403, EXPLAIN_REFUSED)

    # ------------------------------------------------------------------ helpers

    def _reply(self, index: int, reply: Reply) -> None:
        """Set request ``index``'s answer (and its status, unless 200)."""
        if reply.status != 200:
            self._refuse(index, reply.status, reply.body["message"])
            return
        self._responses[index] = reply.body
        self._set_content_type(index)

    def _end_grpc_stream(self, index: int) -> None:
        """Mark a gRPC request's answer as the last of its stream. TorchServe 0.12's
        frontend reads the ``ts_stream_next`` response header of a gRPC
        ``StreamPredictions`` call without a null check, and on the exception it kills
        and restarts the worker: one call from any inference token took the model down.
        HTTP requests must not get the header (the frontend would then stream a chunked
        answer that never ends); they carry string headers (TorchServe adds ``explain``
        to every HTTP inference request), gRPC requests only one content-type mapping
        per input field."""
        if any(isinstance(value, str) for value in self._headers(index).values()):
            return
        with contextlib.suppress(AttributeError, IndexError, KeyError):
            self.context.set_response_header(index, "ts_stream_next", "false")

    def _refuse(self, index: int, status: int, message: str) -> None:
        self._responses[index] = codec.error_body(status, message)
        self.context.set_response_status(status, message, idx=index)
        self._set_content_type(index)

    def _set_content_type(self, index: int) -> None:
        with contextlib.suppress(AttributeError, IndexError, TypeError):
            self.context.set_response_content_type(index, "application/json")

    def _headers(self, index: int) -> dict[str, Any]:
        try:
            headers = self.context.get_all_request_header(index)
        except (AttributeError, IndexError, TypeError):
            return {}
        return headers if isinstance(headers, dict) else {}

    @staticmethod
    def _content_type(headers: dict[str, Any], field: str) -> str | None:
        """The declared type of payload ``field`` (multipart part or body), else the
        request's ``Content-Type``."""
        part = headers.get(field)
        if isinstance(part, dict) and part.get("content-type"):
            return str(part["content-type"])
        value = _header(headers, "content-type")
        return str(value) if value else None

    def _emit(self, name: str, value: float, unit: str, counter: bool = False,
              versioned: bool = True) -> None:
        """The pipeline's metrics, as TorchServe custom metrics."""
        kind = MetricTypes.COUNTER if counter else MetricTypes.GAUGE
        self._metric(name, value, unit, kind, versioned)

    def _metric(
        self,
        name: str,
        value: float,
        unit: str,
        metric_type: MetricTypes = MetricTypes.GAUGE,
        versioned: bool = True,
    ) -> None:
        """Emit one custom metric (declared in ``config/metrics.yaml``); never raises."""
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        dimensions = [Dimension("ModelName", self.model_name)]
        if versioned:
            dimensions.append(Dimension("ModelVersion", self.model_version))
        dimensions.append(Dimension("Level", "Model"))
        try:
            metrics.add_metric(
                name, value, unit, idx=None, dimensions=dimensions, metric_type=metric_type
            )
        except Exception as error:
            logger.warning("metric %s not emitted: %s", name, type(error).__name__)
