"""``grad2 bench-serve``: the defense's cost through a real TorchServe (issue 6).

One server per concurrency level serves the same victim side by side: ``plain``
(``method: none``, no surrogate in the archive) and one or more defended variants (GRAD²,
``all_ones``), each with one worker, one torch thread and ``batchSize`` equal to the
concurrency. ``--case small`` (default) is the lab's 28x28 ``small_cnn`` with a surrogate
of its own architecture (variant ``defended``); ``--case imagenet`` is a
``torchvision:resnet50`` victim at 3x224x224 with 1,000 classes (random weights: cost
only) defended by a ``torchvision:resnet18`` and a ``torchvision:mobilenet_v3_small``
surrogate, each with the plain and the top-1-preserving solver. Clients send PNG images
through the standard inference API (``POST /predictions/NAME``, token on) from
``concurrency`` threads, each with its own keep-alive session. After a warm-up the models
are timed in alternating rounds (a background load hits all alike; the order flips every
round) and summarised by
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

from grad2.config import MEMORY_FORMATS
from grad2.lab.attack import encode_png
from grad2.models import build_model, load_checkpoint, save_checkpoint
from grad2.scores import METHODS
from grad2.serve import Ports, TorchServeServer, build_archive, start_server, stop_server
from grad2.tools.progress import progress_bar

PLAIN = "plain"
#: ``--case`` -> victim architecture, classes, input ``[C, H, W]``, normalisation, and the
#: defended variants as name -> (surrogate architecture, preserve_top1).
CASES: dict[str, dict[str, Any]] = {
    "small": {"victim": "small_cnn", "classes": 10, "shape": (1, 28, 28),
              "mean": [0.286], "std": [0.353],
              "variants": {"defended": (None, False)}},
    "imagenet": {"victim": "torchvision:resnet50", "classes": 1000, "shape": (3, 224, 224),
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                 "variants": {"resnet18": ("torchvision:resnet18", False),
                              "resnet18_top1": ("torchvision:resnet18", True),
                              "mobilenet": ("torchvision:mobilenet_v3_small", False),
                              "mobilenet_top1": ("torchvision:mobilenet_v3_small", True)}},
}
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


def query_images(count: int, seed: int, shape: Sequence[int] = (1, 28, 28)) -> list[bytes]:
    """``count`` seeded PNGs of ``[C, H, W]`` (content does not change the cost per query)."""
    channels, height, width = shape
    rng = np.random.default_rng(seed)
    size = (height, width) if channels == 1 else (height, width, channels)
    return [encode_png(rng.integers(0, 256, size=size, dtype=np.uint8)) for _ in range(count)]


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


def build_store(folder: Path, victim: Path, surrogates: dict[str, tuple[Path, bool]],
                batch_size: int, epsilon: float, batch_invariant: bool, case: dict[str, Any],
                scores: str = "jvp", memory_format: str = "channels_last") -> Path:
    """The ``plain`` archive and one defended archive per variant (``name -> (surrogate
    checkpoint, preserve_top1)``) of ``victim``, with ``batchSize`` ``batch_size``."""
    store = folder / f"store_b{batch_size}"
    channels, height, width = case["shape"]
    archives: dict[str, tuple[dict[str, Any], Path | None]] = {PLAIN: ({"method": "none"}, None)}
    for name, (surrogate, preserve_top1) in surrogates.items():
        archives[name] = ({"method": "grad2", "epsilon": epsilon, "target": "all_ones",
                           "surrogate": "surrogate.pt", "scores": scores,
                           "preserve_top1": preserve_top1}, surrogate)
    for name, (defense, surrogate_file) in archives.items():
        config = folder / f"{name}_b{batch_size}.yaml"
        config.write_text(yaml.safe_dump({
            "minWorkers": 1, "maxWorkers": 1, "batchSize": batch_size, "maxBatchDelay": 5,
            "responseTimeout": 600, "startupTimeout": 900, "defense": defense,
            "input": {"channels": channels, "height": height, "width": width,
                      "mean": case["mean"], "std": case["std"], "threads": 1},
            "handler": {"batch_invariant": batch_invariant, "memory_format": memory_format},
        }))
        build_archive(name, "1.0", victim, config, store, surrogate=surrogate_file, force=True)
    return store


def measure_level(folder: Path, store: Path, models: Sequence[str], concurrency: int,
                  images: Sequence[bytes], requests_per_round: int, rounds: int, warmup: int,
                  progress: bool) -> dict[str, Any]:
    """Serve every archive, warm up, then time ``rounds`` rounds of each model, in an
    order that rotates every round."""
    workdir = folder / f"server_c{concurrency}"
    server = start_server(store, [f"{m}={m}.mar" for m in models], workdir=workdir,
                          ports=Ports.free(), timeout=1800)
    try:
        token = server.tokens().inference
        urls = {m: f"{server.inference_url}/predictions/{m}" for m in models}
        for model in models:
            burst(urls[model], token, images, warmup, concurrency)
        memory_warm = {m: worker_memory_mb(server, m) for m in models}
        timed: list[Round] = []
        schedule = [(r, m) for r in range(rounds)
                    for m in (models if r % 2 == 0 else list(models)[::-1])]
        for _, model in progress_bar(schedule, desc=f"concurrency {concurrency}",
                                     unit="round", disable=not progress, leave=False):
            seconds, cpu, statuses, latencies = burst(
                urls[model], token, images, requests_per_round, concurrency)
            timed.append(Round(model, concurrency, requests_per_round, seconds, cpu,
                               statuses, latencies))
        memory_end = {m: worker_memory_mb(server, m) for m in models}
    finally:
        stop_server(workdir)
    return summarise(timed, models, concurrency, memory_warm, memory_end)


def summarise(timed: Sequence[Round], models: Sequence[str], concurrency: int,
              memory_warm: dict, memory_end: dict) -> dict[str, Any]:
    """Medians over rounds per model, and each defended / plain ratio measured in the same
    round (``ratios``; for the small case also ``throughput_ratio`` & co. at the top)."""
    by_model = {m: [r for r in timed if r.model == m] for m in models}
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
    summary["ratios"] = {}
    for model in models:
        if model == PLAIN:
            continue
        pairs = list(zip(by_model[PLAIN], by_model[model], strict=True))
        summary["ratios"][model] = {
            "throughput": statistics.median(d.throughput / p.throughput for p, d in pairs),
            "p50": statistics.median(d.latency(0.5) / p.latency(0.5) for p, d in pairs),
            "p99": statistics.median(d.latency(0.99) / p.latency(0.99) for p, d in pairs),
        }
    if "defended" in summary["ratios"]:
        for key, value in summary["ratios"]["defended"].items():
            summary[f"{key}_ratio"] = value
    return summary


#: (case, concurrency, measure, goal): throughput ratio >= goal, p99 ratio <= goal.
GOALS = (("small", 16, "throughput", THROUGHPUT_GOAL), ("small", 1, "throughput", 0.85),
         ("imagenet", 16, "throughput", 0.80), ("imagenet", 1, "p99", 1.5))


def goals(levels: Sequence[dict[str, Any]], case: str, surrogate_mb: dict[str, float]
          ) -> list[dict[str, Any]]:
    """The issues' end-to-end goals that this run measured, each as measured / goal: per
    defended variant, throughput (or p99 latency) against plain, and worker memory."""
    rows = []
    for goal_case, concurrency, measure, goal in GOALS:
        if goal_case != case:
            continue
        for level in levels:
            if level["concurrency"] != concurrency:
                continue
            for variant, ratios in level["ratios"].items():
                value = ratios[measure]
                met = value >= goal if measure == "throughput" else value <= goal
                word = ">=" if measure == "throughput" else "<="
                rows.append({"goal": f"{variant} {measure} {word} {goal}x plain at "
                             f"concurrency {concurrency}", "measured": round(value, 3),
                             "met": met})
    for variant, weights in surrogate_mb.items():
        growth = max(level[variant]["memory_at_end"]["rss_mb"]
                     - level[PLAIN]["memory_at_end"]["rss_mb"] for level in levels)
        allowed = weights + MEMORY_SLACK_MB
        rows.append({"goal": f"{variant} worker RSS - plain <= surrogate weights "
                             f"({weights:.2f} MB) + {MEMORY_SLACK_MB:g} MB",
                     "measured": round(growth, 1), "met": growth <= allowed})
    return rows


def format_table(result: dict[str, Any]) -> str:
    lines = [
        "| concurrency (= batchSize) | model | req/s | ratio to plain | p50 / p99 ms "
        "| p99 ratio | worker RSS / USS MB | client CPU share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in result["levels"]:
        for model in result["models"]:
            measured = level[model]
            ratios = level["ratios"].get(model)
            memory = measured["memory_at_end"]
            throughput = "—" if ratios is None else f"{ratios['throughput']:.2f}×"
            p99 = "—" if ratios is None else f"{ratios['p99']:.2f}×"
            lines.append(
                f"| {level['concurrency']} | {model} | {measured['throughput_rps']:.1f} | "
                f"{throughput} | {measured['p50_ms']:.1f} / {measured['p99_ms']:.1f} | {p99} | "
                f"{memory['rss_mb']:.0f} / {memory['uss_mb']:.0f} | "
                f"{measured['client_cpu_share']:.2f} |")
    weights = ", ".join(f"{k} {v:.2f} MB" for k, v in result["surrogate_weight_mb"].items())
    lines += ["", f"surrogate weights: {weights}", ""]
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
    for model in result["models"]:
        style = "--o" if model == PLAIN else "-o"
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
    figure.suptitle(f"TorchServe, one worker per model ({result['settings']['case']} case): "
                    "plain vs GRAD²-defended")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    case = CASES[args.case]
    channels, _, _ = case["shape"]
    with tempfile.TemporaryDirectory(prefix="grad2-bench-serve-") as work:
        folder = Path(work)
        victim = args.victim
        if victim is None:
            torch.manual_seed(args.seed)
            victim = folder / "victim.pt"
            save_checkpoint(build_model(args.arch or case["victim"], case["classes"],
                                        channels), victim)
        surrogates: dict[str, tuple[Path, bool]] = {}
        surrogate_mb: dict[str, float] = {}
        for index, (name, (arch, preserve_top1)) in enumerate(case["variants"].items()):
            path = args.surrogate
            if path is None:
                torch.manual_seed(args.seed + 1 + index)
                path = folder / f"surrogate_{name}.pt"
                save_checkpoint(build_model(arch or args.arch or case["victim"],
                                            case["classes"], channels), path)
            surrogates[name] = (Path(path), preserve_top1 or args.preserve_top1)
            surrogate_mb[name] = weight_bytes(load_checkpoint(Path(path))[0]) / 2**20
        models = [PLAIN, *surrogates]
        images = query_images(args.images, args.seed, case["shape"])
        levels = []
        for concurrency in args.concurrency:
            store = build_store(folder, Path(victim), surrogates, concurrency, args.epsilon,
                                not args.batched_victim, case, args.scores,
                                args.memory_format)
            levels.append(measure_level(
                folder, store, models, concurrency, images, args.requests, args.rounds,
                args.warmup or max(4 * concurrency, 100), not args.no_progress))
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average": list(os.getloadavg()), "torch": torch.__version__},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                     if k != "func"},
        "models": models,
        "surrogate_weight_mb": surrogate_mb,
        "levels": levels,
        "goals": goals(levels, args.case, surrogate_mb),
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
    parser.add_argument("--case", choices=tuple(CASES), default="small",
                        help="small: 28x28 small_cnn victim and surrogate; imagenet: "
                        "ResNet-50 victim at 3x224x224, K=1000, ResNet-18 and MobileNetV3 "
                        "surrogates, plain and top-1-preserving solver")
    parser.add_argument("--preserve-top1", action="store_true",
                        help="every defended variant keeps the top-1 label")
    parser.add_argument("--epsilon", type=float, default=0.5)
    parser.add_argument("--scores", choices=METHODS, default="jvp",
                        help="the defended archive's defense.scores (default jvp)")
    parser.add_argument("--arch", help="victim (and small-case surrogate) architecture when no "
                        "checkpoints are given (default: the case's; random weights)")
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
