"""The floor under the ImageNet-case throughput ratio: in process, one thread, a batch of 16
at 224 px, the ResNet-50 victim's forward next to GRAD² with each surrogate (wall time and
the time inside PyTorch operators, ``torch.profiler`` self CPU time of every ``aten::``
operator), and the best ratio victim / (victim + defense) that arithmetic allows
(docs/performance.md, "Issue 24", goals table).

Run: ``MKL_CBWR=AUTO,STRICT .venv/bin/python scripts/imagenet_floor.py [--repeats 3]``
(random weights: time does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lone_floor import operator_ms

from grad2.defenses import GRAD2
from grad2.models import build_model, set_memory_format

SURROGATES = ("torchvision:mobilenet_v3_small", "torchvision:resnet18")


def wall_ms(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def network(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return set_memory_format(build_model(arch, 1000, 3).eval(), "channels_last")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    probs = torch.softmax(torch.randn(args.batch, 1000), dim=1)
    victim = network("torchvision:resnet50")
    with torch.no_grad():
        victim_ms = wall_ms(lambda: victim(x), args.repeats)
    print(f"ResNet-50 forward, batch {args.batch}: {victim_ms:.0f} ms\n")
    print("| surrogate | forward ms | GRAD² wall ms | GRAD² operators ms | GRAD² / forward "
          "| defense / victim | best throughput ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arch in SURROGATES:
        surrogate = network(arch)
        defense = GRAD2(surrogate, 0.5, "all_ones")

        def defended(defense=defense) -> torch.Tensor:
            return defense(x, probs)

        with torch.no_grad():
            forward = wall_ms(lambda surrogate=surrogate: surrogate(x), args.repeats)
        with torch.enable_grad():
            wall = wall_ms(defended, args.repeats)
            operators = operator_ms(defended, 1)
        share = operators / victim_ms
        print(f"| {arch.removeprefix('torchvision:')} | {forward:.0f} | {wall:.0f} | "
              f"{operators:.0f} | {wall / forward:.1f} | {share:.3f} | {1 / (1 + share):.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
