"""Where a worker's memory goes when it adds a GRAD² surrogate: RSS after each step of
loading and first use (docs/performance.md, "Real sizes", the memory goal).

Run: ``MKL_CBWR=AUTO,STRICT .venv/bin/python scripts/surrogate_memory.py
[torchvision:resnet18] [224]``
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import sys

import psutil
import torch

from grad2.defenses import GRAD2
from grad2.models import build_model, set_memory_format


def main() -> None:
    arch = sys.argv[1] if len(sys.argv) > 1 else "torchvision:resnet18"
    side = int(sys.argv[2]) if len(sys.argv) > 2 else 224
    torch.set_num_threads(1)
    process = psutil.Process()

    def rss() -> float:
        gc.collect()
        return process.memory_info().rss / 2**20

    steps = [("before the surrogate", rss())]
    torch.manual_seed(0)
    surrogate = set_memory_format(build_model(arch, 1000, 3).eval(), "channels_last")
    steps.append(("surrogate weights", rss()))
    defense = GRAD2(surrogate, 0.5, "all_ones")
    steps.append(("all_ones target (one tangent per parameter)", rss()))
    x = torch.randn(16, 3, side, side).contiguous(memory_format=torch.channels_last)
    probs = torch.softmax(torch.randn(16, 1000), dim=1)
    with torch.enable_grad():
        defense(x[:2], probs[:2])
        steps.append(("first batch of 2 (folding, tangent program, buffers)", rss()))
        defense(x[:1], probs[:1])
        steps.append(("lone-query plan and a lone query", rss()))
        defense(x, probs)
        steps.append(("a batch of 16", rss()))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    steps.append(("after malloc_trim(0) (memory glibc held but the process freed)", rss()))
    for (_, before), (label, after) in itertools.pairwise(steps):
        print(f"{label:64s} {after - before:+7.1f} MB")
    total = steps[-1][1] - steps[0][1]
    print(f"{'total over the process before the surrogate':64s} {total:+7.1f} MB")


if __name__ == "__main__":
    main()
