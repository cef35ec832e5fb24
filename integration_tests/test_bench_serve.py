"""``grad2 bench-serve`` end to end on a real TorchServe, in miniature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from grad2.cli import main
from grad2.defenses import DEFENSES
from grad2.serve.templates import template_path

pytestmark = pytest.mark.integration


def test_bench_serve_times_plain_grad2_gated_and_the_floor(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    assert main(["bench-serve", "--concurrency", "1,4", "--requests", "12", "--rounds", "2",
                 "--warmup", "8", "--floor", "--json", str(report), "--plot",
                 str(tmp_path / "b.png"), "--no-progress"]) == 0
    result = json.loads(report.read_text())
    models = ["plain", "grad2", "grad2_gated", "torchserve_floor"]
    assert result["models"] == models
    assert [level["concurrency"] for level in result["levels"]] == [1, 4]
    for level in result["levels"]:
        for model in models:
            measured = level[model]
            # every timed request answered (2 rounds x 12), none refused or lost
            assert measured["statuses"] == {"200": 24}
            assert len(measured["rounds"]) == 2
            assert 0 < measured["p50_ms"] <= measured["p99_ms"]
            for memory in (measured["memory_after_warmup"], measured["memory_at_end"]):
                assert memory["workers"] == 1 and 0 < memory["uss_mb"] <= memory["rss_mb"]
                assert memory["batch_size"] == level["concurrency"]  # as served
        for model in models[:3]:  # the handler's own metrics, from TorchServe's log
            times = level[model]["worker_times"]
            assert times["batches"] >= 1 and times["handler_ms"] >= times["defense_ms"] > 0
        assert level["torchserve_floor"]["worker_times"] is None  # it logs none
        assert set(level["ratios"]) == set(models[1:])
        assert all(ratio["throughput"] > 0 for ratio in level["ratios"].values())
        (gated,) = level["gated_over_grad2"].values()
        assert gated["cost"] > 0 and gated["p99"] > 0

    # the recommended configuration as the README ships it, its files staged and fitted
    shipped = yaml.safe_load(template_path("model-configs/grad2_gated.yaml").read_text())
    served = result["variants"]["grad2_gated"]["defense"]
    assert {k: v for k, v in served.items() if not k.startswith("gate_")} == {
        k: v for k, v in shipped["defense"].items() if not k.startswith("gate_")}
    assert served["gate_score"] == "features" and served["gate_file"] == "gate.pt"
    assert served["gate_threshold"] != shipped["defense"]["gate_threshold"]
    assert result["variants"]["grad2"]["defense"]["method"] == "grad2"
    assert 0.05 < result["surrogate_weight_mb"]["small_cnn"] < 1  # small_cnn: 29k parameters

    goals = [row["goal"] for row in result["goals"]]
    for model in ("grad2", "grad2_gated"):
        own = [goal for goal in goals if goal.startswith(f"{model} ") and " / " not in goal]
        assert len(own) == 3  # lone throughput, lone p99, RSS
    assert sum(goal.startswith("grad2_gated / grad2") for goal in goals) == 2  # per level
    assert not any(goal.startswith("torchserve_floor") for goal in goals)
    markdown = (tmp_path / "bench.md").read_text()
    assert "| 4 | grad2_gated |" in markdown and "grad2_gated against grad2" in markdown
    assert result["commit"]["head"] and result["command"].startswith("grad2 bench-serve")
    assert (tmp_path / "b.png").stat().st_size > 0


def test_bench_serve_serves_every_defense(tmp_path: Path) -> None:
    report = tmp_path / "all.json"
    assert main(["bench-serve", "--defenses", "all", "--concurrency", "2", "--requests", "4",
                 "--rounds", "1", "--warmup", "2", "--set", "epsilon=0.3", "--json",
                 str(report), "--no-progress"]) == 0
    result = json.loads(report.read_text())
    methods = {variant["method"] for variant in result["variants"].values()}
    assert methods == set(DEFENSES)  # plain is the `none` method
    (level,) = result["levels"]
    for model in result["models"]:
        assert level[model]["statuses"] == {"200": 4}, model
    budgeted = [v["defense"] for v in result["variants"].values() if "epsilon" in v["defense"]]
    assert budgeted and all(section["epsilon"] == 0.3 for section in budgeted)
