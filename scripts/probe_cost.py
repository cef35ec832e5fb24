"""What checking each batch size on several windows costs a worker's start: the batch-plan
probe (``ServedModel.plan_batches``) of a GRAD² archive timed three ways in one run, on
random-weight networks of the given architectures.

    MKL_CBWR=AUTO,STRICT OMP_NUM_THREADS=1 .venv/bin/python scripts/probe_cost.py

``one window``: every size checked on one window of rows (the probe before stop 29's fix);
``four windows, every size``: every size on :data:`grad2.batching.PROBE_WINDOWS` windows;
``now``: :func:`grad2.batching.probe_sizes` (every size on one window, the sizes up to the
fastest on all four). Each is run twice; the planned sizes vary with timing noise.
"""

from __future__ import annotations

import argparse
import time

import torch

import grad2.defenses.base as defense_base
import grad2.serve.loader as loader
from grad2 import batching
from grad2.config import InputConfig
from grad2.defenses import GRAD2
from grad2.models import build_model


def cut_at_fastest(windows: int):
    """A probe that checks every size on ``windows`` windows, then keeps the sizes up to
    the fastest."""
    def probe(fn, inputs, max_batch: int) -> tuple[int, ...]:
        seconds = batching.time_agreeing_sizes(fn, inputs, max_batch, windows=windows)
        if not seconds:
            return ()
        fastest = min(seconds, key=seconds.__getitem__)
        return tuple(size for size in seconds if size <= fastest)
    return probe


PROBES = {"one window": cut_at_fastest(1),
          "four windows, every size": cut_at_fastest(batching.PROBE_WINDOWS),
          "now": batching.probe_sizes}
#: (architecture, channels, side, batchSize) measured by default.
CASES = (("small_cnn", 1, 28, 32), ("torchvision:resnet18", 3, 224, 16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| network, batchSize | probe | seconds | victim sizes | defense sizes |")
    print("| --- | --- | --- | --- | --- |")
    for arch, channels, side, max_batch in CASES:
        torch.manual_seed(0)
        victim = build_model(arch, 10, channels).eval()
        surrogate = build_model(arch, 10, channels).eval()
        spec = InputConfig.from_dict({"channels": channels, "height": side, "width": side})
        for _ in range(args.repeats):
            for name, probe in PROBES.items():
                loader.probe_sizes = defense_base.probe_sizes = probe
                served = loader.ServedModel(victim=victim, defense=GRAD2(surrogate, 0.6),
                                            defense_config=None, input_config=spec,
                                            class_names=[str(k) for k in range(10)])
                started = time.perf_counter()
                plan = served.plan_batches(max_batch)
                seconds = time.perf_counter() - started
                print(f"| {arch}, {max_batch} | {name} | {seconds:.1f} | "
                      f"{batching.describe_sizes(plan['victim'])} | "
                      f"{batching.describe_sizes(plan['defense'])} |", flush=True)


if __name__ == "__main__":
    main()
