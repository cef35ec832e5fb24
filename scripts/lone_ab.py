"""Lone queries: the whole query as a pair with itself (before) against the lone plan
(only the layers that differ at batch 1 paired), for the victim's forward and the JVP
scores; checks that both give the same bits (docs/performance.md, "Real sizes").

Run: ``MKL_CBWR=AUTO,STRICT .venv/bin/python scripts/lone_ab.py``
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from grad2 import targets
from grad2.batching import module_lone_plan, run_lone
from grad2.models import build_model, set_memory_format
from grad2.scores import redirection_scores

CASES = (("torchvision:resnet50", (3, 224, 224), 1000, "forward"),
         ("torchvision:resnet18", (3, 224, 224), 1000, "jvp"),
         ("torchvision:mobilenet_v3_small", (3, 224, 224), 1000, "jvp"),
         ("small_cnn", (1, 28, 28), 10, "jvp"))


def median_ms(fn: Callable[[], object], calls: int = 5) -> float:
    fn()
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - began))
    return statistics.median(times)


def measure(arch: str, shape: tuple[int, ...], classes: int, what: str) -> None:
    """One line: the pair's and the plan's median ms, and whether their bits agree."""
    torch.manual_seed(0)
    model = set_memory_format(build_model(arch, classes, shape[0]).eval(), "channels_last")
    x = torch.randn(1, *shape).contiguous(memory_format=torch.channels_last)
    pair = torch.cat([x, x])
    if what == "forward":
        plan = module_lone_plan(model, x)
        with torch.no_grad():
            same = plan is not None and torch.equal(run_lone(model, x, plan), model(pair)[:1])
            planned = median_ms(lambda: run_lone(model, x, plan))
            paired = median_ms(lambda: model(pair))
        layers = "whole pair" if plan is None else f"{len(plan)} layer(s) paired"
    else:
        target = targets.all_ones(model)
        alone = redirection_scores(model, x, target)  # plans on first use
        same = torch.equal(alone, redirection_scores(model, pair, target)[:1])
        planned = median_ms(lambda: redirection_scores(model, x, target))
        paired = median_ms(lambda: redirection_scores(model, pair, target))
        layers = "lone plan"
    print(f"{arch} {what} {'x'.join(map(str, shape))}: as a pair {paired:.1f} ms, "
          f"planned {planned:.1f} ms ({layers}); same bits: {same}", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    for case in CASES:
        measure(*case)


if __name__ == "__main__":
    main()
