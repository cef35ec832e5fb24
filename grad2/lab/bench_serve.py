"""``grad2 bench-serve``: the defense's cost through a real TorchServe (issue 6).

One server per concurrency level serves the same victim twice, side by side: ``plain``
(``method: none``, no surrogate in the archive) and ``defended`` (GRAD², ``all_ones``,
a surrogate of the victim's architecture), each with one worker, one torch thread and
``batchSize`` equal to the concurrency. Clients send PNG images through the standard
inference API (``POST /predictions/NAME``, token on) from ``concurrency`` threads, each
with its own keep-alive session. After a warm-up the two models are timed in alternating
rounds (a background load hits both alike; the order flips every round) and summarised by
medians over rounds: throughput (answers per second), p50 and p99 latency, and the ratio
defended / plain measured in the same round. Worker memory (RSS and USS of each model's
worker process, from the management API's pids) is read after the warm-up and at the end;
the goal compares the growth with the surrogate's weight bytes plus 50 MB.

The client runs on the same machine as the server: its CPU time per round is recorded, so a
client-bound measurement (both models limited by the client, ratio pushed toward 1) shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
import yaml
from tqdm import tqdm

from grad2.config import MEMORY_FORMATS
from grad2.lab.attack import encode_png
from grad2.models import build_model, load_checkpoint, save_checkpoint
from grad2.scores import METHODS
from grad2.serve import Ports, TorchServeServer, build_archive, start_server, stop_server

MODELS = ("plain", "defended")
#: Memory goal: the defended worker may grow by the surrogate's weights plus this much.
MEMORY_SLACK_MB = 50.0
THROUGHPUT_GOAL = 0.85
GOAL_CONCURRENCY = 16


@dataclass
class Round:
    """One timed burst of requests against one model."""

    model: str
    concurrency: int
    requests: int
    seconds: float
    client_cpu_s: float
    statuses: dict[int, int]
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def latency(self, quantile: float) -> float:
        return float(np.quantile(self.latencies_ms, quantile))


def query_images(count: int, seed: int, side: int = 28) -> list[bytes]:
    """``count`` seeded grayscale PNGs (content does not change the cost per query)."""
    rng = np.random.default_rng(seed)
    return [encode_png(rng.integers(0, 256, size=(side, side), dtype=np.uint8))
            for _ in range(count)]


def burst(url: str, token: str, images: Sequence[bytes], total: int, concurrency: int,
          timeout: float = 120.0) -> tuple[float, float, dict[int, int], list[float]]:
    """Send ``total`` requests from ``concurrency`` threads; return wall seconds, client CPU
    seconds, status counts (0: no HTTP answer) and per-request latencies in ms."""
    local = threading.local()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}

    def one(index: int) -> tuple[int, float]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        began = time.perf_counter()
        try:
            response = session.post(url, data=images[index % len(images)], headers=headers,
                                    timeout=timeout)
            status = response.status_code
        except requests.RequestException:
            status = 0
        return status, 1000 * (time.perf_counter() - began)

    cpu_before, began = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(one, range(total)))
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu_before
    statuses: dict[int, int] = {}
    for status, _ in outcomes:
        statuses[status] = statuses.get(status, 0) + 1
    return seconds, cpu, statuses, [latency for _, latency in outcomes]


def worker_memory_mb(server: TorchServeServer, model: str) -> dict[str, float]:
    """RSS and USS (MB) of ``model``'s worker processes."""
    import psutil

    response = requests.get(f"{server.management_url}/models/{model}",
                            headers=server.tokens().header("management"), timeout=30)
    response.raise_for_status()
    pids = [int(worker["pid"]) for entry in response.json()
            for worker in entry.get("workers", []) if worker.get("pid")]
    if not pids:
        raise RuntimeError(f"no worker pid listed for {model}")
    rss = uss = 0.0
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        rss, uss = rss + info.rss / 2**20, uss + info.uss / 2**20
    return {"rss_mb": round(rss, 1), "uss_mb": round(uss, 1), "workers": len(pids)}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def build_store(folder: Path, victim: Path, surrogate: Path, batch_size: int,
                epsilon: float, batch_invariant: bool, scores: str = "jvp",
                memory_format: str = "channels_last") -> Path:
    """``plain`` and ``defended`` archives of ``victim`` with ``batchSize`` ``batch_size``."""
    store = folder / f"store_b{batch_size}"
    defenses = {
        "plain": ({"method": "none"}, None),
        "defended": ({"method": "grad2", "epsilon": epsilon, "target": "all_ones",
                      "surrogate": "surrogate.pt", "scores": scores}, surrogate),
    }
    for name, (defense, surrogate_file) in defenses.items():
        config = folder / f"{name}_b{batch_size}.yaml"
        config.write_text(yaml.safe_dump({
            "minWorkers": 1, "maxWorkers": 1, "batchSize": batch_size, "maxBatchDelay": 5,
            "responseTimeout": 120, "defense": defense,
            "input": {"channels": 1, "height": 28, "width": 28, "mean": [0.286],
                      "std": [0.353], "threads": 1},
            "handler": {"batch_invariant": batch_invariant, "memory_format": memory_format},
        }))
        build_archive(name, "1.0", victim, config, store, surrogate=surrogate_file, force=True)
    return store


