"""Interleaved A/B of the JVP engine's paths: explicit tangent rules (the default), and
``forward_ad`` with and without batch-norm folding (docs/performance.md, "Tangent rules"
and "Batch-norm folding").

For one architecture and each batch size: the victim's forward alone, one plain forward
of the surrogate, and for each variant victim + GRAD² (the victim's forward, the scores
and the solver) and the JVP scores alone, timed in interleaved rounds on one thread;
prints medians (ms) and the medians of per-round ratios. A lone query's JVP runs as a
batch of two, as the library does.

Run: ``.venv/bin/python scripts/tangent_ab.py small_cnn 1,28,28 1,16,32 25``
(also ``wide_cnn``, ``torchvision:resnet18 3,32,32``, ``torchvision:mobilenet_v3_small
3,32,32``); ``--memory-format contiguous`` runs both networks in NCHW instead of the
serving default, channels-last.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from grad2 import targets
from grad2.config import MEMORY_FORMATS
from grad2.defenses import GRAD2
from grad2.lab.bench import victim_forward
from grad2.models import build_model, set_memory_format
from grad2.scores import path_scores

#: (label, path of grad2.scores.JVP_PATHS)
VARIANTS = (("jvp", "rules"), ("jvp forward_ad", "forward_ad"),
            ("jvp forward_ad unfolded", "forward_ad_unfolded"))


def timed_rounds(items: dict[str, Callable[[], object]], rounds: int, calls: int
                 ) -> dict[str, list[float]]:
    """Per item, the mean ms of ``calls`` calls in each of ``rounds`` interleaved rounds."""
    for item in items.values():
        for _ in range(3):
            item()
    times: dict[str, list[float]] = {name: [] for name in items}
    for _ in range(rounds):
        for name, item in items.items():
            began = time.perf_counter()
            for _ in range(calls):
                item()
            times[name].append((time.perf_counter() - began) / calls * 1e3)
    return times


def ratio(times: dict[str, list[float]], top: str, bottom: str) -> float:
    """Median over rounds of ``top / bottom`` measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[top], times[bottom], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arch")
    parser.add_argument("shape", help="C,H,W of one input")
    parser.add_argument("batches", help="e.g. 1,16,32")
    parser.add_argument("rounds", type=int)
    parser.add_argument("--memory-format", choices=MEMORY_FORMATS, default="channels_last")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = tuple(int(part) for part in args.shape.split(","))
    torch.manual_seed(0)
    victim = set_memory_format(build_model(args.arch, 10, shape[0]).eval(), args.memory_format)
    torch.manual_seed(1)
    surrogate = set_memory_format(build_model(args.arch, 10, shape[0]).eval(),
                                  args.memory_format)
    target = targets.all_ones(surrogate)
    defense = GRAD2(surrogate, 0.5, target)
    for batch in (int(part) for part in args.batches.split(",")):
        x = torch.randn(batch, *shape)

        def forward(x: torch.Tensor = x) -> torch.Tensor:
            with torch.no_grad():
                return surrogate(torch.cat([x, x]) if len(x) == 1 else x)

        items: dict[str, Callable[[], object]] = {
            "victim": lambda x=x: victim_forward(victim, x), "forward": forward}
        for label, path in VARIANTS:
            def scores(x: torch.Tensor = x, path: str = path) -> torch.Tensor:
                return path_scores(surrogate, x, target, path)

            def defended(x: torch.Tensor = x, scores: Callable = scores) -> torch.Tensor:
                probs = victim_forward(victim, x)
                return defense.solve(probs, scores(x).to(probs.dtype))

            items[f"defended {label}"], items[f"scores {label}"] = defended, scores
        times = timed_rounds(items, args.rounds, max(2, 64 // batch))

        medians = " ".join(f"{name} {statistics.median(t):.2f}" for name, t in times.items())
        ratios = " ".join(
            f"{label}: scores/forward {ratio(times, f'scores {label}', 'forward'):.2f}, "
            f"defended/victim {ratio(times, f'defended {label}', 'victim'):.2f};"
            for label, *_ in VARIANTS)
        print(f"{args.arch} B={batch}: {medians} ms | {ratios}", flush=True)


if __name__ == "__main__":
    main()
