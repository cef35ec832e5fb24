"""The floor under a lone defended query: in process, one thread, the served path of
``GRAD2`` and ``grad2_gated`` on a batch of one after ``plan_batches`` (as a worker runs
it), its wall time next to the time spent inside PyTorch operators (``torch.profiler``
self CPU time of every ``aten::`` operator: what remains with no Python at all), and the
allowance a throughput goal leaves (docs/performance.md, "Issue 24: the lone-query floor").

Run: ``MKL_CBWR=AUTO,STRICT .venv/bin/python scripts/lone_floor.py [--plain-ms 7.1]
[--goal 0.85]`` (``--plain-ms``: the plain model's wall time per lone request through
TorchServe, from ``grad2 bench-serve --concurrency 1``; the allowance is
``plain_ms / goal - plain_ms``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gated_cost import defenses
from torch.profiler import ProfilerActivity, profile


def wall_ms(fn, repeats: int) -> float:
    """Median over 5 rounds of the mean wall time of ``repeats`` calls."""
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        rounds.append((time.perf_counter() - start) / repeats * 1e3)
    return statistics.median(rounds)


def operator_ms(fn, repeats: int) -> float:
    """Self CPU time per call of every ``aten::`` operator (profiler overhead included)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    return sum(event.self_cpu_time_total for event in prof.key_averages()
               if event.key.startswith("aten::")) / repeats / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plain-ms", type=float, default=7.1)
    parser.add_argument("--goal", type=float, default=0.85)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = (1, 28, 28)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(64, *shape, generator=generator).contiguous(
        memory_format=torch.channels_last)
    probs = torch.softmax(torch.randn(64, 10, generator=generator), dim=1)
    print(f"allowance at {args.goal}x of a {args.plain_ms} ms plain answer: "
          f"{args.plain_ms / args.goal - args.plain_ms:.2f} ms per lone query\n")
    print("| defense (small_cnn, lone query) | lone path | wall ms | aten operators ms |")
    print("| --- | --- | ---: | ---: |")
    with torch.enable_grad():
        for defense in defenses("small_cnn", shape):
            defense.plan_batches(x, probs, 32)
            row, row_probs = x[:1], probs[:1]

            def call(defense=defense, row=row, row_probs=row_probs):
                return defense(row, row_probs)

            for _ in range(50):
                call()
            path = "alone (planned)" if defense.lone else "as a pair"
            print(f"| {type(defense).__name__} | {path} | {wall_ms(call, args.repeats):.2f} | "
                  f"{operator_ms(call, args.repeats):.2f} |", flush=True)
        surrogate = defense.surrogate
    with torch.no_grad():
        forward = wall_ms(lambda: surrogate(x[:1]), args.repeats)
    print(f"\nsurrogate forward alone (no tangent): {forward:.2f} ms")


if __name__ == "__main__":
    main()
