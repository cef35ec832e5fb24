"""Soak a real TorchServe with defended models: many concurrent requests, a share of them
hostile, every answer checked.

Each request is one of a fixed set of templates: a distinct good image (its expected
answer is the one the server gave it alone, before the soak) or a hostile body with its
expected 4xx. Checked for every response: the status is the template's; a 200 is
byte-identical to that image's answer alone (nothing mixed up or lost under batching),
lies on the simplex, within epsilon (L1) of the epsilon-0 twin's clean answer and is not
that answer. Memory: RSS of the model's worker process(es) after warm-up and after each
slice of the soak.

Full size (prints the figures reported in docs/security.md)::

    .venv/bin/python scripts/soak.py --requests 20000 --concurrency 32

It builds two tiny random-init models (``fashion`` GRAD² epsilon 0.5, batchSize 8,
maxBatchDelay 5 ms, and the epsilon-0 twin ``fashion_clean``) like the integration tests,
starts TorchServe on free loopback ports in a temporary work dir and stops it at the end.
``integration_tests/test_reliability_load.py`` runs :func:`soak` at a small size against
the test session's server.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import requests

# The integration tests' image helpers (this script also runs alone).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration_tests"))
from ts_client import png, png_bomb

OCTET = {"Content-Type": "application/octet-stream"}
JSON = {"Content-Type": "application/json"}


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Template:
    """One kind of request: its body, headers and the status it must get."""

    name: str
    body: bytes
    headers: dict[str, str]
    status: int


def hostile_templates() -> list[Template]:
    """Bad requests mixed into the soak, each with the 4xx it must get."""
    good = png(0)
    return [
        Template("garbage", b"\x00\x01garbage" * 20, OCTET, 400),
        Template("truncated PNG", good[:60], OCTET, 400),
        Template("bomb header", png_bomb(60_000, 60_000), OCTET, 413),
        Template("bad JSON", b'{"image": ', JSON, 400),
        Template("NaN tensor", b'{"tensor": [[NaN]]}', JSON, 400),
        Template("bad base64", json.dumps({"image": "%%%"}).encode(), JSON, 400),
        Template("text body", good, {"Content-Type": "text/plain"}, 415),
        Template("empty", b"", OCTET, 400),
    ]


@dataclass(frozen=True)
class Workload:
    """Good images first, then the hostile templates; request ``n`` is hostile when
    ``n % hostile_every == hostile_every - 1`` (hostile templates in turn), else image
    ``n % images``."""

    templates: list[Template]
    images: int
    hostile_every: int

    def pick(self, number: int) -> int:
        hostile = len(self.templates) - self.images
        if hostile and number % self.hostile_every == self.hostile_every - 1:
            return self.images + (number // self.hostile_every) % hostile
        return number % self.images


def workload(images: int, hostile_every: int = 20) -> Workload:
    """``images`` distinct good images; one request in ``hostile_every`` hostile."""
    good = [Template(f"image {i}", png(1000 + i), OCTET, 200) for i in range(images)]
    return Workload(good + hostile_templates(), images, hostile_every)


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    template: int
    status: int  # 0: no HTTP response (timeout, connection error)
    text: str
    seconds: float
    error: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def statuses(self) -> Counter[int]:
        return Counter(outcome.status for outcome in self.outcomes)

    def latency_ms(self, quantile: float) -> float:
        return 1000 * float(np.quantile([o.seconds for o in self.outcomes], quantile))

    @property
    def throughput(self) -> float:
        return len(self.outcomes) / self.seconds if self.seconds else 0.0


def soak(url: str, token: str, load: Workload, total: int, concurrency: int,
         timeout: float = 60.0, start: int = 0) -> Report:
    """Send requests ``start .. start + total - 1`` of ``load`` with ``concurrency``
    client threads, each with its own keep-alive session."""
    local = threading.local()

    def one(index: int) -> Outcome:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        which = load.pick(start + index)
        template = load.templates[which]
        headers = {**template.headers, "Authorization": f"Bearer {token}"}
        began = time.perf_counter()
        try:
            response = session.post(url, data=template.body, headers=headers, timeout=timeout)
        except requests.RequestException as error:
            return Outcome(which, 0, "", time.perf_counter() - began, type(error).__name__)
        return Outcome(which, response.status_code, response.text, time.perf_counter() - began)

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(one, range(total)))
    return Report(outcomes, time.perf_counter() - began)


def answers_alone(url: str, token: str, templates: Sequence[Template],
                  timeout: float = 60.0) -> dict[int, str]:
    """Each good template's answer text, asked one at a time."""
    answers = {}
    for index, template in enumerate(templates):
        if template.status == 200:
            response = requests.post(url, data=template.body, timeout=timeout, headers={
                **template.headers, "Authorization": f"Bearer {token}"})
            response.raise_for_status()
            answers[index] = response.text
    return answers


