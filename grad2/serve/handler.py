"""The TorchServe handler of GRAD²-defended classifiers.

Archives do not carry this module: their entry file (``templates/grad2_handler.py``)
subclasses :class:`Grad2Handler` from the installed ``grad2-serve``.

Per batch: decode each request (a bad one gets its own 4xx, the rest go on), run the
victim once, run the configured defense once on the whole batch, answer each request with
its defended probabilities. The clean probabilities never leave this file: not in an
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
import traceback
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from grad2.batching import describe_sizes
from grad2.config import InputConfig
from grad2.serve import codec, loader

logger = logging.getLogger(__name__)

EXPLAIN_REFUSED = "explanations are disabled: this model only gives defended answers"
DEFENSE_FAILED = "the defense could not run on this batch; no answer is given (fail closed)"
MODEL_FAILED = "the model could not run on this batch; no answer is given"


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
            self._plan_batches(int(context.system_properties.get("batch_size") or 1))
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
            pixels, pending = self.preprocess(data)
            if pending:
                x = codec.normalise(pixels, self.served.input_config)
                try:
                    probs = self.inference(x)
                except Exception as error:
                    self._log_failure("victim", error, len(x))
                    for index, _ in pending:
                        self._refuse(index, 503, MODEL_FAILED)
                else:
                    self._deliver(pending, self.postprocess(x, probs))
        except Exception as error:  # never let TorchServe log a message that may quote y
            self._log_failure("handler", error, len(data))
            for index, response in enumerate(self._responses):
                if response is None:
                    self._refuse(index, 503, MODEL_FAILED)
        for index in range(len(data)):
            self._end_grpc_stream(index)
        self._metric("HandlerTime", (time.perf_counter() - started) * 1000, "ms", versioned=False)
        return self._responses

    def preprocess(
        self, data: list[dict[str, Any]]
    ) -> tuple[torch.Tensor | None, list[tuple[int, codec.DecodedRequest]]]:
        """Decode every request. Describe/explain requests and bad requests are answered
        here; returns pixels ``[N, C, H, W]`` in ``[0, 1]`` of the rest and, per request
        still pending, its index in the batch and decoded form."""
        pending: list[tuple[int, codec.DecodedRequest]] = []
        spec = self.served.input_config
        for index, row in enumerate(data):
            headers = self._headers(index)
            if str(_header(headers, "describe")).lower() == "true":
                self._responses[index] = self.describe_handle()
                continue
            if str(_header(headers, "explain")).lower() == "true":
                self._refuse(index, 403, EXPLAIN_REFUSED)
                continue
            try:
                field, value = codec.select_payload(row)
                request = codec.decode_request(value, self._content_type(headers, field), spec)
            except codec.RequestError as error:
                self._refuse(index, error.status, error.message)
                self._metric("RejectedRequests", 1, "count", MetricTypes.COUNTER)
                continue
            except Exception as error:  # a decoder bug must not take the batch down
                logger.warning("request %d could not be decoded: %s", index, type(error).__name__)
                self._refuse(index, 400, "request could not be decoded")
                self._metric("RejectedRequests", 1, "count", MetricTypes.COUNTER)
                continue
            pending.append((index, request))
        if not pending:
            return None, pending
        return torch.cat([request.pixels for _, request in pending]), pending

    def inference(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Clean probabilities ``[N, K]`` = ``softmax(victim(x))`` (never answered as is).
        Runs under ``no_grad``, not ``inference_mode``, so the defense may differentiate
        through ``x``; in the planned batch sizes unless ``handler.batch_invariant`` is
        false, and a lone query with only the layers that differ at batch 1 paired."""
        lone = self.served.victim_lone_plan if self.model is self.served.victim else None
        return loader.clean_probabilities(self.model, x, self.served.victim_sizes, lone)

    def postprocess(self, x: torch.Tensor, probs: torch.Tensor) -> list[dict[str, Any]] | None:
        """Defend the whole batch once and encode one answer per image; ``None`` when the
        defense failed and ``on_failure`` is ``reject``."""
        config = self.served.defense_config
        started = time.perf_counter()
        try:
            with torch.enable_grad():
                defended = self.served.defense(x, probs)
            codec.check_defended(defended, probs)
        except Exception as error:
            self._log_failure(f"defense {config.method}", error, len(x))
            self._metric("DefenseFailures", len(x), "count", MetricTypes.COUNTER)
            if config.on_failure == "top1":
                return codec.answer_labels(probs.argmax(dim=1), self.served.class_names)
            return None
        defended = defended.detach()
        self._metric("DefenseTime", (time.perf_counter() - started) * 1000, "ms")
        self._metric("DefenseL1", float((defended - probs).abs().sum(dim=1).mean()), "L1")
        flips = int((defended.argmax(dim=1) != probs.argmax(dim=1)).sum())
        self._metric("DefenseLabelFlips", flips, "count", MetricTypes.COUNTER)
        self._metric("DefendedAnswers", len(x), "count", MetricTypes.COUNTER)
        return codec.answer_probabilities(
            defended, self.served.class_names, config.output, config.topk
        )

    # ------------------------------------------------------------------ routes without answers

    def describe_handle(self) -> dict[str, Any]:
        """A static description: what to send and what comes back, never an output."""
        spec = self.served.input_config
        return {
            "model": self.model_name,
            "version": self.model_version,
            "description": "image classifier behind a model-stealing defense; answers are "
            "defended probabilities",
            "input": {
                "channels": spec.channels,
                "height": spec.height,
                "width": spec.width,
                "formats": list(codec.IMAGE_FORMATS),
            },
            "classes": list(self.served.class_names),
        }

    def explain_handle(self, data_preprocess: Any, raw_data: Any) -> dict[str, Any]:
        """Explanations would expose the undefended model: refused."""
        return codec.error_body(403, EXPLAIN_REFUSED)

    def get_insights(self, tensor_data: Any, _: Any, target: Any = 0) -> dict[str, Any]:
        """Explanations would expose the undefended model: refused."""
        return codec.error_body(403, EXPLAIN_REFUSED)

    # ------------------------------------------------------------------ helpers

    def _plan_batches(self, max_batch: int) -> None:
        """Probe which batch sizes keep every answer independent of its batch-mates."""
        started = time.perf_counter()
        planned = self.served.plan_batches(max_batch)
        if planned:
            victim_lone = planned["victim_lone"]
            logger.info(
                "batch sizes up to %d with batch-independent rows (probed in %.1f s): "
                "victim %s; defense %s; a lone query: victim %s, defense %s",
                max_batch,
                time.perf_counter() - started,
                describe_sizes(planned["victim"]),
                "needs none" if planned["defense"] is None else describe_sizes(planned["defense"]),
                "as a pair" if victim_lone is None else f"{len(victim_lone)} layer(s) paired",
                "alone" if planned["defense_lone"] else "as a pair",
            )

    def _deliver(
        self,
        pending: list[tuple[int, codec.DecodedRequest]],
        answers: list[dict[str, Any]] | None,
    ) -> None:
        offset = 0
        for index, request in pending:
            if answers is None:
                self._refuse(index, 503, DEFENSE_FAILED)
                continue
            own = answers[offset : offset + request.count]
            offset += request.count
            self._responses[index] = codec.wrap_answers(
                own, request, self.model_name, self.model_version
            )
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

    def _log_failure(self, stage: str, error: BaseException, batch_size: int) -> None:
        """Log where it failed, without the message (it could quote tensor values)."""
        frames = "".join(traceback.format_tb(error.__traceback__))
        logger.error(
            "%s failed on a batch of %d (%s); answers withheld\n%s",
            stage,
            batch_size,
            type(error).__name__,
            frames,
        )

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
