"""A live thief: query a served model through the standard inference API, train a clone.

``grad2 attack --url http://127.0.0.1:PORT/predictions/NAME[/VERSION] --token-file
key_file.json --pool animal --budget N`` sends ``N`` pool images as PNG with bounded
concurrency, per-request timeouts and retries, keeps the returned probability vectors,
trains a clone on them (soft labels) and reports its accuracy on the Fashion-MNIST test
split. It sees only what any API client sees.

Counting is honest: ``sent`` is the number of images sent (the budget), ``requests`` the
HTTP requests made for them (retries included: what the server may have seen), and
``errors`` says why the ``failed`` images got no answer. The first image goes alone, so a
wrong URL, token or class list stops the thief after one query, not after the budget.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from grad2.data import load_fashion_mnist, thief_pool, to_tensor
from grad2.train import CLONE_EPOCHS, set_threads, train_clone


def encode_png(image: np.ndarray) -> bytes:
    """A ``uint8 [H, W]`` (grayscale) or ``[H, W, 3]`` (RGB) image as PNG bytes."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim != 2 and not (image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected an image [H, W] or [H, W, 3], got {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def read_token(token_file: Path) -> str:
    """The inference key from TorchServe's ``key_file.json``."""
    try:
        keys = json.loads(Path(token_file).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{token_file} is not JSON: {error}") from None
    try:
        key = keys["inference"]["key"]
    except (KeyError, TypeError):
        raise ValueError(f"{token_file} has no inference key") from None
    if not isinstance(key, str) or not key:
        raise ValueError(f"{token_file} has no inference key")
    return key


@dataclass
class QueryStats:
    """What a batch of queries cost. ``sent``: images sent; ``answered``/``failed``: of
    those, with and without a probability vector; ``retries``: HTTP requests repeated after
    a failure; ``requests``: HTTP requests made in all (``sent + retries``); ``errors``: why
    the failed images failed (last reason per image, e.g. ``"HTTP 401"``)."""

    sent: int
    answered: int
    failed: int
    retries: int
    wall_time_s: float
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class QueryError(RuntimeError):
    """Queries that cannot feed a thief (nothing answered, or not the expected classes);
    ``stats`` says what was spent."""

    def __init__(self, message: str, stats: QueryStats) -> None:
        super().__init__(message)
        self.stats = stats


def _parse_answer(body: bytes) -> dict[str, float]:
    """A ``{class: probability}`` answer, or ``ValueError`` saying what it is instead."""
    answer = json.loads(body)
    if isinstance(answer, dict) and set(answer) == {"label"}:
        raise ValueError("label-only answer")
    if not isinstance(answer, dict) or not answer:
        raise ValueError("not a {class: probability} object")
    for value in answer.values():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise ValueError("not a {class: probability} object")
    return {name: float(value) for name, value in answer.items()}


@dataclass
class _Outcome:
    answer: dict[str, float] | None
    attempts: int
    error: str | None = None


class APIClient:
    """Posts images to one prediction URL; answers come back as ``{class: prob}``.

    Each image is one ``POST`` with the PNG as the body. Connection errors, timeouts, 429
    and 5xx are retried (``retries`` times, with a short exponential back-off); any other
    4xx, a label-only answer or a body that is not a probability object is not.
    """

    def __init__(
        self, url: str, token: str | None, timeout: float = 10.0, retries: int = 3,
        concurrency: int = 8, backoff: float = 0.1,
    ) -> None:
        if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError(
                "need concurrency >= 1, retries >= 0, timeout > 0 and backoff >= 0"
            )
        self.url, self.timeout, self.retries, self.concurrency = url, timeout, retries, concurrency
        self.backoff = backoff
        self.headers = {"Content-Type": "application/octet-stream"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=concurrency)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def _post(self, body: bytes) -> _Outcome:
        """One image's outcome after at most ``retries + 1`` HTTP requests."""
        error = "no request made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 2.0))
            try:
                response = self._session.post(
                    self.url, data=body, headers=self.headers, timeout=self.timeout
                )
            except requests.RequestException as failure:
                error = type(failure).__name__
                continue
            if response.status_code == 200:
                try:
                    return _Outcome(_parse_answer(response.content), attempt + 1)
                except ValueError as failure:
                    if isinstance(failure, json.JSONDecodeError):
                        error = "HTTP 200, not JSON"
                        continue  # a truncated body may come whole next time
                    return _Outcome(None, attempt + 1, f"HTTP 200, {failure}")
            error = f"HTTP {response.status_code}"
            if 400 <= response.status_code < 500 and response.status_code != 429:
                return _Outcome(None, attempt + 1, error)  # refused; retrying won't help
        return _Outcome(None, self.retries + 1, error)

    def query(
        self, images: np.ndarray, progress: bool = True,
        expected_classes: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, np.ndarray, list[str], QueryStats]:
        """Send ``images`` (``uint8 [N, H, W]``); returns answers ``[M, K]`` for the ``M``
        answered ones, their indices, the class names (in the server's order) and stats.

        The first image is sent alone; if it gets no answer, or ``expected_classes`` is
        given and its answer lists other classes, :class:`QueryError` is raised before the
        others are sent. Also raised if no image is answered or the answers disagree on
        the classes or their order (``output: topk`` serving)."""
        started = time.perf_counter()
        bodies = [encode_png(image) for image in images]
        outcomes: list[_Outcome] = []

        def stats() -> QueryStats:
            failed = [o for o in outcomes if o.answer is None]
            attempts = sum(o.attempts for o in outcomes)
            return QueryStats(
                sent=len(outcomes), answered=len(outcomes) - len(failed), failed=len(failed),
                retries=attempts - len(outcomes), wall_time_s=time.perf_counter() - started,
                requests=attempts, errors=dict(Counter(o.error for o in failed)),
            )

        if not bodies:
            raise QueryError("no images to send", stats())
        outcomes.append(self._post(bodies[0]))
        first = outcomes[0]
        if first.answer is None:
            raise QueryError(f"the first query to {self.url} failed ({first.error}); "
                             "sent no more", stats())
        class_names = list(first.answer)
        if expected_classes is not None and class_names != list(expected_classes):
            raise QueryError(f"{self.url} answers with classes {class_names}, expected "
                             f"{list(expected_classes)}; sent no more", stats())
        with ThreadPoolExecutor(self.concurrency) as pool:
            outcomes.extend(tqdm(
                pool.map(self._post, bodies[1:]), total=len(bodies), initial=1,
                desc="queries", unit="req", disable=not progress,
            ))
        answered = [i for i, outcome in enumerate(outcomes) if outcome.answer is not None]
        rows = []
        for index in answered:
            answer = outcomes[index].answer
            assert answer is not None
            if list(answer) != class_names:
                raise QueryError(
                    f"answers from {self.url} do not list every class in one order (query "
                    f"{index}: {list(answer)}); serve with output: probabilities", stats()
                )
            rows.append([answer[name] for name in class_names])
        return (torch.tensor(rows, dtype=torch.float32), np.array(answered, dtype=np.int64),
                class_names, stats())


def live_attack(
    url: str, token: str | None, pool: str = "animal", budget: int = 2000,
    epochs: int = CLONE_EPOCHS, seed: int = 0, concurrency: int = 8, timeout: float = 10.0,
    progress: bool = True, clone_out: Path | None = None,
) -> dict:
    """Steal through the API with ``budget`` queries; the clone's test accuracy and more.

    The served classes must be Fashion-MNIST's, in its label order (checked on the first
    answer, before the rest of the budget is spent)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    images = thief_pool(pool, size=budget, seed=seed).images
    test = load_fashion_mnist("test")
    client = APIClient(url, token, timeout=timeout, concurrency=concurrency)
    answers, answered, _, stats = client.query(
        images, progress=progress, expected_classes=test.class_names
    )
    clone = train_clone(
        to_tensor(images[answered]), answers, epochs=epochs, seed=seed, progress=progress
    )
    with torch.inference_mode():
        predicted = clone(to_tensor(test.images)).argmax(dim=1).numpy()
    if clone_out is not None:
        from grad2.models import save_checkpoint

        save_checkpoint(clone, Path(clone_out), {"role": "clone", "url": url, "pool": pool})
    return {
        "url": url,
        "pool": pool,
        "budget": budget,
        "epochs": epochs,
        "seed": seed,
        "clone_accuracy": float((predicted == test.labels).mean()),
        "mean_answer_entropy": float(
            -(answers * answers.clamp_min(1e-12).log()).sum(dim=1).mean()
        ),
        **asdict(stats),
    }


def _attack_command(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    token = read_token(args.token_file) if args.token_file else None
    report = live_attack(
        args.url, token, args.pool, args.budget, args.epochs, args.seed, args.concurrency,
        args.timeout, progress=not args.no_progress, clone_out=args.out,
    )
    print(json.dumps(report, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attack", help="steal a served model through its inference API and score the clone"
    )
    parser.add_argument("--url", required=True,
                        help="http://HOST:PORT/predictions/NAME[/VERSION]")
    parser.add_argument("--token-file", type=Path, help="TorchServe's key_file.json")
    parser.add_argument("--pool", default="animal", choices=("animal", "fashion_heldout"))
    parser.add_argument("--budget", type=int, default=2000, help="queries to send")
    parser.add_argument("--epochs", type=int, default=CLONE_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, help="save the clone checkpoint here")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_attack_command)
