"""``grad2 bench-serve`` end to end on a real TorchServe, in miniature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grad2.cli import main

pytestmark = pytest.mark.integration


def test_bench_serve_times_both_models_and_reads_their_workers(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    assert main(["bench-serve", "--concurrency", "1,4", "--requests", "12", "--rounds", "2",
                 "--warmup", "8", "--json", str(report), "--plot", str(tmp_path / "b.png"),
                 "--no-progress"]) == 0
    result = json.loads(report.read_text())
    assert [level["concurrency"] for level in result["levels"]] == [1, 4]
    for level in result["levels"]:
        for model in ("plain", "defended"):
            measured = level[model]
            # every timed request answered (2 rounds x 12), none refused or lost
            assert measured["statuses"] == {"200": 24}
            assert len(measured["rounds"]) == 2
            assert 0 < measured["p50_ms"] <= measured["p99_ms"]
            memory = measured["memory_at_end"]
            assert memory["workers"] == 1 and 0 < memory["uss_mb"] <= memory["rss_mb"]
        assert level["throughput_ratio"] > 0
    assert 0.05 < result["surrogate_weight_mb"]["defended"] < 1  # small_cnn: 29k parameters
    assert {row["goal"].split()[0] for row in result["goals"]} == {"defended"}
    assert (tmp_path / "b.png").stat().st_size > 0
