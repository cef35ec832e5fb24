"""Bar chart of the label-keeping run (``grad2 evaluate --label-keeping``): clone accuracy
per defense for the soft thief (mean ± std over seeds), the prior-correcting thief and the
other-architecture thief (seed 0), one panel per thief pool.

Run: ``.venv/bin/python scripts/label_keeping_plot.py docs/results/label_keeping
docs/results/label_keeping/label_keeping.png`` (the folder holds ``runs.jsonl``)
"""

from __future__ import annotations

import sys
from pathlib import Path

from grad2.lab.evaluate import read_journal, thief_bars, with_prior_rows

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


def main(folder: Path, out: Path) -> None:
    runs = with_prior_rows(list(read_journal(folder).values()))
    thief_bars(runs, POINTS, out,
               "label-keeping defenses (no defender accuracy lost) against three thieves")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
