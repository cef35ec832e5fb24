"""Interleaved A/B of the two ``handler.memory_format`` layouts: one network's plain
forward pass (as the handler's victim runs it) and its JVP scores (as GRAD² runs them),
contiguous (NCHW) against channels-last (NHWC), on one thread.

Run: ``.venv/bin/python scripts/layout_ab.py small_cnn 1,28,28 1,16 15`` (also
``resnet18_gray 1,28,28``, ``wide_cnn 1,28,28``, ``torchvision:mobilenet_v3_small
3,64,64``, ``torchvision:resnet18 3,224,224``); prints medians (ms) and the medians of
per-round ratios channels-last / contiguous (below 1: channels-last is faster).
"""

from __future__ import annotations

import argparse
import copy

import torch

from grad2 import targets
from grad2.lab.bench import Item, Timer, paired_ratio, victim_forward
from grad2.models import build_model, set_memory_format
from grad2.scores import redirection_scores

LAYOUTS = ("contiguous", "channels_last")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arch")
    parser.add_argument("shape", help="C,H,W of one input")
    parser.add_argument("batches", help="e.g. 1,16")
    parser.add_argument("rounds", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = tuple(int(part) for part in args.shape.split(","))
    torch.manual_seed(0)
    base = build_model(args.arch, 10, shape[0]).eval()
    networks = {layout: set_memory_format(copy.deepcopy(base), layout) for layout in LAYOUTS}
    # Each network's own target, in its layout (as GRAD2 aligns its target at construction:
    # a target of another layout would be converted, and the fold redone, on every call).
    network_targets = {layout: targets.all_ones(network) for layout, network in networks.items()}
    timer = Timer(torch.device("cpu"), args.rounds, 3, 30.0, progress=True)
    for batch in (int(part) for part in args.batches.split(",")):
        x = torch.randn(batch, *shape)
        items = []
        for layout, network in networks.items():
            items.append(Item(f"forward {layout}", lambda n=network, x=x: victim_forward(n, x)))
            items.append(Item(f"scores {layout}", lambda n=network, x=x, t=network_targets[layout]:
                              redirection_scores(n, x, t)))
        timed = {summary["name"]: summary for summary in timer.run(items, f"batch {batch}")}
        medians = " ".join(f"{name} {summary['median_s'] * 1e3:.2f}"
                           for name, summary in timed.items())
        forward = paired_ratio(timed["forward channels_last"], timed["forward contiguous"])
        scores = paired_ratio(timed["scores channels_last"], timed["scores contiguous"])
        print(f"{args.arch} {args.shape} B={batch}: {medians} ms | channels-last / contiguous: "
              f"forward {forward:.2f}, scores {scores:.2f}", flush=True)

if __name__ == "__main__":
    main()
