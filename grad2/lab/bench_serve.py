"""``grad2 bench-serve``: every served defense's cost through a real TorchServe (issues 6, 24).

One server per concurrency level serves the same victim side by side: ``plain`` (the
shipped ``none`` example: ``method: none``, no surrogate in the archive) and one model per
defense in ``--defenses`` (any method of :data:`grad2.defenses.DEFENSES`; default ``grad2``
and the README's recommended ``grad2_gated``), each configured as its shipped example
``model-config.yaml`` (``grad2/serve/templates/model-configs/METHOD.yaml``; ``--set
KEY=VALUE`` changes a key of every method that takes it). A method with a surrogate runs
once per surrogate of the case. Its files are staged as an operator would: seeded networks,
a key from :func:`grad2.gate.write_key`, and a feature gate fitted on the surrogate's
features with its threshold calibrated to flag :data:`GATE_FLAG_SHARE` of the query
images (``grad2 gate``'s rule). Each model has one worker, one torch thread and
``batchSize`` equal to the concurrency.

``--case small`` (default) is the lab's 28x28 ``small_cnn`` with a surrogate of its own
architecture; ``--case imagenet`` is a ``torchvision:resnet50`` victim at 3x224x224 with
1,000 classes (random weights: cost only) and a ``torchvision:resnet18`` and a
``torchvision:mobilenet_v3_small`` surrogate (models ``METHOD-resnet18``,
``METHOD-mobilenet``). ``--floor`` adds ``torchserve_floor``: a handler that answers a
constant without reading the image, TorchServe's own cost per request.

Clients send PNG images through the standard inference API (``POST /predictions/NAME``,
token on) from ``concurrency`` threads, each with its own keep-alive session. After a
warm-up the models are timed in alternating rounds (a background load hits all alike; the
order flips every round) and summarised by medians over rounds: throughput (answers per
second), p50 and p99 latency, each ratio to ``plain`` measured in the same round, and
``grad2_gated`` against ``grad2`` with the same surrogate (time per answer). Worker memory
(RSS and USS of each model's worker, from the management API's pids) is read after the
warm-up and at the end; the goal compares the growth over ``plain`` with the surrogate's
weight bytes plus 50 MB. The client runs on the same machine as the server: its CPU time
per round is recorded, so a client-bound measurement (ratios pushed toward 1) shows.
Writes JSON and a Markdown report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
import yaml

from grad2 import gate
from grad2.config import COMMON_KEYS, MEMORY_FORMATS
from grad2.defenses import DEFENSES, parse_config, takes
from grad2.defenses.base import GATE_SLOPE
from grad2.lab.attack import encode_png
from grad2.models import build_model, load_checkpoint, penultimate, save_checkpoint
from grad2.serve import Ports, TorchServeServer, build_archive, start_server, stop_server
from grad2.serve.archive import read_manifest
from grad2.serve.templates import template_path
from grad2.tools.gate_files import SLOPE_SPREADS
from grad2.tools.progress import progress_bar

PLAIN = "plain"
FLOOR = "torchserve_floor"
#: The methods benched unless ``--defenses`` says otherwise: plain GRAD² and the README's
#: recommended configuration.
DEFAULT_DEFENSES = ("grad2", "grad2_gated")
GATED, UNGATED = "grad2_gated", "grad2"
#: ``--case`` -> victim architecture, classes, input ``[C, H, W]``, normalisation, the
#: surrogates as label -> architecture (``None``: the victim's), and per-case defaults of
#: requests per round and the smallest warm-up.
CASES: dict[str, dict[str, Any]] = {
    "small": {"victim": "small_cnn", "classes": 10, "shape": (1, 28, 28),
              "mean": [0.286], "std": [0.353], "surrogates": {"small_cnn": None},
              "requests": 2000, "warmup": 100},
    "imagenet": {"victim": "torchvision:resnet50", "classes": 1000, "shape": (3, 224, 224),
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                 "surrogates": {"resnet18": "torchvision:resnet18",
                                "mobilenet": "torchvision:mobilenet_v3_small"},
                 "requests": 32, "warmup": 4},
}
#: Memory goal: a defended worker may grow by its surrogate's weights plus this much.
MEMORY_SLACK_MB = 50.0
#: Share of the (in-distribution) query images the staged feature gate flags as OOD.
GATE_FLAG_SHARE = 0.01
#: Issue 24's goals through TorchServe: (case, concurrency, measure, comparison, goal) for
#: each defended model against ``plain`` in the same rounds.
GOALS = (("small", 1, "throughput", ">=", 0.85), ("small", 1, "p99", "<=", 1.3),
         ("imagenet", 16, "throughput", ">=", 0.90), ("imagenet", 1, "p99", "<=", 1.2))
#: ``grad2_gated`` time per answer / ``grad2``'s (same surrogate, same rounds), every level.
GATED_COST_GOAL = 1.1
FLOOR_HANDLER = '''"""Answer every request with a constant: TorchServe's own cost per request."""


