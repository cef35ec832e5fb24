"""``grad2 bench`` in a tiny configuration: the JSON has every section, every time is > 0.

No timing assertions: this only proves the benchmark runs end to end and reports sanely.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from grad2 import cli
from grad2.lab import bench

TINY = [
    "bench", "--batches", "1,2", "--classes", "10,20", "--class-batch", "2",
    "--reference-batch", "2", "--reference-classes", "10,20", "--mad-loop-queries", "1",
    "--repeats", "2", "--warmup", "1", "--budget", "0.05",
    "--solver-rows", "20", "--solver-classes", "10", "--solver-top1", "--resnet-batch", "1",
    "--resnet-size", "32", "--threads", "1", "--no-progress",
]


def times_in(node, path=""):
    """Every ``*_s`` number and every entry of every ``times_s`` list, with its path."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "times_s":
                yield from ((f"{path}.{key}[{i}]", v) for i, v in enumerate(value))
            elif key.endswith("_s") and isinstance(value, int | float):
                yield f"{path}.{key}", value
            else:
                yield from times_in(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from times_in(value, f"{path}[{i}]")


def test_tiny_benchmark_writes_complete_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    try:
        assert cli.main([*TINY, "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "goals:" in printed and "victim+grad2_jvp" in printed

    result = json.loads(out.read_text())
    assert set(result) >= {"meta", "models", "per_batch", "scores", "classes", "reference",
                           "solver", "compile", "goals"}
    assert result["meta"]["threads"] == 1 and result["meta"]["device"] == "cpu"
    assert result["models"]["surrogate_params"]["half"] < result["models"]["victim_params"]

    names = {(r["name"], r["surrogate"]) for r in result["per_batch"]}
    for method in ("grad2_jvp", "grad2_double_backward", "grad2_finite_difference",
                   "grad2_jvp_top1", "mad", "mad_argmax", "mad_closed_form"):
        for size in ("same", "half"):
            assert (f"victim+{method}", size) in names
    assert {("victim", None), ("victim+reverse_sigmoid", None), ("victim+random", None)} <= names
    assert {r["batch"] for r in result["per_batch"]} == {1, 2}
    assert len(result["scores"]) == 4  # 2 batches x 2 surrogates
    assert [c["classes"] for c in result["classes"]] == [10, 20]
    assert all("mad_over_grad2" in c and "mad_skipped" not in c for c in result["classes"])
    assert [r["classes"] for r in result["reference"]] == [10, 20]
    assert all(r["max_abs_difference"] < 1e-4 for r in result["reference"])  # GRAD²s agree
    assert all(c["mad_loop_max_abs_difference"] < 1e-4 for c in result["classes"])  # MADs too
    assert all(c["mad_closed_form_max_abs_difference"] < 1e-4 for c in result["classes"])
    assert all(c["mad_closed_form_over_grad2"] > 0 for c in result["classes"])
    assert result["solver"]["resnet18_input"] == [1, 3, 32, 32]
    assert {g["goal"] for g in result["goals"]} == set(bench.GOALS)

    found = list(times_in(result))
    assert len(found) > 100
    for path, value in found:
        assert math.isfinite(value) and value > 0, path


def test_mad_too_big_for_the_memory_limit_is_skipped_with_a_reason(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    tiny = [a if a != "10,20" else "10" for a in TINY]
    try:
        assert cli.main([*tiny, "--mad-memory-gb", "0", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    (record,) = json.loads(out.read_text())["classes"]
    assert "GiB per query" in record["mad_skipped"] and "mad_s" not in record
    assert record["mad_loop_per_query_s"] > 0  # the one-query-at-a-time MAD still runs
    assert record["mad_closed_form_per_query_s"] > 0  # so does the closed form (no Jacobian)


def test_quick_defaults_and_argument_checks():
    parser = cli.build_parser("bench")
    args = bench.resolve(parser.parse_args(["bench", "--quick"]))
    assert args.batches == [1, 32] and args.repeats == 5 and args.resnet_size == 32
    args = bench.resolve(parser.parse_args(["bench"]))
    assert args.batches == [1, 8, 32, 128] and args.classes == [10, 100, 1000]
    assert (args.solver_rows, args.solver_classes, args.resnet_size) == (10_000, 1_000, 224)
    assert cli.main(["bench", "--epsilon", "3", "--no-progress"]) == 2


def test_bench_serve_goals_per_variant_and_case() -> None:
    """Each defended model is judged against plain at issue 24's concurrency levels, gated
    GRAD² against plain GRAD² at every level, each worker's RSS against its surrogate."""
    from grad2.lab.bench_serve import goals

    def level(concurrency: int, throughput: float, p99: float, cost: float) -> dict:
        memory = {"memory_after_warmup": {"rss_mb": 1100.0}}
        return {"concurrency": concurrency,
                "ratios": {"grad2_gated-resnet18": {"throughput": throughput, "p99": p99},
                           "torchserve_floor": {"throughput": 3.0, "p99": 0.2}},
                "gated_over_grad2": {"resnet18": {"cost": cost}},
                "plain": {"memory_at_end": {"rss_mb": 1000.0}, **memory},
                "grad2_gated-resnet18": {"memory_at_end": {"rss_mb": 1000.0 + cost * 80},
                                         **memory}}

    variants = {"plain": {"surrogate": None},
                "grad2_gated-resnet18": {"surrogate": "resnet18"}}
    rows = goals([level(1, 0.95, 1.25, 1.05), level(16, 0.89, 2.0, 1.2)], "imagenet",
                 variants, {"resnet18": 44.6})
    verdicts = {row["goal"]: row["met"] for row in rows}
    assert verdicts == {
        "grad2_gated-resnet18 throughput >= 0.9x plain at concurrency 16": False,
        "grad2_gated-resnet18 p99 <= 1.2x plain at concurrency 1": False,
        "grad2_gated / grad2 time per answer (resnet18) <= 1.1x at concurrency 1": True,
        "grad2_gated / grad2 time per answer (resnet18) <= 1.1x at concurrency 16": False,
        # the larger growth of the two levels: 1.2 x 80 = 96 MB > 44.6 + 50
        "grad2_gated-resnet18 worker RSS - plain <= surrogate weights (44.60 MB) + 50 MB":
            False,
    }


def test_bench_serve_plans_every_served_defense_from_its_shipped_example() -> None:
    from grad2.defenses import DEFENSES, parse_config
    from grad2.lab.bench_serve import example_defense, parse_overrides, plan_variants

    variants = plan_variants(list(DEFENSES), ["resnet18", "mobilenet"],
                             parse_overrides(["epsilon=0.3"]))
    names = [v.name for v in variants]
    assert names[0] == "plain" and len(names) == len(set(names))
    assert {v.method for v in variants} == set(DEFENSES)
    for variant in variants:
        section = variant.defense
        assert parse_config(section).method == variant.method  # a valid section
        assert section.get("epsilon", 0.3) == 0.3 or variant.name == "plain"
        if DEFENSES[variant.method].needs_surrogate:
            assert variant.name == f"{variant.method}-{variant.surrogate}"
        else:
            assert (variant.name, variant.surrogate) in {(variant.method, None), ("plain", None)}
    assert example_defense("grad2_gated")["gate_score"] == "features"
    small = plan_variants(["grad2", "grad2_gated"], ["small_cnn"])
    assert [v.name for v in small] == ["plain", "grad2", "grad2_gated"]
    with pytest.raises(ValueError, match="no benched method takes it"):
        plan_variants(["top1"], ["small_cnn"], {"epsilon": 0.3})
    with pytest.raises(ValueError, match="unknown defense"):
        plan_variants(["grad3"], ["small_cnn"])


def test_bench_serve_gate_has_a_mean_per_class_and_flags_one_percent() -> None:
    from grad2.gate import check_feature_gate, feature_score, gate_weight
    from grad2.lab.bench_serve import bench_gate
    from grad2.models import build_model, penultimate

    torch.manual_seed(0)
    surrogate = build_model("small_cnn", 10, 1).eval()
    x = torch.randn(200, 1, 28, 28)
    tensors, threshold, slope = bench_gate(surrogate, x, 10)
    check_feature_gate(tensors, penultimate(surrogate, x[:1]).shape[1])
    assert tensors["means"].shape[0] == 10
    flagged = (feature_score(penultimate(surrogate, x), tensors) < threshold).float().mean()
    assert flagged <= 0.02 and slope > 0
    assert gate_weight(feature_score(penultimate(surrogate, x), tensors), threshold,
                       slope).median() < 0.5
