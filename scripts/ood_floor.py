"""What an out-of-distribution thief keeps from the answers the gate leaves alone: the
clone it trains on the queries of its pool that the feature gate does not flag (α < ½).
A gated defense answers those within its small in-distribution budget, so at the gate's
calibrated threshold (its ≤ 1-point honest cost) no answer to the flagged queries, however
destructive, can push a thief that drops them below this clone: it bounds issue 23's
out-of-distribution goal from below for this gate.

The OOD study's defender (cached in ``GRAD2_CACHE/eval``) answers the ``animal`` pool
(4,000 Animal-MNIST queries); the unflagged queries keep their undefended answers
(``none``: the bound for any answer to the flagged ones) or their ``grad2_gated_permute``
answers (a thief that knew which answers were altered). Soft clones of ``small_cnn`` and
of the other architecture (``wide_cnn``), over seeds, accuracy on the Fashion-MNIST test
split; each clone takes as many SGD steps as a clone of the whole pool, retrained at a
tenth of the rate if it collapsed (as every lab thief).

    GRAD2_CACHE=.cache .venv/bin/python scripts/ood_floor.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json

import torch

from grad2 import gate
from grad2.lab import ood
from grad2.lab.data import cache_dir
from grad2.lab.evaluate import Lab
from grad2.lab.train import step_matched_epochs
from grad2.tools.progress import progress_bar

ARCHES = ("small_cnn", ood.MISMATCH_ARCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pool", default=ood.MAIN_POOL)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lab = Lab(cache_dir() / "eval", progress=False)
    defender = ood.Defender(lab, progress=False, names=("none", ood.RECOMMENDED))
    inputs, _, _ = defender.answers("none", args.pool)
    alpha = gate.gate_weight(defender.gate_scores(inputs), defender.knobs[ood.RECOMMENDED],
                             defender.feature_slope)
    kept = alpha < 0.5
    epochs = step_matched_epochs(ood.CLONE_EPOCHS, len(inputs), int(kept.sum()))
    jobs = [(name, arch) for name in ("none", ood.RECOMMENDED) for arch in ARCHES]
    rows = []
    for name, arch in progress_bar(jobs, desc="clones"):
        _, _, answers = defender.answers(name, args.pool)
        accuracies = ood.seed_accuracies(lab, inputs[kept], answers[kept], args.seeds, arch,
                                         epochs=epochs)
        row = ood.seed_row(accuracies, answers=name, arch=arch, queries=int(kept.sum()))
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{args.pool}: the {rows[0]['queries']} of {len(inputs)} queries the gate does not "
          f"flag, {epochs} epochs, seeds {args.seeds}")
    print(ood.seed_table(rows, {"answers to the unflagged queries": "answers",
                                "clone": "arch"}))


if __name__ == "__main__":
    main()
