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
networks are untrained (their cost does not depend on their weights); the gate is fitted on
seeded random features. Writes a JSON table and prints it; an item that fails records its
error instead of stopping the run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from grad2 import gate
from grad2.defenses import GRAD2, GatedGRAD2
from grad2.models import build_model, penultimate

#: name -> (victim arch, surrogate arch, channels, side, classes)
CASES: dict[str, tuple[str, str, int, int, int]] = {
    "small_cnn": ("small_cnn", "small_cnn", 1, 28, 10),
    "resnet50+resnet18": ("torchvision:resnet50", "torchvision:resnet18", 3, 224, 1000),
    "resnet50+mobilenet_v3_small": ("torchvision:resnet50", "torchvision:mobilenet_v3_small",
                                    3, 224, 1000),
}


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
    """The timed items of ``case`` (``x -> answers``) and its input shape ``(C, H, W)``."""
    victim_arch, surrogate_arch, channels, side, classes = CASES[case]
    torch.manual_seed(0)
    victim = build_model(victim_arch, classes, channels).eval().to(device)
    surrogate = build_model(surrogate_arch, classes, channels).eval().to(device)
    reference = torch.randn(64, channels, side, side, device=device)
    features = penultimate(surrogate, reference)
    gate_tensors = {name: tensor.to(device) for name, tensor in gate.fit_feature_gate(
        features.cpu(), torch.arange(64) % min(classes, 8), classes).items()}
    threshold = float(gate.feature_score(features, gate_tensors).median())
    plain = GRAD2(surrogate, 0.5)
    gated = GatedGRAD2(surrogate, 0.2, 2.0, threshold, 1.0, "permute",
                       gate.keyed_mapping(b"k" * 32, classes).to(device),
                       gate_tensors=gate_tensors)

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
        errors: dict[str, str] = {}
        for round_index in range(warmup + rounds):
            for name, item in items.items():
                if name in errors:
                    continue
                try:
                    elapsed = timer(lambda item=item, x=x: item(x))
                except Exception as error:  # recorded: the rest of the table still runs
                    errors[name] = f"{type(error).__name__}: {error}"
                    continue
                if round_index >= warmup:
                    times[name].append(elapsed)
        row: dict[str, dict] = {}
        for name, values in times.items():
            if name in errors:
                row[name] = {"error": errors[name]}
                continue
            entry = {"median_ms": statistics.median(values)}
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
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__, "timer": "cuda events" if device.type == "cuda"
        else "perf_counter", "warmup": args.warmup, "rounds": args.rounds,
        "cases": {case: run_case(case, device, args.batches, args.warmup, args.rounds)
                  for case in args.cases},
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
