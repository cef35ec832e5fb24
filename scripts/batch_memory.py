"""What a batch of 16 ImageNet-sized queries leaves in a worker's memory: the victim's
forward alone, then victim + GRAD², RSS after the batches, after ``malloc_trim(0)`` and the
peak during them (``VmHWM``, reset between phases), with glibc's default allocation
policy or with a fixed mmap threshold (``--mmap-threshold``: large blocks are mapped and
returned to the system on free instead of kept in the heap). docs/performance.md,
"Issue 24: the working set at c = 16".

Run: ``MKL_CBWR=AUTO,STRICT .venv/bin/python scripts/batch_memory.py
[--surrogate torchvision:mobilenet_v3_small] [--mmap-threshold 131072]`` (one thread,
random weights: memory does not depend on them).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time

import psutil
import torch

from grad2.defenses import GRAD2
from grad2.models import build_model, set_memory_format
from grad2.serve.loader import release_free_memory

LIBC = ctypes.CDLL("libc.so.6")
M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim", default="torchvision:resnet50")
    parser.add_argument("--surrogate", default="torchvision:resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="bytes; 0: glibc's default (dynamic) policy")
    parser.add_argument("--trim-each", action="store_true",
                        help="malloc_trim(0) after every batch (its time is reported)")
    args = parser.parse_args()
    if args.mmap_threshold:
        assert LIBC.mallopt(M_MMAP_THRESHOLD, args.mmap_threshold) == 1
    torch.set_num_threads(1)
    process = psutil.Process()

    def rss() -> float:
        gc.collect()
        return process.memory_info().rss / 2**20

    torch.manual_seed(0)
    victim = set_memory_format(build_model(args.victim, 1000, 3).eval(), "channels_last")
    surrogate = set_memory_format(build_model(args.surrogate, 1000, 3).eval(),
                                  "channels_last")
    defense = GRAD2(surrogate, 0.5, "all_ones")
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        probs = torch.softmax(victim(x[:2]), dim=1)
    with torch.enable_grad():
        defense(x[:2], probs)  # folding, program: the defense's fixed memory
    release_free_memory()
    print(f"victim {args.victim}, surrogate {args.surrogate}, batch {args.batch} x "
          f"{args.batches}, mmap threshold {args.mmap_threshold or 'dynamic (default)'}\n")
    print("| phase | ms per batch | trim ms | RSS before | peak | RSS after | after malloc_trim |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for phase in ("victim", "victim + GRAD2"):
        before = rss()
        reset_peak()
        start, trim_s = time.perf_counter(), 0.0
        for _ in range(args.batches):
            with torch.no_grad():
                probs = torch.softmax(victim(x), dim=1)
            if phase != "victim":
                with torch.enable_grad():
                    defense(x, probs)
            if args.trim_each:
                started = time.perf_counter()
                release_free_memory()
                trim_s += time.perf_counter() - started
        elapsed = (time.perf_counter() - start) / args.batches * 1e3
        peak, after = status_mb("VmHWM"), rss()
        release_free_memory()
        trim_ms = f"{trim_s / args.batches * 1e3:.1f}" if args.trim_each else "–"
        print(f"| {phase} | {elapsed:.0f} | {trim_ms} | {before:.0f} | {peak:.0f} | {after:.0f} | "
              f"{rss():.0f} |", flush=True)


if __name__ == "__main__":
    main()
