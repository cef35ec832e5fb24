"""Where the JVP scores spend their time: ``torch.profiler`` over repeated calls, folded and
unfolded (docs/performance.md, "Batch-norm folding").

Run: ``.venv/bin/python scripts/profile_jvp.py small_cnn 32`` (1 thread; prints each
variant's share of self CPU time per operator, largest first).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from grad2 import targets
from grad2.models import build_model
from grad2.scores import path_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arch")
    parser.add_argument("batch", type=int)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(1)
    surrogate = build_model(args.arch).eval()
    target = targets.all_ones(surrogate)
    x = torch.randn(args.batch, 1, 28, 28)
    for fold in (True, False):
        for _ in range(5):
            path_scores(surrogate, x, target, "rules" if fold else "rules_unfolded")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.calls):
                path_scores(surrogate, x, target, "rules" if fold else "rules_unfolded")
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        print(f"{'folded' if fold else 'not folded'}: {total / args.calls / 1e3:.2f} ms a call")
        for event in events[: args.top]:
            print(f"  {event.key:40s} {100 * event.self_cpu_time_total / total:5.1f}%")


if __name__ == "__main__":
    main()