def handle(data, context):
    return None if data is None else [{"floor": 1}] * len(data)
'''


@dataclass(frozen=True)
class Variant:
    """One served model of the bench: its method, its surrogate's label (``None``: no
    surrogate) and its ``defense:`` section before the staged files' keys are filled in."""

    name: str
    method: str
    surrogate: str | None
    defense: dict[str, Any] = field(hash=False)


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


def example_defense(method: str) -> dict[str, Any]:
    """The ``defense:`` section of the shipped example of ``method``
    (``model-configs/METHOD.yaml``); a method registered without one gets its defaults."""
    try:
        path = template_path(f"model-configs/{method}.yaml")
    except FileNotFoundError:
        needs = DEFENSES[method].needs_surrogate
        return {"method": method, "surrogate": "surrogate.pt" if needs else None}
    return dict(yaml.safe_load(path.read_text())["defense"])


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: YAML value}`` (``epsilon=0.3``, ``scores=jvp``)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def plan_variants(methods: Sequence[str], surrogates: Sequence[str],
                  overrides: Mapping[str, Any] | None = None) -> list[Variant]:
    """``plain`` and one model per method (one per surrogate label for a method with a
    surrogate: named ``METHOD-LABEL`` when there are several), each with its example
    ``defense:`` section and the ``overrides`` its method takes. Raises ``ValueError`` for
    an unknown method or an override no method takes."""
    overrides = dict(overrides or {})
    unknown = sorted(set(methods) - set(DEFENSES))
    if unknown:
        raise ValueError(f"unknown defense {', '.join(unknown)}; served: {', '.join(DEFENSES)}")
    methods = [m for m in dict.fromkeys(methods) if m != "none"]
    for key in overrides:
        if key not in COMMON_KEYS and not set(takes(key)) & set(methods):
            raise ValueError(f"--set {key}: no benched method takes it "
                             f"(methods that do: {', '.join(takes(key)) or 'none'})")
    variants = [Variant(PLAIN, "none", None, example_defense("none"))]
    for method in methods:
        section = example_defense(method)
        section.update({k: v for k, v in overrides.items()
                        if k in COMMON_KEYS or method in takes(k)})
        labels = list(surrogates) if DEFENSES[method].needs_surrogate else [None]
        for label in labels:
            name = method if label is None or len(labels) == 1 else f"{method}-{label}"
            variants.append(Variant(name, method, label, dict(section)))
    return variants


def query_pixels(count: int, seed: int, shape: Sequence[int]) -> np.ndarray:
    """``count`` seeded ``uint8`` images ``[N, H, W]`` (one channel) or ``[N, H, W, 3]``
    (the content does not change the cost per query)."""
    channels, height, width = shape
    size = (count, height, width) if channels == 1 else (count, height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)


def normalised(pixels: np.ndarray, case: Mapping[str, Any]) -> torch.Tensor:
    """``[N, C, H, W]`` float inputs of ``pixels`` as the worker normalises them."""
    x = torch.from_numpy(pixels).float() / 255
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    mean = torch.tensor(case["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(case["std"]).view(1, -1, 1, 1)
    return (x - mean) / std


def bench_gate(surrogate: torch.nn.Module, x: torch.Tensor, classes: int,
               seed: int = 0) -> tuple[dict[str, torch.Tensor], float, float]:
    """A feature gate of the shapes ``grad2 gate`` writes (a mean for every class ``[K,
    D]``, a precision ``[D, D]``) for ``surrogate``: fitted on two noisy copies per class of
    the features of ``x [N, C, H, W]``, its threshold calibrated so that
    :data:`GATE_FLAG_SHARE` of ``x`` is flagged, its slope ``grad2 gate``'s (within the
    range a config accepts). Returns
    ``(tensors, threshold, slope)``."""
    features = penultimate(surrogate, x)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(2 * classes)
    spread = features.std(0, keepdim=True).clamp_min(1e-6)
    noise = torch.randn(len(rows), features.shape[1], generator=generator)
    fitted = features[rows % len(features)] + 0.5 * spread * noise
    tensors = gate.fit_feature_gate(fitted, rows % classes, classes)
    scores = gate.feature_score(features, tensors)
    threshold = gate.calibrate_threshold(scores, GATE_FLAG_SHARE)
    slope = SLOPE_SPREADS / scores.std().clamp_min(1e-30).item()
    # A random network's features can be all alike (MobileNetV3-small's: about 1e-9):
    # the slope stays in the range a config accepts.
    return tensors, threshold, min(max(slope, GATE_SLOPE.low), GATE_SLOPE.high)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def stage_files(folder: Path, variants: Sequence[Variant], surrogates: Mapping[str, Path],
                x: torch.Tensor, classes: int, chosen: Collection[str] = ()
                ) -> dict[str, tuple[dict, dict[str, Path]]]:
    """Write every file the variants' ``defense:`` sections name (key, gate, target) under
    ``folder``, one per surrogate; returns ``name -> (defense section as served, {file key:
    path})``. A staged gate's threshold and slope (:func:`bench_gate`) replace the
    example's placeholders, except keys in ``chosen`` (set by the caller)."""
    from grad2.targets import random as random_target
    from grad2.targets import save as save_target

    made: dict[tuple[str, str | None], tuple[Path, dict[str, Any]]] = {}
    staged: dict[str, tuple[dict, dict[str, Path]]] = {}
    for variant in variants:
        section, files = dict(variant.defense), {}
        for key, file_name in parse_config(section).files.items():
            if (key, variant.surrogate) not in made:
                path = folder / "files" / f"{variant.surrogate}_{file_name}"
                path.parent.mkdir(parents=True, exist_ok=True)
                surrogate = (load_checkpoint(surrogates[variant.surrogate])[0].eval()
                             if variant.surrogate else None)
                keys: dict[str, Any] = {}
                if key == "mapping_key":
                    gate.write_key(path)
                elif key == "gate_file":
                    tensors, threshold, slope = bench_gate(surrogate, x, classes)
                    torch.save(tensors, path)
                    keys = {"gate_threshold": float(f"{threshold:.6g}"),
                            "gate_slope": float(f"{slope:.6g}")}
                elif key == "target_file":
                    save_target(random_target(surrogate, 0), path)
                else:
                    raise ValueError(f"bench-serve cannot stage defense.{key} of {variant.name}")
                made[(key, variant.surrogate)] = (path, keys)
            path, keys = made[(key, variant.surrogate)]
            files[key] = path
            section.update({k: v for k, v in keys.items() if k not in chosen})
        staged[variant.name] = (section, files)
    return staged


def floor_archive(folder: Path, store: Path, batch_size: int) -> None:
    """``torchserve_floor.mar``: the constant handler, ``batchSize`` ``batch_size``."""
    handler = folder / "floor_handler.py"
    handler.write_text(FLOOR_HANDLER)
    config = folder / f"{FLOOR}_b{batch_size}.yaml"
    config.write_text(yaml.safe_dump(torchserve_keys(batch_size)))
    command = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", FLOOR,
               "--version", "1.0", "--handler", str(handler), "--config-file", str(config),
               "--export-path", str(store), "--force"]
    subprocess.run(command, check=True, capture_output=True, text=True)


def torchserve_keys(batch_size: int) -> dict[str, Any]:
    """The TorchServe keys of every benched model: one worker, ``batchSize``."""
    return {"minWorkers": 1, "maxWorkers": 1, "batchSize": batch_size, "maxBatchDelay": 5,
            "responseTimeout": 600, "startupTimeout": 900}


def build_store(folder: Path, victim: Path, staged: Mapping[str, tuple[dict, dict[str, Path]]],
                surrogates: Mapping[str, Path], variants: Sequence[Variant], batch_size: int,
                case: Mapping[str, Any], batch_invariant: bool, memory_format: str,
                floor: bool, progress: bool) -> Path:
    """One archive per variant (and the floor's) with ``batchSize`` ``batch_size``."""
    store = folder / f"store_b{batch_size}"
    channels, height, width = case["shape"]
    for variant in progress_bar(variants, desc=f"archives, batchSize {batch_size}",
                                unit="archive", disable=not progress, leave=False):
        section, files = staged[variant.name]
        config = folder / f"{variant.name}_b{batch_size}.yaml"
        config.write_text(yaml.safe_dump({
            **torchserve_keys(batch_size), "defense": section,
            "input": {"channels": channels, "height": height, "width": width,
                      "mean": case["mean"], "std": case["std"], "threads": 1},
            "handler": {"batch_invariant": batch_invariant, "memory_format": memory_format},
        }))
        surrogate = surrogates[variant.surrogate] if variant.surrogate else None
        build_archive(variant.name, "1.0", victim, config, store, surrogate=surrogate,
                      files=files, force=True)
    if floor:
        floor_archive(folder, store, batch_size)
    return store


def rebatched_store(store: Path, batch_size: int) -> Path:
    """A copy of every ``.mar`` in ``store`` whose model config says ``batchSize``
    ``batch_size``, nothing else changed (cheaper than packing a large victim again)."""
    destination = store.parent / f"store_b{batch_size}"
    destination.mkdir(exist_ok=True)
    for archive in sorted(store.glob("*.mar")):
        config_name = read_manifest(archive)["model"]["configFile"]
        with (zipfile.ZipFile(archive) as source,
              zipfile.ZipFile(destination / archive.name, "w") as copy):
            for item in source.infolist():
                data = source.read(item)
                if item.filename == config_name:
                    raw = yaml.safe_load(data) | {"batchSize": batch_size}
                    data = yaml.safe_dump(raw).encode()
                copy.writestr(item, data)
    return destination


def burst(url: str, token: str, images: Sequence[bytes], total: int, concurrency: int,
          timeout: float = 600.0) -> tuple[float, float, dict[int, int], list[float]]:
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
    """RSS and USS (MB) of ``model``'s worker processes, and the ``batchSize`` TorchServe
    reports for it."""
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
    return {"rss_mb": round(rss, 1), "uss_mb": round(uss, 1), "workers": len(pids),
            "batch_size": response.json()[0].get("batchSize")}


#: A worker's per-batch metric line in TorchServe's log (the handler's ``emit``).
METRIC_LINE = re.compile(r"\[METRICS\](HandlerTime|DefenseTime)\.Milliseconds:([0-9.e+-]+)"
                         r"\|#ModelName:([\w.-]+)[,|]")


def worker_times(log: Path, offset: int) -> dict[str, dict[str, float]]:
    """``model -> {handler_ms, defense_ms, batches}``: medians per batch of the handler's
    own ``HandlerTime`` and ``DefenseTime`` metrics logged after byte ``offset`` of
    TorchServe's ``ts_log.log`` (each line counted once)."""
    if not log.is_file():
        return {}
    with log.open("rb") as stream:
        stream.seek(offset)
        text = stream.read().decode(errors="replace")
    values: dict[str, dict[str, list[float]]] = {}
    for line in dict.fromkeys(text.splitlines()):
        match = METRIC_LINE.search(line)
        if match:
            metric, value, model = match.groups()
            values.setdefault(model, {}).setdefault(metric, []).append(float(value))
    return {model: {"handler_ms": statistics.median(found.get("HandlerTime", [0.0])),
                    "defense_ms": statistics.median(found.get("DefenseTime", [0.0])),
                    "batches": len(found.get("HandlerTime", []))}
            for model, found in values.items()}


def measure_level(folder: Path, store: Path, models: Sequence[str], concurrency: int,
                  images: Sequence[bytes], requests_per_round: int, rounds: int, warmup: int,
                  progress: bool) -> tuple[list[Round], dict, dict, dict]:
    """Serve every archive, warm up, then time ``rounds`` rounds of each model, the order
    reversed every other round. Returns the rounds, worker memory after the warm-up and
    at the end, and the workers' own times per batch (:func:`worker_times`)."""
    workdir = folder / f"server_c{concurrency}"
    server = start_server(store, [f"{m}={m}.mar" for m in models], workdir=workdir,
                          ports=Ports.free(), timeout=1800)
    try:
        token = server.tokens().inference
        urls = {m: f"{server.inference_url}/predictions/{m}" for m in models}
        for model in progress_bar(models, desc=f"warm-up, concurrency {concurrency}",
                                  unit="model", disable=not progress, leave=False):
            burst(urls[model], token, images, warmup, concurrency)
        memory_warm = {m: worker_memory_mb(server, m) for m in models}
        log = workdir / "logs" / "ts_log.log"
        offset = log.stat().st_size if log.is_file() else 0
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
        times = worker_times(log, offset)
    finally:
        stop_server(workdir)
    return timed, memory_warm, memory_end, times


def paired_ratios(base: Sequence[Round], other: Sequence[Round]) -> dict[str, float]:
    """Medians over rounds of ``other / base`` measured in the same round: throughput and
    p50/p99 latency, and ``cost``, the time per answer (1 / throughput ratio)."""
    pairs = list(zip(base, other, strict=True))
    return {
        "throughput": statistics.median(o.throughput / b.throughput for b, o in pairs),
        "cost": statistics.median(b.throughput / o.throughput for b, o in pairs),
        "p50": statistics.median(o.latency(0.5) / b.latency(0.5) for b, o in pairs),
        "p99": statistics.median(o.latency(0.99) / b.latency(0.99) for b, o in pairs),
    }


def gated_pairs(variants: Sequence[Variant]) -> dict[str, tuple[str, str]]:
    """``surrogate label -> (grad2 model, grad2_gated model)`` for every surrogate both
    methods were benched with."""
    by = {(v.method, v.surrogate): v.name for v in variants}
    return {label: (by[(UNGATED, label)], by[(GATED, label)])
            for method, label in by if method == GATED and (UNGATED, label) in by}


def summarise(timed: Sequence[Round], models: Sequence[str], concurrency: int,
              memory_warm: Mapping, memory_end: Mapping,
              pairs: Mapping[str, tuple[str, str]] | None = None,
              worker: Mapping[str, dict] | None = None) -> dict[str, Any]:
    """Medians over rounds per model (with the ``worker``'s own times per batch); each
    model / plain ratio measured in the same round (``ratios``) and ``grad2_gated`` /
    ``grad2`` per surrogate (``gated_over_grad2``)."""
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
            "worker_times": (worker or {}).get(model),
            "rounds": [{k: v for k, v in asdict(r).items() if k != "latencies_ms"}
                       | {"p50_ms": r.latency(0.5), "p99_ms": r.latency(0.99)} for r in rounds],
        }
    summary["ratios"] = {m: paired_ratios(by_model[PLAIN], by_model[m])
                         for m in models if m != PLAIN}
    summary["gated_over_grad2"] = {
        label: paired_ratios(by_model[ungated], by_model[gated])
        for label, (ungated, gated) in (pairs or {}).items()}
    return summary


def memory_growth(level: Mapping[str, Any], model: str) -> dict[str, float]:
    """RSS of ``model``'s worker minus ``plain``'s, after the warm-up and at the end (MB)."""
    return {when: round(level[model][key]["rss_mb"] - level[PLAIN][key]["rss_mb"], 1)
            for when, key in (("after_warmup", "memory_after_warmup"),
                              ("at_end", "memory_at_end"))}


def goals(levels: Sequence[dict[str, Any]], case: str, variants: Mapping[str, dict],
          surrogate_mb: Mapping[str, float]) -> list[dict[str, Any]]:
    """Issue 24's goals that this run measured, each as measured / goal: every defended
    model's throughput or p99 against ``plain``, ``grad2_gated``'s time per answer against
    ``grad2``'s, and each defended worker's RSS growth against its surrogate's weights +
    :data:`MEMORY_SLACK_MB`."""
    rows = []
    for goal_case, concurrency, measure, comparison, goal in GOALS:
        for level in levels:
            if goal_case != case or level["concurrency"] != concurrency:
                continue
            for model, ratios in level["ratios"].items():
                if model not in variants:
                    continue
                value = ratios[measure]
                met = value >= goal if comparison == ">=" else value <= goal
                rows.append({"goal": f"{model} {measure} {comparison} {goal}x plain at "
                             f"concurrency {concurrency}", "measured": round(value, 3),
                             "met": met})
    for level in levels:
        for label, ratios in level["gated_over_grad2"].items():
            value = ratios["cost"]
            rows.append({"goal": f"{GATED} / {UNGATED} time per answer ({label}) <= "
                         f"{GATED_COST_GOAL}x at concurrency {level['concurrency']}",
                         "measured": round(value, 3), "met": value <= GATED_COST_GOAL})
    for model, variant in variants.items():
        if model == PLAIN:
            continue
        weights = surrogate_mb.get(variant["surrogate"], 0.0)
        growth = max(memory_growth(level, model)["at_end"] for level in levels)
        allowed = weights + MEMORY_SLACK_MB
        rows.append({"goal": f"{model} worker RSS - plain <= surrogate weights "
                             f"({weights:.2f} MB) + {MEMORY_SLACK_MB:g} MB",
                     "measured": round(growth, 1), "met": growth <= allowed})
    return rows


def worker_cell(times: Mapping[str, float] | None) -> str:
    """``handler / defense`` ms per batch, or a dash where the worker logged none."""
    if not times:
        return "—"
    return f"{times['handler_ms']:.1f} / {times['defense_ms']:.1f}"


def format_report(result: dict[str, Any]) -> str:
    """The Markdown report: the table of every model at every level, ``grad2_gated`` /
    ``grad2``, and the goals."""
    meta = result["machine"]
    commit = result["commit"]
    lines = [
        f"`{result['command']}` — {result['when']}, commit {commit['head']}"
        + (f" (uncommitted changes in {', '.join(commit['dirty'])})" if commit["dirty"] else "")
        + f", {result['wall_time_s']:.0f} s, load average {meta['load_average_start']:.1f} → "
        f"{meta['load_average_end']:.1f} on {meta['cpus']} CPUs", "",
        "| concurrency (= batchSize) | model | req/s | × plain | p50 / p99 ms | p99 × plain "
        "| worker ms per batch: handler / defense | worker RSS MB, warm / end "
        "| RSS − plain, warm / end (allowed) | client CPU share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in result["levels"]:
        for model in result["models"]:
            measured, ratios = level[model], level["ratios"].get(model)
            variant = result["variants"].get(model)
            growth, allowed = "—", ""
            if variant and model != PLAIN:
                delta = memory_growth(level, model)
                growth = f"{delta['after_warmup']:+.0f} / {delta['at_end']:+.0f}"
            if variant and variant["surrogate"]:
                weights = result["surrogate_weight_mb"][variant["surrogate"]]
                allowed = f" ({weights + MEMORY_SLACK_MB:.0f})"
            lines.append(
                f"| {level['concurrency']} | {model} | {measured['throughput_rps']:.1f} | "
                + ("—" if ratios is None else f"{ratios['throughput']:.2f}×")
                + f" | {measured['p50_ms']:.1f} / {measured['p99_ms']:.1f} | "
                + ("—" if ratios is None else f"{ratios['p99']:.2f}×")
                + f" | {worker_cell(measured.get('worker_times'))}"
                + f" | {measured['memory_after_warmup']['rss_mb']:.0f} / "
                f"{measured['memory_at_end']['rss_mb']:.0f} | {growth}{allowed} | "
                f"{measured['client_cpu_share']:.2f} |")
    gated = [(level["concurrency"], label, ratios) for level in result["levels"]
             for label, ratios in level["gated_over_grad2"].items()]
    if gated:
        lines += ["", f"{GATED} against {UNGATED} with the same surrogate, same rounds:", "",
                  "| concurrency | surrogate | time per answer | p50 | p99 |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {c} | {label} | {r['cost']:.2f}× | {r['p50']:.2f}× | {r['p99']:.2f}× |"
                  for c, label, r in gated]
    weights = ", ".join(f"{k} {v:.2f} MB" for k, v in result["surrogate_weight_mb"].items())
    lines += ["", f"Surrogate weights: {weights}.", "", "| goal | measured | verdict |",
              "| --- | --- | --- |"]
    lines += [f"| {row['goal']} | {row['measured']} | {'met' if row['met'] else '**not met**'} |"
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
        style = "--o" if model in (PLAIN, FLOOR) else "-o"
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
        axis.legend(fontsize=7)
    left.set_ylabel("answers per second")
    right.set_ylabel("latency (ms)")
    right.set_yscale("log")
    figure.suptitle(f"TorchServe, one worker per model ({result['settings']['case']} case)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def git_state() -> dict[str, Any]:
    """The checkout's short commit and the files under ``grad2/`` that differ from it (what
    the workers import), or ``None`` outside a git checkout."""
    root = Path(__file__).resolve().parents[2]

    def git(*arguments: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *arguments], capture_output=True,
                                  text=True, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout

    head, status = git("log", "-1", "--format=%h"), git("status", "--porcelain", "--", "grad2")
    return {"head": head and head.strip(),
            "dirty": [line[3:] for line in (status or "").splitlines() if line.strip()]}


def prepare(args: argparse.Namespace, folder: Path, case: Mapping[str, Any]
            ) -> tuple[Path, dict[str, Path], dict[str, float]]:
    """The victim checkpoint and the surrogates (``label -> checkpoint``, ``label -> weight
    MB``): the given files, or seeded random networks of the case's architectures."""
    channels, _, _ = case["shape"]
    victim = args.victim
    if victim is None:
        torch.manual_seed(args.seed)
        victim = folder / "victim.pt"
        save_checkpoint(build_model(args.arch or case["victim"], case["classes"], channels),
                        victim)
    labels = {"custom": None} if args.surrogate else case["surrogates"]
    surrogates, surrogate_mb = {}, {}
    for index, (label, arch) in enumerate(labels.items()):
        path = args.surrogate
        if path is None:
            torch.manual_seed(args.seed + 1 + index)
            path = folder / f"surrogate_{label}.pt"
            save_checkpoint(build_model(arch or args.arch or case["victim"], case["classes"],
                                        channels), path)
        surrogates[label] = Path(path)
        surrogate_mb[label] = weight_bytes(load_checkpoint(Path(path))[0]) / 2**20
    return Path(victim), surrogates, surrogate_mb


def command_line(args: argparse.Namespace) -> str:
    """The ``grad2 bench-serve`` command that repeats this run (output paths left out)."""
    words = ["grad2 bench-serve", f"--case {args.case}", f"--defenses {','.join(args.defenses)}",
             f"--concurrency {','.join(map(str, args.concurrency))}", f"--rounds {args.rounds}"]
    words += [f"--{name} {getattr(args, name)}" for name in ("requests", "warmup", "arch")
              if getattr(args, name) is not None]
    words += [f"--set {item}" for item in args.set]
    words += [f"--memory-format {args.memory_format}"] * (args.memory_format != "channels_last")
    words += ["--floor"] * args.floor + ["--batched-victim"] * args.batched_victim
    words += [f"--{name} {getattr(args, name)}" for name in ("victim", "surrogate")
              if getattr(args, name) is not None]
    return " ".join(words)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    case = CASES[args.case]
    load_start = os.getloadavg()[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="grad2-bench-serve-") as work:
            folder = Path(work)
            victim, surrogates, surrogate_mb = prepare(args, folder, case)
            overrides = parse_overrides(args.set)
            variants = plan_variants(args.defenses, list(surrogates), overrides)
            pixels = query_pixels(args.images, args.seed, case["shape"])
            staged = stage_files(folder, variants, surrogates, normalised(pixels[:64], case),
                                 case["classes"], chosen=set(overrides))
            images = [encode_png(image) for image in pixels]
            models = [v.name for v in variants] + ([FLOOR] if args.floor else [])
            requests_per_round = args.requests or case["requests"]
            levels = []
            first = build_store(folder, victim, staged, surrogates, variants,
                                args.concurrency[0], case, not args.batched_victim,
                                args.memory_format, args.floor, not args.no_progress)
            for concurrency in args.concurrency:
                store = (first if concurrency == args.concurrency[0]
                         else rebatched_store(first, concurrency))
                warmup = args.warmup or max(2 * concurrency, case["warmup"])
                timed, warm, end, worker = measure_level(
                    folder, store, models, concurrency, images, requests_per_round,
                    args.rounds, warmup, not args.no_progress)
                levels.append(summarise(timed, models, concurrency, warm, end,
                                        gated_pairs(variants), worker))
    finally:
        torch.set_num_threads(threads)
    described = {v.name: {"method": v.method, "surrogate": v.surrogate,
                          "defense": staged[v.name][0]} for v in variants}
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command_line(args),
        "commit": git_state(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
                    "torch": torch.__version__},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                     if k != "func"} | {"requests": requests_per_round},
        "models": models,
        "variants": described,
        "surrogate_weight_mb": surrogate_mb,
        "levels": levels,
        "goals": goals(levels, args.case, described, surrogate_mb),
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


def _defense_list(text: str) -> list[str]:
    names = list(DEFENSES) if text == "all" else [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(names) - set(DEFENSES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown defense {', '.join(unknown)}; served: "
                                         f"{', '.join(DEFENSES)} (or all)")
    return names


def _command(args: argparse.Namespace) -> int:
    if (args.requests is not None and args.requests < 2) or args.rounds < 1:
        raise ValueError("--requests must be at least 2 and --rounds at least 1")
    result = run(args)
    report = format_report(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    markdown = args.markdown or args.json.with_suffix(".md")
    markdown.write_text(report + "\n")
    if args.plot:
        plot(result, args.plot)
    print(report)
    print(f"\n{result['wall_time_s']:.0f} s; JSON in {args.json}, Markdown in {markdown}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-serve", help="throughput, latency and memory of every served defense through "
        "a real TorchServe", description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--defenses", type=_defense_list, default=list(DEFAULT_DEFENSES),
                        help="served methods to bench beside plain, comma-separated, or all "
                        f"(default {','.join(DEFAULT_DEFENSES)}; served: {', '.join(DEFENSES)})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a defense: key for every benched method that takes it, over "
                        "its shipped example (repeatable; e.g. --set epsilon=0.3)")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 4, 16],
                        help="client threads, also the archives' batchSize (default 1,4,16)")
    parser.add_argument("--requests", type=int, help="requests per round (default: small "
                        "2000, imagenet 32)")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per model")
    parser.add_argument("--warmup", type=int, help="requests per model before timing "
                        "(default max(2 x concurrency, 100 small / 4 imagenet))")
    parser.add_argument("--case", choices=tuple(CASES), default="small",
                        help="small: 28x28 small_cnn victim and surrogate; imagenet: "
                        "ResNet-50 victim at 3x224x224, K=1000, ResNet-18 and "
                        "MobileNetV3-small surrogates")
    parser.add_argument("--floor", action="store_true",
                        help=f"also serve {FLOOR}: a handler answering a constant, "
                        "TorchServe's own cost per request")
    parser.add_argument("--arch", help="victim (and small-case surrogate) architecture when no "
                        "checkpoints are given (default: the case's; random weights)")
    parser.add_argument("--victim", type=Path, help="victim checkpoint (default: random)")
    parser.add_argument("--surrogate", type=Path, help="one surrogate checkpoint for every "
                        "defended model (default: the case's, random)")
    parser.add_argument("--batched-victim", action="store_true",
                        help="handler.batch_invariant false: victim and defense run on "
                        "each batch as it comes (default: in the probed batch sizes, "
                        "bit-identical answers)")
    parser.add_argument("--memory-format", choices=MEMORY_FORMATS, default="channels_last",
                        help="handler.memory_format of every archive (default channels_last)")
    parser.add_argument("--images", type=int, default=256, help="distinct query images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("runs/bench_serve.json"))
    parser.add_argument("--markdown", type=Path,
                        help="Markdown report (default: the JSON's path with .md)")
    parser.add_argument("--plot", type=Path, help="PNG of throughput and latency")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_command)
