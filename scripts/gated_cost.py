"""In-process cost of ``grad2_gated`` (feature gate, permute) next to plain GRAD², in one
run: the defense alone on a fixed batch, median of interleaved calls (docs/performance.md,
"Issue 24").

Run: ``MKL_CBWR=AUTO,STRICT .venv/bin/python scripts/gated_cost.py [--repeats 30]``; to
time another checkout's code: ``PYTHONPATH=/path/to/checkout .venv/bin/python
scripts/gated_cost.py`` (uses only the public API). One thread; small_cnn 28 px at batch
1 and 32, torchvision mobilenet_v3_small 64 px at batch 1 and 16, channels-last.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from grad2 import gate
from grad2.defenses import GRAD2, GatedGRAD2
from grad2.models import build_model, penultimate, set_memory_format
from grad2.tools.progress import progress_bar

#: (architecture, input shape, batch sizes).
CASES = (("small_cnn", (1, 28, 28), (1, 32)),
         ("torchvision:mobilenet_v3_small", (3, 64, 64), (1, 16)))


def defenses(arch: str, shape: tuple[int, ...]) -> tuple[GRAD2, GatedGRAD2]:
    torch.manual_seed(0)
    surrogate = set_memory_format(build_model(arch, 10, shape[0]).eval(), "channels_last")
    reference = torch.randn(64, *shape, generator=torch.Generator().manual_seed(1))
    features = penultimate(surrogate, reference)
    gate_tensors = gate.fit_feature_gate(features, torch.arange(64) % 10, 10)
    threshold = float(gate.feature_score(features, gate_tensors).median())
    gated = GatedGRAD2(surrogate, 0.2, 2.0, threshold, 0.05, "permute",
                       gate.keyed_mapping(b"k" * 32, 10), gate_tensors=gate_tensors)
    return GRAD2(surrogate, 0.2), gated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| surrogate | batch | GRAD² ms | grad2_gated ms | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    jobs = [(arch, shape, batch) for arch, shape, batches in CASES for batch in batches]
    for arch, shape, batch in progress_bar(jobs, desc="cases"):
        plain, gated = defenses(arch, shape)
        generator = torch.Generator().manual_seed(2)
        x = torch.randn(batch, *shape, generator=generator).contiguous(
            memory_format=torch.channels_last)
        probs = torch.softmax(torch.randn(batch, 10, generator=generator), dim=1)
        times: dict[str, list[float]] = {"plain": [], "gated": []}
        with torch.enable_grad():
            plain(x, probs), gated(x, probs)  # warm-up: folding, programs, lone plans
            for _ in range(args.repeats):
                for name, defense in (("plain", plain), ("gated", gated)):
                    start = time.perf_counter()
                    defense(x, probs)
                    times[name].append((time.perf_counter() - start) * 1e3)
        a, b = statistics.median(times["plain"]), statistics.median(times["gated"])
        print(f"| {arch.removeprefix('torchvision:')} | {batch} | {a:.2f} | {b:.2f} | "
              f"{b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