def as_vector(text: str, class_names: Sequence[str]) -> np.ndarray:
    answer = json.loads(text)
    if list(answer) != list(class_names):
        raise ValueError(f"answer keys {list(answer)[:3]}... are not the class names")
    return np.array([answer[name] for name in class_names], dtype=np.float64)


def violations(report: Report, templates: Sequence[Template], expected: dict[int, str],
               clean: dict[int, np.ndarray], epsilon: float,
               class_names: Sequence[str]) -> list[str]:
    """Every way a response breaks the soak's rules (empty when all is well)."""
    problems = []
    for number, outcome in enumerate(report.outcomes):
        template = templates[outcome.template]
        where = f"request {number} ({template.name})"
        if outcome.status != template.status:
            problems.append(f"{where}: status {outcome.status} {outcome.error}, expected "
                            f"{template.status}: {outcome.text[:120]}")
            continue
        if outcome.status != 200:
            continue
        if outcome.text != expected[outcome.template]:
            problems.append(f"{where}: answer differs from the image's answer alone")
        answer = as_vector(outcome.text, class_names)
        l1 = float(np.abs(answer - clean[outcome.template]).sum())
        if not (answer.min() >= 0 and abs(answer.sum() - 1) < 1e-5):
            problems.append(f"{where}: answer is off the simplex")
        if not 1e-6 < l1 <= epsilon + 1e-5:
            problems.append(f"{where}: L1 {l1:.6f} from the clean answer, budget {epsilon}")
    return problems


# --------------------------------------------------------------------------- memory


def worker_processes(management_url: str, token: str, model: str,
                     version: str = "") -> list[psutil.Process]:
    """The Python worker processes of ``model`` (``/models/NAME[/VERSION]`` lists pids)."""
    path = f"{management_url}/models/{model}" + (f"/{version}" if version else "")
    response = requests.get(path, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    response.raise_for_status()
    return [psutil.Process(int(worker["pid"])) for entry in response.json()
            for worker in entry.get("workers", []) if worker.get("pid")]


def rss_mb(processes: Sequence[psutil.Process]) -> float:
    return sum(process.memory_info().rss for process in processes) / 2**20


# --------------------------------------------------------------------------- full soak


def build_models(folder: Path) -> Path:
    """A model store with ``fashion`` (GRAD² epsilon 0.5) and ``fashion_clean`` (epsilon
    0), sharing random-init small_cnn victim and surrogate, as the integration tests."""
    import torch
    import yaml

    from grad2.models import build_model, save_checkpoint
    from grad2.serve import build_archive

    torch.manual_seed(0)
    save_checkpoint(build_model("small_cnn"), folder / "victim.pt")
    torch.manual_seed(1)
    save_checkpoint(build_model("small_cnn"), folder / "surrogate.pt")
    store = folder / "store"
    for name, epsilon in (("fashion", 0.5), ("fashion_clean", 0.0)):
        config = folder / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 5,
            "responseTimeout": 60,
            "defense": {"method": "grad2", "epsilon": epsilon, "target": "all_ones",
                        "surrogate": "surrogate.pt"},
            "input": {"channels": 1, "height": 28, "width": 28, "mean": [0.286],
                      "std": [0.353], "max_side": 1024, "threads": 1},
        }))
        build_archive(name, "1.0", folder / "victim.pt", config, store,
                      surrogate=folder / "surrogate.pt")
    return store


