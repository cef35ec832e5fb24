"""What restricting GRAD²'s target to the surrogate's last layers saves
(``defense.target_layers``): the time of the JVP scores restricted to the last N
parameterised layers, of the full JVP and of a plain surrogate forward, in one run.

Run: ``MKL_CBWR=AUTO,STRICT .venv/bin/python scripts/score_cost.py [--repeats 5]``
(one thread; small_cnn at 28 px, batch 1 and 16; torchvision resnet18 at 224 px, batch 1
and 8; channels-last as served; the all-ones target; median of ``--repeats`` calls after
a warm-up call, interleaved; prints a markdown table, times in ms and ratios to the full JVP and to
the forward).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from grad2 import targets
from grad2.models import build_model, set_memory_format
from grad2.scores import nonzero_directions, redirection_scores
from grad2.tools.progress import progress_bar

#: (architecture, classes, input shape, batch sizes, restricted layer counts).
CASES = (
    ("small_cnn", 10, (1, 28, 28), (1, 16), (1, 2, 3)),
    ("torchvision:resnet18", 1000, (3, 224, 224), (1, 8), (1, 2, 4, 8)),
)


def interleaved_ms(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median wall time in ms of each call, over ``rounds`` rounds that call each once in
    turn (after one warm-up call each: folding, tangent programs, lone plans), so that a
    load that drifts meets every variant alike."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def case_rows(arch: str, classes: int, shape: tuple[int, ...], batch: int,
              layer_counts: tuple[int, ...], repeats: int) -> list[tuple[str, float]]:
    """``[(variant, ms)]``: forward, full JVP, then each restriction."""
    torch.manual_seed(0)
    model = set_memory_format(build_model(arch, classes, shape[0]).eval(), "channels_last")
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    full = targets.all_ones(model)

    def forward() -> object:
        with torch.no_grad():
            return model(x)

    calls = {"forward": forward, "full JVP": lambda: redirection_scores(model, x, full)}
    for layers in layer_counts:
        restricted = nonzero_directions(targets.restrict(full, model, layers))
        calls[f"last {layers}"] = lambda target=restricted: redirection_scores(model, x,
                                                                               target)
    return list(interleaved_ms(calls, repeats).items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    jobs = [(arch, classes, shape, batch, counts)
            for arch, classes, shape, batches, counts in CASES for batch in batches]
    print("| surrogate | batch | scores | ms | / full JVP | / forward |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for arch, classes, shape, batch, counts in progress_bar(jobs, desc="cases"):
        rows = case_rows(arch, classes, shape, batch, counts, args.repeats)
        forward, full = rows[0][1], rows[1][1]
        for variant, ms in rows:
            print(f"| {arch.removeprefix('torchvision:')} {shape[-1]} px | {batch} | "
                  f"{variant} | {ms:.2f} | {ms / full:.2f} | {ms / forward:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