def measure_level(folder: Path, store: Path, concurrency: int, images: Sequence[bytes],
                  requests_per_round: int, rounds: int, warmup: int,
                  progress: bool) -> dict[str, Any]:
    """Serve both archives, warm up, then time ``rounds`` alternating rounds."""
    workdir = folder / f"server_c{concurrency}"
    server = start_server(store, [f"{m}={m}.mar" for m in MODELS], workdir=workdir,
                          ports=Ports.free())
    try:
        token = server.tokens().inference
        urls = {m: f"{server.inference_url}/predictions/{m}" for m in MODELS}
        for model in MODELS:
            burst(urls[model], token, images, warmup, concurrency)
        memory_warm = {m: worker_memory_mb(server, m) for m in MODELS}
        timed: list[Round] = []
        schedule = [(r, m) for r in range(rounds)
                    for m in (MODELS if r % 2 == 0 else MODELS[::-1])]
        for _, model in tqdm(schedule, desc=f"concurrency {concurrency}", unit="round",
                             disable=not progress, leave=False):
            seconds, cpu, statuses, latencies = burst(
                urls[model], token, images, requests_per_round, concurrency)
            timed.append(Round(model, concurrency, requests_per_round, seconds, cpu,
                               statuses, latencies))
        memory_end = {m: worker_memory_mb(server, m) for m in MODELS}
    finally:
        stop_server(workdir)
    return summarise(timed, concurrency, memory_warm, memory_end)


def summarise(timed: Sequence[Round], concurrency: int, memory_warm: dict,
              memory_end: dict) -> dict[str, Any]:
    """Medians over rounds per model, and the per-round defended / plain ratios."""
    by_model = {m: [r for r in timed if r.model == m] for m in MODELS}
    summary: dict[str, Any] = {"concurrency": concurrency, "batch_size": concurrency}
    for model, rounds in by_model.items():
        statuses: dict[str, int] = {}
        for r in rounds:
            for status, count in r.statuses.items():
                statuses[str(status)] = statuses.get(str(status), 0) + count
        summary[model] = {
            "throughput_rps": statistics.median(r.throughput for r in rounds),
            "p50_ms": statistics.median(r.latency(0.5) for r in rounds),
            "p99_ms": statistics.median(r.latency(0.99) for r in rounds),
            "client_cpu_share": statistics.median(r.client_cpu_s / r.seconds for r in rounds),
            "statuses": statuses,
            "memory_after_warmup": memory_warm[model],
            "memory_at_end": memory_end[model],
            "rounds": [{k: v for k, v in asdict(r).items() if k != "latencies_ms"}
                       | {"p50_ms": r.latency(0.5), "p99_ms": r.latency(0.99)} for r in rounds],
        }
    pairs = list(zip(by_model["plain"], by_model["defended"], strict=True))
    summary["throughput_ratio"] = statistics.median(d.throughput / p.throughput
                                                    for p, d in pairs)
    summary["p50_ratio"] = statistics.median(d.latency(0.5) / p.latency(0.5) for p, d in pairs)
    summary["p99_ratio"] = statistics.median(d.latency(0.99) / p.latency(0.99)
                                             for p, d in pairs)
    return summary


def goals(levels: Sequence[dict[str, Any]], surrogate_mb: float) -> list[dict[str, Any]]:
    """The issue's two end-to-end goals, each as measured / goal."""
    rows = []
    at_goal = [level for level in levels if level["concurrency"] == GOAL_CONCURRENCY]
    if at_goal:
        ratio = at_goal[0]["throughput_ratio"]
        rows.append({"goal": f"defended throughput >= {THROUGHPUT_GOAL}x plain at "
                             f"concurrency {GOAL_CONCURRENCY}",
                     "measured": round(ratio, 3), "met": ratio >= THROUGHPUT_GOAL})
    growth = max(level["defended"]["memory_at_end"]["rss_mb"]
                 - level["plain"]["memory_at_end"]["rss_mb"] for level in levels)
    allowed = surrogate_mb + MEMORY_SLACK_MB
    rows.append({"goal": f"defended worker RSS - plain <= surrogate weights "
                         f"({surrogate_mb:.2f} MB) + {MEMORY_SLACK_MB:g} MB",
                 "measured": round(growth, 1), "met": growth <= allowed})
    return rows


