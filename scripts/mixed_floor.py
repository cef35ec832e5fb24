"""What a mixed thief keeps whatever a defense does to its out-of-distribution queries:
the clone it trains on its 500 in-distribution queries alone (it knows which of its
queries are its own Fashion-MNIST-like images). A defense that answers in-distribution
queries honestly (≤ 1 point of honest accuracy) cannot push the best mixed thief below
this clone, so it bounds issue 23's mixed-thief goal from below.

The OOD study's defender (cached in ``GRAD2_CACHE/eval``) answers the 500 held-out
Fashion-MNIST images of the ``mixed`` pool (``fashion_extra``) undefended and through
``grad2_gated_permute``; for each, soft and labels-only clones of ``small_cnn`` and of
the other architecture (``wide_cnn``), over seeds, accuracy on the Fashion-MNIST test
split. Each clone takes as many SGD steps as a clone of a 4,000-query pool (12 epochs
there, 96 here), retrained at a tenth of the rate if it collapsed (as every lab thief).

    GRAD2_CACHE=.cache .venv/bin/python scripts/mixed_floor.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json

import torch

from grad2.lab import ood
from grad2.lab.data import cache_dir
from grad2.lab.evaluate import Lab
from grad2.lab.train import step_matched_epochs
from grad2.tools.progress import progress_bar

PART = "fashion_extra"
ARCHES = ("small_cnn", ood.MISMATCH_ARCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    lab = Lab(cache_dir() / "eval", progress=False)
    defender = ood.Defender(lab, progress=False, names=("none", ood.RECOMMENDED))
    jobs = [(name, arch, labels) for name in ("none", ood.RECOMMENDED) for arch in ARCHES
            for labels in (False, True)]
    rows = []
    for name, arch, labels in progress_bar(jobs, desc="clones"):
        inputs, _, answers = defender.answers(name, PART)
        epochs = step_matched_epochs(ood.CLONE_EPOCHS, ood.QUERIES, len(inputs))
        accuracies = ood.seed_accuracies(lab, inputs, answers, args.seeds, arch, labels, epochs)
        row = ood.seed_row(accuracies, defense=name, arch=arch,
                           thief="labels" if labels else "soft", queries=len(inputs))
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{PART}: the mixed pool's {rows[0]['queries']} in-distribution queries alone, "
          f"seeds {args.seeds}")
    print(ood.seed_table(rows, {"defense": "defense", "clone": "arch", "thief": "thief"}))


if __name__ == "__main__":
    main()
