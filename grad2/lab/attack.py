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

from grad2.lab.data import load_fashion_mnist, thief_pool, to_tensor
from grad2.lab.train import CLONE_EPOCHS, set_threads, train_clone
from grad2.tools.progress import progress_bar


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
        return self.query_bodies([encode_png(image) for image in images], progress,
                                 expected_classes)

    def query_bodies(
        self, bodies: Sequence[bytes], progress: bool = True,
        expected_classes: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, np.ndarray, list[str], QueryStats]:
        """:meth:`query` with the request bodies given as they are (image files' bytes)."""
        started = time.perf_counter()
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
            outcomes.extend(progress_bar(
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


def describe_input(url: str, token: str | None, timeout: float = 10.0) -> dict[str, int]:
    """The served model's input size, from the handler's ``describe`` answer (``{channels,
    height, width}``); what any client of the API can read."""
    headers = {"describe": "True", "Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    response = requests.post(url, data=b"", headers=headers, timeout=timeout)
    response.raise_for_status()
    described = response.json().get("input", {})
    return {key: int(described[key]) for key in ("channels", "height", "width")}


def default_clone_arch(channels: int, height: int, width: int) -> str:
    """A clone architecture that takes ``[channels, height, width]`` inputs."""
    if channels == 1:
        return "small_cnn" if (height, width) == (28, 28) else "resnet18_gray"
    return "torchvision:resnet18"


def folder_attack(
    url: str, token: str | None, pool: Path, test: Path, out: Path, budget: int = 2000,
    epochs: int = CLONE_EPOCHS, seed: int = 0, concurrency: int = 8, timeout: float = 10.0,
    arch: str | None = None, hard_labels: bool = False, progress: bool = True,
) -> dict:
    """A black-box thief with its own images: sends up to ``budget`` files of ``pool`` (any
    folder of images, as they are) to the API, trains a clone on the answers, and scores
    it on ``test`` (a labelled folder, class sub-folders named as the API's classes).
    Writes ``attack.json``, ``attack.png`` (per-class clone accuracy) and ``clone.pt``
    into ``out``; returns the report."""
    from grad2.config import InputConfig
    from grad2.lab.train import padding_fill
    from grad2.models import save_checkpoint
    from grad2.serve import normalise
    from grad2.tools.images import ImageSet, image_files, open_images

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    files = image_files(Path(pool))
    if not files:
        raise ValueError(f"{pool} holds no image files")
    order = np.random.default_rng(seed).permutation(len(files))[:budget]
    chosen = [files[i] for i in sorted(order)]
    shape = describe_input(url, token, timeout)
    client = APIClient(url, token, timeout=timeout, concurrency=concurrency)
    answers, answered, class_names, stats = client.query_bodies(
        [path.read_bytes() for path in chosen], progress=progress)
    # The thief decodes its own files at the served size with public code, and picks its
    # own normalisation: its pool's per-channel mean and spread.
    raw = InputConfig.from_dict({**shape, "max_side": 65535})
    pool_set = ImageSet(Path(pool), raw, files=[chosen[i] for i in answered])
    pixels, _ = pool_set.load(progress=progress)
    skipped = {path for path, _ in pool_set.skipped}
    kept = [i for i, path in enumerate(pool_set.files) if str(path) not in skipped]
    answers = answers[kept] if len(kept) != len(answers) else answers
    unit = pixels.float() / 255.0
    spec = InputConfig.from_dict({
        **shape, "max_side": 65535, "mean": unit.mean(dim=(0, 2, 3)).tolist(),
        "std": unit.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()})
    arch = arch or default_clone_arch(spec.channels, spec.height, spec.width)
    clone = train_clone(normalise(unit, spec), answers, arch=arch, epochs=epochs, seed=seed,
                        hard_labels=hard_labels, progress=progress, fill=padding_fill(spec))
    test_set = open_images(Path(test), spec, class_names, labelled=True)
    correct = np.zeros(len(class_names))
    total = np.zeros(len(class_names))
    with torch.inference_mode():
        for x, labels, _ in test_set.batches(256, progress=progress, desc="test"):
            hits = (clone(x).argmax(1) == labels).numpy()
            np.add.at(correct, labels.numpy(), hits)
            np.add.at(total, labels.numpy(), 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(clone, out / "clone.pt", {"role": "clone", "url": url, "pool": str(pool),
                                              "input": {**shape, "mean": list(spec.mean),
                                                        "std": list(spec.std)}})
    report = {
        "url": url, "pool": str(pool), "test": str(test), "budget": len(chosen),
        "epochs": epochs, "seed": seed, "arch": arch, "hard_labels": hard_labels,
        "classes": class_names, "trained_on": len(answers),
        "clone_accuracy": float(correct.sum() / max(total.sum(), 1)),
        "per_class_accuracy": {name: (float(c / n) if n else None)
                               for name, c, n in zip(class_names, correct, total, strict=True)},
        "test_images": int(total.sum()), "skipped_files": len(pool_set.skipped),
        "mean_answer_entropy": float(
            -(answers * answers.clamp_min(1e-12).log()).sum(dim=1).mean()),
        **asdict(stats),
    }
    (out / "attack.json").write_text(json.dumps(report, indent=1))
    _plot_per_class(report, out / "attack.png")
    return report


def _plot_per_class(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["per_class_accuracy"])
    values = [100 * (report["per_class_accuracy"][n] or 0) for n in names]
    figure, axis = plt.subplots(figsize=(max(4, 0.5 * len(names) + 2), 3.5))
    axis.bar(range(len(names)), values, color="C3")
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    axis.set_ylabel("clone accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title(f"clone {report['arch']}: {100 * report['clone_accuracy']:.1f}% overall "
                   f"({report['trained_on']} answers)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def print_attack(report: dict) -> str:
    """The attack's outcome as a table, for people."""
    lines = [f"clone {report['arch']} trained on {report['trained_on']} answers "
             f"({report['answered']}/{report['sent']} queries answered): "
             f"test accuracy {100 * report['clone_accuracy']:.2f}% on "
             f"{report['test_images']} images", "class            accuracy"]
    for name, value in report["per_class_accuracy"].items():
        lines.append(f"{name[:16]:16s} {'   -' if value is None else f'{100 * value:6.2f}%'}")
    return "\n".join(lines)


def _attack_command(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    token = read_token(args.token_file) if args.token_file else None
    if args.test is not None or args.pool not in ("animal", "fashion_heldout"):
        if args.test is None or args.out is None:
            raise ValueError("a folder --pool needs --test DIR (labelled) and --out REPORT_DIR")
        report = folder_attack(
            args.url, token, Path(args.pool), args.test, args.out, args.budget, args.epochs,
            args.seed, args.concurrency, args.timeout, args.arch, args.hard_labels,
            progress=not args.no_progress)
        print(print_attack(report))
        print(f"report: {Path(args.out) / 'attack.json'}, {Path(args.out) / 'attack.png'}")
        return 0
    report = live_attack(
        args.url, token, args.pool, args.budget, args.epochs, args.seed, args.concurrency,
        args.timeout, progress=not args.no_progress,
        clone_out=None if args.out is None else Path(args.out) / "clone.pt",
    )
    if args.out is not None:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "attack.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attack", help="steal a served model through its inference API and score the clone"
    )
    parser.add_argument("--url", required=True,
                        help="http://HOST:PORT/predictions/NAME[/VERSION]")
    parser.add_argument("--token-file", type=Path, help="TorchServe's key_file.json")
    parser.add_argument("--pool", default="animal",
                        help="a folder of images to send (as files), or the lab pools "
                        "animal / fashion_heldout")
    parser.add_argument("--test", type=Path,
                        help="labelled folder (class sub-folders named as the API's classes) "
                        "to score the clone on; needed with a folder --pool")
    parser.add_argument("--arch", help="clone architecture (default: one that fits the "
                        "served input size)")
    parser.add_argument("--hard-labels", action="store_true",
                        help="train on the top-1 labels only (a labels-only thief)")
    parser.add_argument("--budget", type=int, default=2000, help="queries to send")
    parser.add_argument("--epochs", type=int, default=CLONE_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path,
                        help="report folder: attack.json, attack.png, clone.pt")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_attack_command)