def format_table(result: dict[str, Any]) -> str:
    lines = [
        "| concurrency (= batchSize) | plain req/s | defended req/s | ratio | plain p50 / p99 ms"
        " | defended p50 / p99 ms | client CPU share |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in result["levels"]:
        plain, defended = level["plain"], level["defended"]
        lines.append(
            f"| {level['concurrency']} | {plain['throughput_rps']:.0f} | "
            f"{defended['throughput_rps']:.0f} | {level['throughput_ratio']:.2f}× | "
            f"{plain['p50_ms']:.1f} / {plain['p99_ms']:.1f} | "
            f"{defended['p50_ms']:.1f} / {defended['p99_ms']:.1f} | "
            f"{plain['client_cpu_share']:.2f} / {defended['client_cpu_share']:.2f} |")
    lines += ["", "| concurrency | plain worker RSS / USS MB | defended worker RSS / USS MB |"
              " growth (RSS) |", "| --- | --- | --- | --- |"]
    for level in result["levels"]:
        plain, defended = (level[m]["memory_at_end"] for m in MODELS)
        lines.append(f"| {level['concurrency']} | {plain['rss_mb']:.0f} / {plain['uss_mb']:.0f}"
                     f" | {defended['rss_mb']:.0f} / {defended['uss_mb']:.0f} | "
                     f"{defended['rss_mb'] - plain['rss_mb']:+.1f} |")
    lines += ["", f"surrogate weights: {result['surrogate_weight_mb']:.3f} MB", ""]
    lines += [f"- {row['goal']}: {row['measured']} ({'met' if row['met'] else 'NOT met'})"
              for row in result["goals"]]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    concurrency = [level["concurrency"] for level in levels]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for model, style in zip(MODELS, ("--o", "-o"), strict=True):
        left.plot(concurrency, [lv[model]["throughput_rps"] for lv in levels], style,
                  label=model)
        right.plot(concurrency, [lv[model]["p50_ms"] for lv in levels], style,
                   label=f"{model} p50")
        right.plot(concurrency, [lv[model]["p99_ms"] for lv in levels], style, alpha=0.5,
                   label=f"{model} p99")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("client concurrency (= batchSize)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    left.set_ylabel("answers per second")
    right.set_ylabel("latency (ms)")
    right.set_yscale("log")
    figure.suptitle("TorchServe, one worker per model: plain vs GRAD²-defended")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="grad2-bench-serve-") as work:
        folder = Path(work)
        victim, surrogate = args.victim, args.surrogate
        if victim is None:
            torch.manual_seed(args.seed)
            victim = folder / "victim.pt"
            save_checkpoint(build_model(args.arch), victim)
        if surrogate is None:
            torch.manual_seed(args.seed + 1)
            surrogate = folder / "surrogate.pt"
            save_checkpoint(build_model(args.arch), surrogate)
        surrogate_model, _ = load_checkpoint(Path(surrogate))
        surrogate_mb = weight_bytes(surrogate_model) / 2**20
        images = query_images(args.images, args.seed)
        levels = []
        for concurrency in args.concurrency:
            store = build_store(folder, Path(victim), Path(surrogate), concurrency,
                                args.epsilon, not args.batched_victim, args.scores,
                                args.memory_format)
            levels.append(measure_level(
                folder, store, concurrency, images, args.requests, args.rounds,
                args.warmup or max(4 * concurrency, 100), not args.no_progress))
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average": list(os.getloadavg()), "torch": torch.__version__},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                     if k != "func"},
        "surrogate_weight_mb": surrogate_mb,
        "levels": levels,
        "goals": goals(levels, surrogate_mb),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    return result


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,16,64, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _command(args: argparse.Namespace) -> int:
    if args.requests < 2 or args.rounds < 1:
        raise ValueError("--requests must be at least 2 and --rounds at least 1")
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    print(format_table(result))
    print(f"\n{result['wall_time_s']:.0f} s; JSON in {args.json}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-serve", help="throughput, latency and memory through a real TorchServe",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--concurrency", type=_int_list, default=[1, 16, 64],
                        help="client threads, also the archives' batchSize (default 1,16,64)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per model")
    parser.add_argument("--warmup", type=int, help="requests per model before timing "
                        "(default max(4 x concurrency, 100))")
    parser.add_argument("--epsilon", type=float, default=0.5)
    parser.add_argument("--scores", choices=METHODS, default="jvp",
                        help="the defended archive's defense.scores (default jvp)")
    parser.add_argument("--arch", default="small_cnn", help="victim and surrogate architecture "
                        "when no checkpoints are given (random weights: cost only)")
    parser.add_argument("--victim", type=Path, help="victim checkpoint (default: random)")
    parser.add_argument("--surrogate", type=Path, help="surrogate checkpoint (default: random)")
    parser.add_argument("--batched-victim", action="store_true",
                        help="handler.batch_invariant false: victim and defense run on "
                        "each batch as it comes (default: in the probed batch sizes, "
                        "bit-identical answers)")
    parser.add_argument("--memory-format", choices=MEMORY_FORMATS, default="channels_last",
                        help="handler.memory_format of both archives (default channels_last)")
    parser.add_argument("--images", type=int, default=256, help="distinct query images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("runs/bench_serve.json"))
    parser.add_argument("--plot", type=Path, help="PNG of throughput and latency")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_command)
