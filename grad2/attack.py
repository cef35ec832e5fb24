"""A live thief: query a served model through the standard inference API, train a clone.

``grad2 attack --url http://127.0.0.1:PORT/predictions/NAME[/VERSION] --token-file
key_file.json --pool animal --budget N`` sends ``N`` pool images as PNG with bounded
concurrency, per-request timeouts and retries, keeps the returned probability vectors,
trains a clone on them (soft labels) and reports its accuracy on the Fashion-MNIST test
split. It sees only what any API client sees.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image
from tqdm import tqdm

from grad2.data import load_fashion_mnist, thief_pool, to_tensor
from grad2.train import CLONE_EPOCHS, set_threads, train_clone


def encode_png(image: np.ndarray) -> bytes:
    """A ``uint8 [H, W]`` image as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def read_token(token_file: Path) -> str:
    """The inference key from TorchServe's ``key_file.json``."""
    keys = json.loads(Path(token_file).read_text())
    try:
        return keys["inference"]["key"]
    except (KeyError, TypeError):
        raise ValueError(f"{token_file} has no inference key") from None


@dataclass
class QueryStats:
    sent: int
    answered: int
    failed: int
    retries: int
    wall_time_s: float


class APIClient:
    """Posts images to one prediction URL; answers come back as ``{class: prob}``."""

    def __init__(
        self, url: str, token: str | None, timeout: float = 10.0, retries: int = 3,
        concurrency: int = 8,
    ) -> None:
        if concurrency < 1 or retries < 0 or timeout <= 0:
            raise ValueError("need concurrency >= 1, retries >= 0 and timeout > 0")
        self.url, self.timeout, self.retries, self.concurrency = url, timeout, retries, concurrency
        self.headers = {"Content-Type": "application/octet-stream"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self._session = requests.Session()

    def _post(self, body: bytes) -> tuple[dict[str, float] | None, int]:
        """One answer (or ``None`` after the last retry) and the retries spent."""
        for attempt in range(self.retries + 1):
            try:
                response = self._session.post(
                    self.url, data=body, headers=self.headers, timeout=self.timeout
                )
                if response.status_code == 200:
                    return response.json(), attempt
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    return None, attempt  # the request itself is refused; retrying won't help
            except (requests.RequestException, ValueError):
                pass
            time.sleep(min(0.1 * 2**attempt, 2.0))
        return None, self.retries

    def query(
        self, images: np.ndarray, progress: bool = True
    ) -> tuple[torch.Tensor, np.ndarray, list[str], QueryStats]:
        """Send ``images`` (``uint8 [N, H, W]``); returns answers ``[M, K]`` for the ``M``
        answered ones, their indices, the class names (in the server's order) and stats."""
        started = time.perf_counter()
        bodies = [encode_png(image) for image in images]
        with ThreadPoolExecutor(self.concurrency) as pool:
            outcomes = list(
                tqdm(pool.map(self._post, bodies), total=len(bodies), desc="queries",
                     unit="req", disable=not progress)
            )
        answered = [i for i, (answer, _) in enumerate(outcomes) if answer is not None]
        if not answered:
            raise RuntimeError(f"no query to {self.url} was answered")
        class_names = list(outcomes[answered[0]][0])
        rows = []
        for index in answered:
            answer = outcomes[index][0]
            if list(answer) != class_names:
                raise RuntimeError(
                    "answers do not list every class in one order; serve with output: "
                    "probabilities"
                )
            rows.append([float(answer[name]) for name in class_names])
        stats = QueryStats(
            sent=len(bodies), answered=len(answered), failed=len(bodies) - len(answered),
            retries=sum(r for _, r in outcomes), wall_time_s=time.perf_counter() - started,
        )
        return torch.tensor(rows), np.array(answered), class_names, stats


def live_attack(
    url: str, token: str | None, pool: str = "animal", budget: int = 2000,
    epochs: int = CLONE_EPOCHS, seed: int = 0, concurrency: int = 8, timeout: float = 10.0,
    progress: bool = True, clone_out: Path | None = None,
) -> dict:
    """Steal through the API with ``budget`` queries; the clone's test accuracy and more."""
    images = thief_pool(pool, size=budget, seed=seed).images
    client = APIClient(url, token, timeout=timeout, concurrency=concurrency)
    answers, answered, class_names, stats = client.query(images, progress=progress)
    clone = train_clone(
        to_tensor(images[answered]), answers, epochs=epochs, seed=seed, progress=progress
    )
    test = load_fashion_mnist("test")
    if class_names != test.class_names:
        raise RuntimeError(f"served classes {class_names} are not Fashion-MNIST's")
    with torch.inference_mode():
        predicted = clone(to_tensor(test.images)).argmax(dim=1).numpy()
    if clone_out is not None:
        from grad2.models import save_checkpoint

        save_checkpoint(clone, Path(clone_out), {"role": "clone", "url": url, "pool": pool})
    return {
        "url": url,
        "pool": pool,
        "budget": budget,
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
