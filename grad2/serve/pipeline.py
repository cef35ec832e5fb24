"""One batch of requests through decode → victim → defense → encode, whatever the runtime.

The TorchServe handler (:mod:`grad2.serve.handler`) and the KServe predictor
(:mod:`grad2.serve.kserve`) both call :class:`Pipeline`, so a model gives the same bits on
either: they only differ in how requests arrive, how a status is set and where metrics go.

Fail-closed rules kept here: a request that cannot be decoded gets its own 4xx and the rest
of the batch goes on; if the victim fails every pending request gets 503; if the defense
fails the batch gets 503 without probabilities (``on_failure: reject``) or the top-1 label
only (``on_failure: top1``). No message, log line or metric quotes the clean probabilities.
No ``ts`` or ``kserve`` import: the runtimes wire this module to their own APIs.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from grad2.batching import describe_sizes
from grad2.serve import codec, loader

logger = logging.getLogger(__name__)

EXPLAIN_REFUSED = "explanations are disabled: this model only gives defended answers"
DEFENSE_FAILED = "the defense could not run on this batch; no answer is given (fail closed)"
MODEL_FAILED = "the model could not run on this batch; no answer is given"
UNDECODABLE = "request could not be decoded"

#: Least seconds between two hand-backs of freed memory to the system after a batch
#: (:func:`grad2.serve.loader.release_free_memory`, a few ms on an ImageNet-sized heap).
RELEASE_INTERVAL_S = 1.0


class Emit(Protocol):
    """Where a runtime sends one metric value (declared in ``templates/metrics.yaml``)."""

    def __call__(self, name: str, value: float, unit: str, counter: bool = False,
                 versioned: bool = True) -> None: ...


def no_metrics(name: str, value: float, unit: str, counter: bool = False,
               versioned: bool = True) -> None:
    """An :class:`Emit` that drops every value."""


@dataclass(frozen=True)
class Reply:
    """One request's answer: ``status`` 200 with the protocol-shaped ``body``, or a 4xx/5xx
    with :func:`grad2.serve.codec.error_body` as ``body``."""

    status: int
    body: Any

    @classmethod
    def refusal(cls, status: int, message: str) -> Reply:
        return cls(status, codec.error_body(status, message))


class Pipeline:
    """The runtime-independent part of serving a :class:`~grad2.serve.loader.ServedModel`
    named ``model_name`` at ``model_version``; ``emit`` receives the metrics."""

    def __init__(self, served: loader.ServedModel, model_name: str, model_version: str,
                 emit: Emit = no_metrics) -> None:
        self.served = served
        self.model_name = model_name
        self.model_version = model_version
        self.emit = emit
        self._released = time.monotonic()

    def decode(self, row: Mapping[str, Any],
               content_type: str | Callable[[str], str | None] | None = None
               ) -> codec.DecodedRequest | Reply:
        """One request → its pixels ``[N, C, H, W]`` (a :class:`~grad2.serve.codec.
        DecodedRequest`), or the 4xx :class:`Reply` refusing it. ``row`` maps field names to
        payloads as TorchServe passes them (:func:`~grad2.serve.codec.select_payload` picks
        one); ``content_type`` is the payload's declared type, or a function of its field."""
        try:
            field, value = codec.select_payload(row)
            declared = content_type(field) if callable(content_type) else content_type
            return codec.decode_request(value, declared, self.served.input_config)
        except codec.RequestError as error:
            reply = Reply.refusal(error.status, error.message)
        except Exception as error:  # a decoder bug must not take the batch down
            logger.warning("a request could not be decoded: %s", type(error).__name__)
            reply = Reply.refusal(400, UNDECODABLE)
        self.emit("RejectedRequests", 1, "count", counter=True)
        return reply

    def probabilities(self, x: torch.Tensor, victim: Callable[..., Any] | None = None
                      ) -> torch.Tensor:
        """Clean probabilities ``[N, K]`` of ``victim`` (default: the served one) on the
        normalised ``x`` ``[N, C, H, W]``, in the planned batch sizes (never answered)."""
        served = self.served
        victim = served.victim if victim is None else victim
        lone = served.victim_lone_plan if victim is served.victim else None
        return loader.clean_probabilities(victim, x, served.victim_sizes, lone)

    def defend(self, x: torch.Tensor, probs: torch.Tensor) -> list[dict[str, Any]] | None:
        """Defend the whole batch once and encode one answer per image; ``None`` when the
        defense failed and ``on_failure`` is ``reject``."""
        config = self.served.defense_config
        started = time.perf_counter()
        try:
            with torch.enable_grad():
                defended = self.served.defense(x, probs)
            codec.check_defended(defended, probs,
                                 self.served.defense.sum_tolerance(probs.shape[1]))
        except Exception as error:
            log_failure(f"defense {config.method}", error, len(x))
            self.emit("DefenseFailures", len(x), "count", counter=True)
            if config.on_failure == "top1":
                return codec.answer_labels(probs.argmax(dim=1), self.served.class_names)
            return None
        defended = defended.detach()
        self.emit("DefenseTime", (time.perf_counter() - started) * 1000, "ms")
        self.emit("DefenseL1", float((defended - probs).abs().sum(dim=1).mean()), "L1")
        flips = int((defended.argmax(dim=1) != probs.argmax(dim=1)).sum())
        self.emit("DefenseLabelFlips", flips, "count", counter=True)
        self.emit("DefendedAnswers", len(x), "count", counter=True)
        return codec.answer_probabilities(
            defended, self.served.class_names, config.output, config.topk
        )

    def handle(
        self,
        rows: Sequence[tuple[Mapping[str, Any], str | Callable[[str], str | None] | None]],
        infer: Callable[[torch.Tensor], torch.Tensor] | None = None,
        defend: Callable[[torch.Tensor, torch.Tensor], list[dict[str, Any]] | None]
        | None = None,
    ) -> list[Reply]:
        """One :class:`Reply` per ``(row, content_type)`` (see :meth:`decode`): each is
        decoded (a bad one refused alone), the rest answered as one batch (:meth:`answer`).
        An unexpected error withholds the batch's answers (503), never a refusal's 4xx."""
        replies: list[Reply | None] = []
        pending: list[tuple[int, codec.DecodedRequest]] = []
        for index, (row, content_type) in enumerate(rows):
            decoded = self.decode(row, content_type)
            replies.append(decoded if isinstance(decoded, Reply) else None)
            if not isinstance(decoded, Reply):
                pending.append((index, decoded))
        try:
            answered = self.answer([request for _, request in pending], infer, defend)
        except Exception as error:  # never let a runtime log a message that may quote y
            log_failure("handler", error, len(rows))
            answered = [Reply.refusal(503, MODEL_FAILED)] * len(pending)
        for (index, _), reply in zip(pending, answered):
            replies[index] = reply
        self.release_memory()
        return replies

    def release_memory(self) -> bool:
        """Hand the memory the batches freed back to the system, at most once every
        :data:`RELEASE_INTERVAL_S`; returns whether it ran. glibc keeps what a batch's
        activations and tangents freed (at 224 px and batch 16, about the batch's working
        set); a worker that gives it back stays at its steady size between batches
        (docs/performance.md, "The working set at c = 16")."""
        now = time.monotonic()
        if now - self._released < RELEASE_INTERVAL_S:
            return False
        self._released = now
        return loader.release_free_memory()

    def answer(
        self,
        requests: Sequence[codec.DecodedRequest],
        infer: Callable[[torch.Tensor], torch.Tensor] | None = None,
        defend: Callable[[torch.Tensor, torch.Tensor], list[dict[str, Any]] | None]
        | None = None,
    ) -> list[Reply]:
        """One :class:`Reply` per decoded request: their images run through the victim
        (``infer``, default :meth:`probabilities`) and the defense (``defend``, default
        :meth:`defend`) as one batch, each answer shaped for its request's protocol."""
        if not requests:
            return []
        infer = infer or self.probabilities
        defend = defend or self.defend
        pixels = torch.cat([request.pixels for request in requests])
        x = codec.normalise(pixels, self.served.input_config)
        try:
            probs = infer(x)
        except Exception as error:
            log_failure("victim", error, len(x))
            return [Reply.refusal(503, MODEL_FAILED)] * len(requests)
        answers = defend(x, probs)
        if answers is None:
            return [Reply.refusal(503, DEFENSE_FAILED)] * len(requests)
        replies, offset = [], 0
        for request in requests:
            own = answers[offset : offset + request.count]
            offset += request.count
            body = codec.wrap_answers(own, request, self.model_name, self.model_version)
            replies.append(Reply(200, body))
        return replies

    def plan(self, max_batch: int) -> None:
        """Probe which batch sizes up to ``max_batch`` keep every answer independent of
        its batch-mates (:meth:`~grad2.serve.loader.ServedModel.plan_batches`) and log
        them. Every runtime plans at load with its largest batch, so answers agree."""
        started = time.perf_counter()
        planned = self.served.plan_batches(max_batch)
        if not planned:
            return
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

    def describe(self) -> dict[str, Any]:
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


def log_failure(stage: str, error: BaseException, batch_size: int) -> None:
    """Log where it failed, without the message (it could quote tensor values)."""
    frames = "".join(traceback.format_tb(error.__traceback__))
    logger.error(
        "%s failed on a batch of %d (%s); answers withheld\n%s",
        stage,
        batch_size,
        type(error).__name__,
        frames,
    )
