"""Throughput of the KServe predictor vs TorchServe on the demo-size model, in one run.

Builds one ``.mar`` (28x28 ``small_cnn`` victim, ``small_cnn`` surrogate, the shipped
``grad2`` config: GRAD², all_ones, batchSize 32, maxBatchDelay 5 ms, one torch thread),
serves it on TorchServe (one worker, token on) and on KServe (``grad2 serve --runtime
kserve``), and sends PNG images from ``concurrency`` client threads (one keep-alive
session each): TorchServe ``POST /predictions/NAME`` (octet-stream), KServe ``POST
/v1/models/NAME:predict`` (image/png), both answering the same JSON. Per level: a warm-up,
then ``--rounds`` alternating rounds of ``--requests`` each; medians over rounds.

    .venv/bin/python scripts/bench_kserve.py --requests 400 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch
import yaml

from grad2.models import build_model, save_checkpoint
from grad2.serve import Ports, build_archive, start_server
from grad2.serve.kserve_server import start_kserve, stop_kserve
from grad2.serve.server import stop_server
from grad2.serve.templates import template_path


def images(count: int) -> list[bytes]:
    """``count`` random 28x28 grayscale PNGs."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    found = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buffer, "PNG")
        found.append(buffer.getvalue())
    return found


def burst(url: str, headers: dict[str, str], bodies: list[bytes], total: int,
          concurrency: int) -> tuple[float, list[float]]:
    """``total`` requests from ``concurrency`` threads; (seconds, latencies in ms)."""
    def client(worker: int) -> list[float]:
        session, latencies = requests.Session(), []
        for index in range(worker, total, concurrency):
            started = time.perf_counter()
            response = session.post(url, data=bodies[index % len(bodies)], headers=headers,
                                    timeout=60)
            latencies.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text[:200]
        return latencies

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [ms for part in pool.map(client, range(concurrency)) for ms in part]
    return time.perf_counter() - started, latencies


def build(folder: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(build_model("small_cnn"), folder / "victim.pt")
    torch.manual_seed(1)
    save_checkpoint(build_model("small_cnn"), folder / "surrogate.pt")
    config = yaml.safe_load(template_path("model-configs/grad2.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return build_archive(name="fashion", version="1.0", victim=folder / "victim.pt",
                         config=folder / "config.yaml", export_path=folder / "store",
                         surrogate=folder / "surrogate.pt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args(argv)
    bodies = images(64)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        archive = build(folder)
        ts = start_server(archive.parent, ["fashion=fashion.mar"], workdir=folder / "ts",
                          ports=Ports.free())
        ks = start_kserve(archive, "fashion", workdir=folder / "ks")
        try:
            token = ts.tokens().inference
            targets = {
                "TorchServe": (f"{ts.inference_url}/predictions/fashion",
                               {"Authorization": f"Bearer {token}",
                                "Content-Type": "application/octet-stream"}),
                "KServe": (f"{ks.inference_url}/v1/models/fashion:predict",
                           {"Content-Type": "image/png"}),
            }
            print("| runtime | concurrency | req/s | p50 ms | p99 ms |")
            print("| --- | --- | --- | --- | --- |")
            for concurrency in args.concurrency:
                rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in targets}
                for url, headers in targets.values():
                    burst(url, headers, bodies, 100, concurrency)  # warm-up
                for round_index in range(args.rounds):
                    order = list(targets) if round_index % 2 == 0 else list(targets)[::-1]
                    for name in order:
                        url, headers = targets[name]
                        seconds, latencies = burst(url, headers, bodies, args.requests,
                                                   concurrency)
                        rows[name].append((args.requests / seconds,
                                           float(np.percentile(latencies, 50)),
                                           float(np.percentile(latencies, 99))))
                for name, measured in rows.items():
                    rate, p50, p99 = (statistics.median(column) for column in zip(*measured))
                    print(f"| {name} | {concurrency} | {rate:.0f} | {p50:.1f} | {p99:.1f} |")
                    sys.stdout.flush()
        finally:
            stop_kserve(ks.workdir)
            stop_server(ts.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
