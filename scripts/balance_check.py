"""Does the class balance of ``grad2 evaluate --balance`` hold beyond its references?

For each thief pool and each misdirection defense of the balance sweep (plain and balanced,
with and without preserve_top1), prints the marginal gap ``‖mean ỹ − mean y‖₁`` on the
2,000 reference images the offsets were fitted on, on the pool's other images (never seen
by the fit), on the thief's 4,000 queries, and on the Fashion-MNIST test set (honest users),
with the share of the most frequent receiving class on the other images. Uses the lab
folder of the run (models and targets cached there).

    .venv/bin/python scripts/balance_check.py runs/lk2
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from grad2.balance import marginal_gap
from grad2.lab.data import pool_indices, thief_pool, to_tensor
from grad2.lab.evaluate import DefenseSpec, Lab, apply_defense, receivers
from grad2.lab.train import set_threads
from grad2.models import predict_probs

DEFENSES = (("grad2_misdirect_top1", 2.0), ("grad2_misdirect_balanced_top1", 2.0),
            ("grad2_misdirect_top1", 1.0), ("grad2_misdirect_balanced_top1", 1.0),
            ("grad2_misdirect", 0.5), ("grad2_misdirect_balanced", 0.5))


def main(folder: str) -> None:
    set_threads(1)
    lab = Lab(Path(folder), progress=False)
    print("| pool | defense | ε | references | other pool images | thief's queries | "
          "Fashion test | top receiver share (other) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for pool in ("animal", "fashion_heldout"):
        whole = thief_pool(pool)
        fitted = pool_indices(len(whole), 2000, seed=99)  # Lab.references
        queries = pool_indices(len(whole), 4000, seed=0)  # the thief's queries
        other = np.setdiff1d(np.arange(len(whole)), fitted)
        sets = {
            "references": to_tensor(whole.subset(fitted).images),
            "other": to_tensor(whole.subset(other).images),
            "queries": to_tensor(whole.subset(queries).images),
            "test": lab.test_inputs,
        }
        clean = {name: predict_probs(lab.victim, x) for name, x in sets.items()}
        for family, epsilon in DEFENSES:
            defense = lab.defense(DefenseSpec(family, epsilon), pool)
            gaps, share = [], 0.0
            for name, x in sets.items():
                answers = apply_defense(defense, x, clean[name], progress=False)
                gaps.append(float(marginal_gap(answers, clean[name]).abs().sum()))
                if name == "other":
                    moved = receivers(clean[name], answers)
                    moved = moved[moved >= 0]
                    share = np.bincount(moved, minlength=10).max() / max(len(moved), 1)
            print(f"| {pool} | {family} | {epsilon:g} | "
                  + " | ".join(f"{gap:.3f}" for gap in gaps) + f" | {share:.0%} |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/lk2")
