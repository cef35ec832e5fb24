"""Per-batch handler time with and without the defense, from TorchServe's own metrics.

Serves one small_cnn victim four ways (GRAD² epsilon 0.5 and ``method: none``, each with
``handler.batch_invariant`` true, the default — victim and defense in the batch sizes
probed at load — and false, each batch as it comes), sends lone requests (batch 1) and
bursts of 32 concurrent requests (batchSize 32), then reads the handler's
``HandlerTime``/``DefenseTime`` and ``DefendedAnswers`` (the batch size) lines from the
server's ``ts_log.log``.

Run: ``.venv/bin/python integration_tests/bench_handler.py [--rounds 20] [--arch small_cnn]``
(about two minutes on 2 cores). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from ts_client import png, predict_raw

from grad2.models import build_model, save_checkpoint
from grad2.serve import Ports, build_archive, start_server, stop_server

VARIANTS = {
    "grad2": ({"method": "grad2", "epsilon": 0.5, "target": "all_ones"}, True),
    "none": ({"method": "none"}, True),
    "grad2_batched": ({"method": "grad2", "epsilon": 0.5, "target": "all_ones"}, False),
    "none_batched": ({"method": "none"}, False),
}
LINE = re.compile(r"\[METRICS\](HandlerTime|DefenseTime|DefendedAnswers)\.\w+:([0-9.e+-]+)"
                  r"\|#ModelName:(\w+)[,|]")


def build_store(folder: Path, arch: str, batch_size: int) -> Path:
    torch.manual_seed(0)
    save_checkpoint(build_model(arch), folder / "victim.pt")
    torch.manual_seed(1)
    save_checkpoint(build_model(arch), folder / "surrogate.pt")
    store = folder / "store"
    for name, (defense, batch_invariant) in VARIANTS.items():
        config = folder / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "minWorkers": 1, "maxWorkers": 1, "batchSize": batch_size, "maxBatchDelay": 200,
            "responseTimeout": 120, "defense": defense,
            "input": {"channels": 1, "height": 28, "width": 28, "threads": 1},
            "handler": {"batch_invariant": batch_invariant},
        }))
        build_archive(name, "1.0", folder / "victim.pt", config, store,
                      surrogate=folder / "surrogate.pt")
    return store


def per_batch(log: Path) -> dict[str, list[dict[str, float]]]:
    """``{model: [{"size", "handler_ms", "defense_ms"}, ...]}`` in batch order."""
    batches: dict[str, list[dict[str, float]]] = {}
    current: dict[str, dict[str, float]] = {}
    seen: set[str] = set()
    for line in log.read_text(errors="replace").splitlines():
        match = LINE.search(line)
        if not match or line in seen:  # the frontend logs each metric line twice
            continue
        seen.add(line)
        metric, value, model = match.group(1), float(match.group(2)), match.group(3)
        entry = current.setdefault(model, {})
        if metric == "DefenseTime":
            entry["defense_ms"] = value
        elif metric == "DefendedAnswers":
            entry["size"] = value
        else:
            entry["handler_ms"] = value
            if "size" in entry:
                batches.setdefault(model, []).append(entry)
            current[model] = {}
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        store = build_store(folder, args.arch, args.batch_size)
        specs = [f"{name}={name}.mar" for name in VARIANTS]
        server = start_server(store, specs, workdir=folder / "ts", ports=Ports.free())
        try:
            token = server.tokens().inference
            images = [png(seed) for seed in range(args.batch_size)]
            for name in VARIANTS:
                for i in range(args.rounds + 2):  # lone requests: batch 1
                    predict_raw(server.inference_url, f"/predictions/{name}", token,
                                images[i % len(images)])
                for _ in range(args.rounds + 2):  # bursts: one full batch each
                    barrier = threading.Barrier(len(images))

                    def send(image: bytes, name: str = name, barrier=barrier) -> int:
                        barrier.wait()
                        return predict_raw(server.inference_url, f"/predictions/{name}",
                                           token, image).status_code

                    with ThreadPoolExecutor(len(images)) as pool:
                        assert set(pool.map(send, images)) == {200}
            batches = per_batch(server.log_dir / "ts_log.log")
        finally:
            stop_server(server.workdir)
    print(f"{args.arch}, 1 torch thread per worker; median over batches (ms)")
    print(f"{'model':>14} {'batch':>5} {'n':>4} {'handler':>8} {'defense':>8}")
    for name in VARIANTS:
        rows = batches.get(name, [])[2:]  # skip warm-up
        for size in (1, args.batch_size):
            chosen = [r for r in rows if int(r["size"]) == size]
            if not chosen:
                continue
            handler = statistics.median(r["handler_ms"] for r in chosen)
            defense = statistics.median(r.get("defense_ms", float("nan")) for r in chosen)
            print(f"{name:>14} {size:5d} {len(chosen):4d} {handler:8.2f} {defense:8.2f}")


if __name__ == "__main__":
    main()
