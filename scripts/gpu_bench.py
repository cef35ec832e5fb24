"""Victim alone against victim + plain GRAD² and victim + ``grad2_gated``, on a GPU.

One command for the day a GPU is lent (issue 24)::

    .venv/bin/python scripts/gpu_bench.py --out gpu_bench.json          # CUDA, full table
    .venv/bin/python scripts/gpu_bench.py --device cpu --quick          # a dry run on a CPU

Cases: the demo's ``small_cnn`` at 1x28x28 (K = 10, surrogate as large) and a ResNet-50
victim at 3x224x224 (K = 1000) with a ResNet-18 and a MobileNetV3-small surrogate. Each
item (``victim``, ``victim+grad2``, ``victim+grad2_gated``) runs at batch 1, 32 and 128
(``--batches``); on CUDA it is timed with CUDA events around each call, elsewhere with
``time.perf_counter``; items of a case run in interleaved rounds and are summarised by
medians, and a ratio is the median over rounds of (item / victim) in the same round. The
networks are untrained (their cost does not depend on their weights); both defenses are
the shipped examples' ``defense:`` sections (``grad2``; the recommended ``grad2_gated``
with a feature gate staged as ``grad2 bench-serve`` stages it). Writes a JSON table (with
the peak CUDA memory of each item and issue 24's GPU goal: victim + ``grad2_gated`` <= 1.3x
the victim at batch 32) and prints it; an item that fails records its error instead of
stopping the run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import Tensor

from grad2.defenses import build_defense
from grad2.lab.bench_serve import bench_gate, example_defense
from grad2.models import build_model

#: name -> (victim arch, surrogate arch, channels, side, classes)
CASES: dict[str, tuple[str, str, int, int, int]] = {
    "small_cnn": ("small_cnn", "small_cnn", 1, 28, 10),
    "resnet50+resnet18": ("torchvision:resnet50", "torchvision:resnet18", 3, 224, 1000),
    "resnet50+mobilenet_v3_small": ("torchvision:resnet50", "torchvision:mobilenet_v3_small",
                                    3, 224, 1000),
}
#: Issue 24's GPU goal: victim + recommended defense / victim at this batch, at most this.
GOAL_BATCH, GOAL_RATIO = 32, 1.3


class Timer:
    """Milliseconds of one call: CUDA events on a GPU, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, run: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        started = time.perf_counter()
        run()
        return (time.perf_counter() - started) * 1e3