def main(argv: Sequence[str] | None = None,
         log: Callable[[str], None] = lambda line: print(line, flush=True)) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--images", type=int, default=64, help="distinct good images")
    parser.add_argument("--warmup", type=int, default=1000, help="requests before memory "
                        "is first measured")
    parser.add_argument("--slices", type=int, default=10, help="memory is measured after "
                        "each slice")
    args = parser.parse_args(argv)

    from grad2.serve import Ports, start_server, stop_server

    epsilon, names = 0.5, [str(i) for i in range(10)]
    with tempfile.TemporaryDirectory(prefix="grad2-soak-") as work:
        store = build_models(Path(work))
        server = start_server(store, ["fashion=fashion.mar", "fashion_clean=fashion_clean.mar"],
                              workdir=Path(work) / "ts", ports=Ports.free(), timeout=300)
        try:
            tokens = server.tokens()
            url = f"{server.inference_url}/predictions/fashion"
            load = workload(args.images)
            templates = load.templates
            expected = answers_alone(url, tokens.inference, templates)
            clean_url = f"{server.inference_url}/predictions/fashion_clean"
            clean = {i: as_vector(text, names)
                     for i, text in answers_alone(clean_url, tokens.inference, templates).items()}
            workers = worker_processes(server.management_url, tokens.management, "fashion")
            java = server.processes()[0]
            warm = soak(url, tokens.inference, load, args.warmup, args.concurrency)
            problems = violations(warm, templates, expected, clean, epsilon, names)
            base_rss, base_java = rss_mb(workers), rss_mb([java])
            log(f"after {args.warmup} warm-up requests: worker RSS {base_rss:.0f} MB, "
                f"frontend RSS {base_java:.0f} MB")
            total = Report()
            per_slice = args.requests // args.slices
            for number in range(args.slices):
                part = soak(url, tokens.inference, load, per_slice, args.concurrency,
                            start=args.warmup + number * per_slice)
                problems += violations(part, templates, expected, clean, epsilon, names)
                total.outcomes += part.outcomes
                total.seconds += part.seconds
                log(f"  {len(total.outcomes):6d} requests: {part.throughput:6.1f} req/s, "
                    f"worker RSS {rss_mb(workers):.0f} MB, frontend {rss_mb([java]):.0f} MB")
            statuses = total.statuses
            growth = 100 * (rss_mb(workers) / base_rss - 1)
            log(f"soak: {len(total.outcomes)} requests at concurrency {args.concurrency} "
                f"in {total.seconds:.1f} s = {total.throughput:.1f} req/s")
            log(f"latency: p50 {total.latency_ms(0.5):.1f} ms, p99 {total.latency_ms(0.99):.1f} "
                f"ms, max {total.latency_ms(1.0):.1f} ms")
            log(f"statuses: {dict(sorted(statuses.items()))}; 5xx: "
                f"{sum(n for s, n in statuses.items() if s >= 500)}; no response: "
                f"{statuses.get(0, 0)}")
            log(f"worker RSS: {base_rss:.0f} MB after warm-up -> {rss_mb(workers):.0f} MB "
                f"({growth:+.1f}%); frontend (Java) {base_java:.0f} -> "
                f"{rss_mb([java]):.0f} MB")
            log(f"rule violations (status, answer alone, simplex, budget): {len(problems)}")
            for problem in problems[:20]:
                log(f"  {problem}")
        finally:
            stop_server(server.workdir)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
