"""The class-balance table of docs/results.md from a ``grad2 evaluate --balance`` journal.

Per defense and pool: effective L1 and defender accuracy on the Fashion-MNIST test set,
soft and prior-correcting clones (mean ± std over seeds), the share of the soft gain the
prior-correcting thief leaves (``kept``), and the other-architecture clone (seed 0). With
a second argument, also a bar chart of the soft, prior-correcting and other-architecture
clones of the label-keeping defenses.

    .venv/bin/python scripts/balance_table.py docs/results/balance \
        docs/results/balance/balance.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from grad2.lab.evaluate import aggregate, read_journal, thief_bars, with_prior_rows

ROWS = (("none", 0.0), ("top1", 0.0), ("grad2_misdirect", 0.25),
        ("grad2_misdirect_balanced", 0.25), ("grad2_misdirect", 0.5),
        ("grad2_misdirect_balanced", 0.5), ("grad2_misdirect", 0.7),
        ("grad2_misdirect_balanced", 0.7),
        ("reverse_sigmoid", 0.7), ("control_shuffled_misdirect_top1", 2.0),
        ("control_shuffled_balanced_top1", 2.0), ("grad2_misdirect_top1", 1.0),
        ("grad2_misdirect_balanced_top1", 1.0), ("grad2_misdirect_top1", 2.0),
        ("grad2_misdirect_balanced_top1", 2.0))
POOLS = ("animal", "fashion_heldout")


def cell(summary: dict, key: tuple) -> str:
    if key not in summary:
        return "—"
    point = summary[key]
    spread = "" if point["seeds"] < 2 else f" ± {point['clone_std']:.1f}"
    return f"{point['clone']:.1f}{spread}"


PLOTTED = (("none", 0.0, "none"), ("top1", 0.0, "top-1 label (labels-only floor)"),
           ("reverse_sigmoid", 0.7, "reverse sigmoid β0.7"),
           ("control_shuffled_misdirect_top1", 2.0, "control: shuffled misdirection top-1 ε2"),
           ("control_shuffled_balanced_top1", 2.0, "control: shuffled balanced top-1 ε2"),
           ("grad2_misdirect_top1", 2.0, "misdirection top-1 ε2"),
           ("grad2_misdirect_balanced_top1", 2.0, "balanced misdirection top-1 ε2"))


def main(folder: str, png: str | None = None) -> None:
    runs = with_prior_rows(list(read_journal(Path(folder)).values()))
    summary = aggregate(runs)
    if png:
        thief_bars(runs, PLOTTED, Path(png), "label-keeping defenses (no defender accuracy "
                   "lost): mean ± std over 3-5 seeds")
    header = ["defense", "ε"] + [f"{p} {c}" for p in ("Animal", "held-out")
                                  for c in ("L1", "defender %", "soft", "prior", "kept", "arch")]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for family, knob in ROWS:
        cells = [family, f"{knob:g}"]
        for pool in POOLS:
            soft = summary.get((pool, "soft", family, knob))
            if soft is None:
                cells += ["—"] * 6
                continue
            base = summary[(pool, "soft", "none", 0.0)]["clone"]
            prior_base = summary[(pool, "prior", "none", 0.0)]["clone"]
            prior = summary[(pool, "prior", family, knob)]["clone"]
            gain = base - soft["clone"]
            kept = f"{(prior_base - prior) / gain:.0%}" if gain > 1 else "—"
            cells += [f"{soft['l1']:.2f}", f"{soft['defender']:.2f}",
                      cell(summary, (pool, "soft", family, knob)),
                      cell(summary, (pool, "prior", family, knob)), kept,
                      cell(summary, (pool, "arch", family, knob))]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
