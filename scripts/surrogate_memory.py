"""Where a worker's memory goes when it adds a GRAD² surrogate: RSS after each step of
loading and first use (docs/performance.md, "Real sizes", the memory goal).

Run: ``MKL_CBWR=AUTO,STRICT .venv/bin/python scripts/surrogate_memory.py
[torchvision:resnet18] [224]`` (uses only the public API and glibc's ``malloc_trim``, so
``PYTHONPATH=/path/to/checkout`` measures another checkout's code). A small network's forward
runs first and a plain forward pass of the surrogate before the defense is built: the
runtime's own first-use memory, which a worker pays for its victim anyway, is not
counted as the defense's. ``malloc_trim(0)`` is what the worker's loader calls after
loading and after its batch plans (``grad2.serve.loader.release_free_memory``).
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

    def rss(trim: bool = False) -> float:
        gc.collect()
        if trim:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        return process.memory_info().rss / 2**20

    x = torch.randn(16, 3, side, side).contiguous(memory_format=torch.channels_last)
    probs = torch.softmax(torch.randn(16, 1000), dim=1)
    with torch.no_grad():  # the runtime's first use, as a victim's would be
        build_model("small_cnn", 10, 3).eval()(x[:2, :, :28, :28])
    steps = [("before the surrogate", rss(trim=True))]
    torch.manual_seed(0)
    surrogate = set_memory_format(build_model(arch, 1000, 3).eval(), "channels_last")
    weights = sum(p.numel() * p.element_size() for p in surrogate.parameters()) / 2**20
    steps.append((f"surrogate weights ({weights:.1f} MB of parameters)", rss(trim=True)))
    with torch.no_grad():
        surrogate(x[:2])
    steps.append(("a plain forward (the runtime's first use; not counted)", rss(trim=True)))
    counted_from = len(steps) - 1
    defense = GRAD2(surrogate, 0.5, "all_ones")
    steps.append(("all_ones target", rss()))
    with torch.enable_grad():
        defense(x[:2], probs[:2])
        steps.append(("first batch of 2 (folding, tangent program, buffers)", rss()))
        defense(x[:1], probs[:1])
        steps.append(("lone-query plan and a lone query", rss()))
        defense(x, probs)
        steps.append(("a batch of 16", rss()))
    steps.append(("after malloc_trim(0) (memory glibc held but the process freed)",
                  rss(trim=True)))
    for (_, before), (label, after) in itertools.pairwise(steps):
        print(f"{label:64s} {after - before:+7.1f} MB")
    total = steps[-1][1] - steps[0][1] - (steps[counted_from][1] - steps[counted_from - 1][1])
    print(f"{'total: weights and defense (the runtime first use left out)':64s} "
          f"{total:+7.1f} MB")
    print(f"{'total less the parameters (goal: <= 50 MB)':64s} {total - weights:+7.1f} MB")


if __name__ == "__main__":
    main()
