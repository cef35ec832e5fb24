"""A bounded soak on the session's TorchServe: 2,000 requests at concurrency 32 into a
batching model (batchSize 8, maxBatchDelay 50 ms), one in twenty hostile. Zero 5xx, zero
lost requests, every hostile request its own 4xx, every answer defended (checked against
the epsilon-0 twin) and byte-identical to the same image's answer alone, and the worker's
memory flat after warm-up. ``scripts/soak.py`` is the same soak at full size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import EPSILON_V1
from ts_client import CLASS_NAMES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"
REQUESTS, WARMUP, CONCURRENCY = 2000, 400, 32
#: Allowed growth of the worker's RSS between the end of warm-up and the end of the soak.
RSS_GROWTH = 0.10


def load_soak():
    """``scripts/soak.py`` as a module (registered first: its dataclasses need that)."""
    if "soak" not in sys.modules:
        spec = importlib.util.spec_from_file_location("soak", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["soak"] = module
        spec.loader.exec_module(module)
    return sys.modules["soak"]


def test_soak_zero_5xx_every_answer_defended_memory_flat(
    server, inference_token, management_token
) -> None:
    soak = load_soak()
    url = f"{server.inference_url}/predictions/fashion/1.0"
    load = soak.workload(images=48)
    templates = load.templates
    expected = soak.answers_alone(url, inference_token, templates)
    clean = {index: soak.as_vector(text, CLASS_NAMES) for index, text in soak.answers_alone(
        f"{server.inference_url}/predictions/fashion_clean", inference_token, templates
    ).items()}
    workers = soak.worker_processes(server.management_url, management_token, "fashion", "1.0")
    assert len(workers) == 1

    warm = soak.soak(url, inference_token, load, WARMUP, CONCURRENCY)
    before = soak.rss_mb(workers)
    rest = soak.soak(url, inference_token, load, REQUESTS - WARMUP, CONCURRENCY,
                     start=WARMUP)
    after = soak.rss_mb(workers)

    outcomes = warm.outcomes + rest.outcomes
    assert len(outcomes) == REQUESTS
    statuses = warm.statuses + rest.statuses
    assert not [s for s in statuses if s >= 500 or s == 0], statuses
    hostile = sum(n for s, n in statuses.items() if 400 <= s < 500)
    assert hostile == REQUESTS // 20, statuses
    problems = (soak.violations(warm, templates, expected, clean, EPSILON_V1, CLASS_NAMES)
                + soak.violations(rest, templates, expected, clean, EPSILON_V1, CLASS_NAMES))
    assert not problems, "\n".join(problems[:20])
    assert after <= before * (1 + RSS_GROWTH), f"worker RSS {before:.0f} -> {after:.0f} MB"
    print(f"\nsoak: {REQUESTS} requests, {rest.throughput:.0f} req/s, p50 "
          f"{rest.latency_ms(0.5):.0f} ms, p99 {rest.latency_ms(0.99):.0f} ms, "
          f"worker RSS {before:.0f} -> {after:.0f} MB, statuses {dict(statuses)}")
