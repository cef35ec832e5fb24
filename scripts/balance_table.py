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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from grad2.evaluate import aggregate, read_journal, with_prior_rows

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


PLOTTED = (("none", 0.0, "none"), ("top1", 0.0, "top-1 label\n(labels-only floor)"),
           ("reverse_sigmoid", 0.7, "reverse\nsigmoid 0.7"),
           ("control_shuffled_balanced_top1", 2.0, "balanced,\nshuffled"),
           ("grad2_misdirect_top1", 2.0, "misdirection\ntop-1 ε2"),
           ("grad2_misdirect_balanced_top1", 2.0, "balanced\ntop-1 ε2"))


def plot(summary: dict, out: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    width = 0.27
    for axis, pool, title in zip(axes, POOLS, ("Animal-MNIST queries", "held-out Fashion-MNIST")):
        for offset, thief in zip((-width, 0, width), ("soft", "prior", "arch")):
            values = [summary.get((pool, thief, family, knob), {}).get("clone", float("nan"))
                      for family, knob, _ in PLOTTED]
            errors = [summary.get((pool, thief, family, knob), {}).get("clone_std", 0.0)
                      for family, knob, _ in PLOTTED]
            positions = [index + offset for index in range(len(PLOTTED))]
            axis.bar(positions, values, width, yerr=[0 if e != e else e for e in errors],
                     label={"soft": "soft thief", "prior": "prior-correcting thief",
                            "arch": "other architecture (seed 0)"}[thief], capsize=2)
        axis.set_xticks(range(len(PLOTTED)), [label for *_, label in PLOTTED], fontsize=7)
        axis.set_title(title, fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("clone accuracy on Fashion-MNIST test (%)")
    axes[0].legend(fontsize=7)
    figure.suptitle("label-keeping defenses (no defender accuracy lost): mean ± std over 3-5 seeds")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main(folder: str, png: str | None = None) -> None:
    summary = aggregate(with_prior_rows(list(read_journal(Path(folder)).values())))
    if png:
        plot(summary, Path(png))
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
