"""How much the secret mapping's draw changes grad2_gated's effect: the study's defender
(cached in GRAD2_CACHE/eval) with KEYS keys, soft and labels-only clones on 4,000
Animal-MNIST queries, seed 0. Prints one row per key and the spread.

    GRAD2_CACHE=.cache .venv/bin/python scripts/key_spread.py
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from grad2 import gate
from grad2.defenses import GatedGRAD2
from grad2.lab import ood
from grad2.lab.data import FASHION_CLASSES, cache_dir
from grad2.lab.evaluate import Lab, apply_defense
from grad2.tools.progress import progress_bar

KEYS = 8


def main() -> None:
    lab = Lab(cache_dir() / "eval", progress=False)
    defender = ood.Defender(lab, progress=False, names=("grad2_gated_permute",))
    inputs, clean, _ = defender.answers("none", ood.MAIN_POOL)
    rows = []
    for index in progress_bar(range(KEYS), desc="keys"):
        key = hashlib.sha256(f"key spread {index}".encode()).digest()
        mapping = gate.keyed_mapping(key, 10)
        defense = GatedGRAD2(defender.surrogate, ood.GATED_EPSILON, ood.GATED_EPSILON_OOD,
                             defender.knobs["grad2_gated_permute"], defender.feature_slope,
                             "permute", mapping, gate_tensors=defender.feature_gate)
        answers = apply_defense(defense, inputs, clean, progress=False)
        accuracies = []
        for hard in (False, True):
            clone, _ = ood.fit_clone(inputs, answers, seed=0, hard_labels=hard)
            accuracies.append(ood.clone_accuracy(clone, lab)[0])
        top = np.bincount(clean.argmax(1).numpy(), minlength=10).argsort()[::-1][:3]
        sent = ", ".join(f"{FASHION_CLASSES[k]}→{FASHION_CLASSES[mapping[k]]}" for k in top)
        rows.append((index, *accuracies, sent))
    print("key | soft clone % | labels-only clone % | the pool's three commonest classes go to")
    for index, soft, labels, sent in rows:
        print(f"{index} | {100 * soft:.1f} | {100 * labels:.1f} | {sent}")
    soft = np.array([r[1] for r in rows]) * 100
    labels = np.array([r[2] for r in rows]) * 100
    print(f"soft: mean {soft.mean():.1f}, min {soft.min():.1f}, max {soft.max():.1f}; "
          f"labels: mean {labels.mean():.1f}, min {labels.min():.1f}, max {labels.max():.1f}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
