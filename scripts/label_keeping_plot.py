"""Bar chart of the label-keeping run (``grad2 evaluate --label-keeping``): clone accuracy
per defense for the soft thief (mean ± std over seeds), the prior-correcting thief and the
other-architecture thief (seed 0), one panel per thief pool.

Run: ``.venv/bin/python scripts/label_keeping_plot.py docs/results/label_keeping
docs/results/label_keeping/label_keeping.png`` (the folder holds ``runs.jsonl``)
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from grad2.evaluate import read_journal, with_prior_rows

#: (family, knob, label), in plot order.
POINTS = [
    ("none", 0.0, "none"),
    ("top1", 0.0, "top-1 label only"),
    ("grad2_misdirect", 0.5, "misdirection ε0.5 (flips)"),
    ("reverse_sigmoid", 0.7, "reverse sigmoid β0.7"),
    ("grad2_top1", 2.0, "GRAD² all_ones top-1 ε2"),
    ("control_random_scores_top1", 2.0, "control: random scores top-1 ε2"),
    ("control_fixed_class_top1", 2.0, "control: fixed class top-1 ε2"),
    ("control_shuffled_misdirect_top1", 2.0, "control: shuffled misdirection top-1 ε2"),
    ("grad2_misdirect_top1", 2.0, "misdirection top-1 ε2"),
]
THIEVES = [("soft", "soft"), ("prior", "prior-correcting"), ("arch", "other architecture")]


def main(folder: Path, out: Path) -> None:
    runs = with_prior_rows(list(read_journal(folder).values()))

    def values(pool: str, thief: str, family: str, knob: float) -> list[float]:
        return [100 * r.clone_accuracy for r in runs
                if (r.pool, r.thief, r.defense, r.knob) == (pool, thief, family, knob)]

    pools = sorted({r.pool for r in runs})
    figure, axes = plt.subplots(1, len(pools), figsize=(7 * len(pools), 5), sharey=True)
    width = 0.27
    for axis, pool in zip(np.atleast_1d(axes), pools):
        positions = np.arange(len(POINTS))
        for offset, (thief, label) in enumerate(THIEVES):
            cells = [values(pool, thief, family, knob) for family, knob, _ in POINTS]
            means = [np.mean(c) if c else np.nan for c in cells]
            errors = [np.std(c, ddof=1) if len(c) > 1 else 0 for c in cells]
            axis.barh(positions + (offset - 1) * width, means, width, xerr=errors,
                      label=label, capsize=2)
        axis.set_yticks(positions, [label for _, _, label in POINTS], fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel("clone test accuracy (%)")
        axis.set_title(f"thief pool {pool}", fontsize=10)
        axis.grid(axis="x", alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8, loc="lower right")
    figure.suptitle("label-keeping defenses (no defender accuracy lost) against three thieves")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