def build_items(case: str, device: torch.device) -> tuple[dict[str, Callable[[Tensor], object]],
                                                           tuple[int, int, int]]:
    """The timed items of ``case`` (``x -> answers``) and its input shape ``(C, H, W)``.
    Both defenses are built by :func:`grad2.defenses.build_defense` from the shipped
    examples' ``defense:`` sections (``grad2`` and the recommended ``grad2_gated``), the
    gate as ``grad2 bench-serve`` stages it (a mean per class, 1% of images flagged)."""
    victim_arch, surrogate_arch, channels, side, classes = CASES[case]
    torch.manual_seed(0)
    victim = build_model(victim_arch, classes, channels).eval()
    surrogate = build_model(surrogate_arch, classes, channels).eval()
    reference = torch.randn(64, channels, side, side)
    gate_tensors, threshold, slope = bench_gate(surrogate, reference, classes)
    victim, surrogate = victim.to(device), surrogate.to(device)
    plain = build_defense(example_defense("grad2"), surrogate)
    section = example_defense("grad2_gated") | {"gate_threshold": threshold,
                                                  "gate_slope": slope}
    gated = build_defense(section, surrogate, {
        "mapping_key": b"k" * 32,
        "gate_file": {name: tensor.to(device) for name, tensor in gate_tensors.items()}})

    def clean(x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.softmax(victim(x).float(), dim=1)

    def defended(defense: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        return lambda x: defense(x, clean(x))

    items = {"victim": clean, "victim+grad2": defended(plain),
             "victim+grad2_gated": defended(gated)}
    return items, (channels, side, side)


def run_case(case: str, device: torch.device, batches: list[int], warmup: int,
             rounds: int) -> dict:
    """``{batch: {item: {median_ms, ratio} | {error}}}`` for one case."""
    items, shape = build_items(case, device)
    timer = Timer(device)
    table: dict[str, dict] = {}
    for batch in batches:
        x = torch.randn(batch, *shape, device=device)
        times: dict[str, list[float]] = {name: [] for name in items}
        peak_mb: dict[str, float] = dict.fromkeys(items, 0.0)
        errors: dict[str, str] = {}
        for round_index in range(warmup + rounds):
            for name, item in items.items():
                if name in errors:
                    continue
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    elapsed = timer(lambda item=item, x=x: item(x))
                except Exception as error:  # recorded: the rest of the table still runs
                    errors[name] = f"{type(error).__name__}: {error}"
                    continue
                if device.type == "cuda":
                    peak_mb[name] = max(peak_mb[name],
                                        torch.cuda.max_memory_allocated(device) / 2**20)
                if round_index >= warmup:
                    times[name].append(elapsed)
        row: dict[str, dict] = {}
        for name, values in times.items():
            if name in errors:
                row[name] = {"error": errors[name]}
                continue
            entry = {"median_ms": statistics.median(values)}
            if device.type == "cuda":
                entry["peak_allocated_mb"] = round(peak_mb[name], 1)
            if name != "victim" and "victim" not in errors:
                entry["ratio"] = statistics.median(
                    value / base for value, base in zip(values, times["victim"], strict=True))
            row[name] = entry
        table[str(batch)] = row
        print(f"{case:>28} batch {batch:>4}: " + ", ".join(
            f"{name} {entry.get('median_ms', float('nan')):.2f} ms"
            + (f" ({entry['ratio']:.2f}x)" if "ratio" in entry else "")
            + (f" [{entry['error'][:60]}]" if "error" in entry else "")
            for name, entry in row.items()), flush=True)
    return table


def goals(cases: dict[str, dict]) -> list[dict]:
    """Issue 24's GPU goal per case: victim + ``grad2_gated`` / victim at batch
    :data:`GOAL_BATCH` <= :data:`GOAL_RATIO` (``None``: not measured)."""
    rows = []
    for case, table in cases.items():
        entry = table.get(str(GOAL_BATCH), {}).get("victim+grad2_gated", {})
        ratio = entry.get("ratio")
        rows.append({"goal": f"{case}: victim + grad2_gated <= {GOAL_RATIO}x victim at batch "
                     f"{GOAL_BATCH}", "measured": ratio,
                     "met": None if ratio is None else ratio <= GOAL_RATIO})
    return rows


def commit() -> str | None:
    """The checkout's short commit, if this runs from one."""
    try:
        return subprocess.run(["git", "log", "-1", "--format=%h"], capture_output=True,
                              text=True, check=True, timeout=30,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true",
                        help="small case only, batches 1 and 4, 1 warm-up and 3 rounds")
    parser.add_argument("--out", type=Path, default=Path("gpu_bench.json"))
    args = parser.parse_args()
    if args.quick:
        args.cases, args.batches, args.warmup, args.rounds = ["small_cnn"], [1, 4], 1, 3
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; pass --device cpu for a dry run")
    torch.backends.cudnn.benchmark = False
    if device.type == "cpu":
        torch.set_num_threads(1)  # the serving default (input.threads: 1)
    cases = {case: run_case(case, device, args.batches, args.warmup, args.rounds)
             for case in args.cases}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__, "commit": commit(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "timer": "cuda events" if device.type == "cuda" else "perf_counter",
        "warmup": args.warmup, "rounds": args.rounds, "cases": cases, "goals": goals(cases),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for row in result["goals"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[row["met"]]
        print(f"{row['goal']}: {row['measured']} ({verdict})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
