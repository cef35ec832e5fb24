"""Does restricting GRAD²'s target to the surrogate's last layers (``target_layers``) keep
the defense's effect? The OOD study's defender (cached in ``GRAD2_CACHE/eval``), the
recommended ``grad2_gated`` (permute, feature gate) and plain GRAD² at their calibrated
knobs, with the target on all layers (0) or only on the last 2 or 3 (the last layer alone
gives the all-ones target no scores: it moves every logit alike): the defender's accuracy
drop on test images 5,001-10,000, the mean L1, and clone accuracies of soft and
labels-only thieves on the Animal-MNIST pool and of a soft thief on held-out
Fashion-MNIST (the in-distribution pool), one line per configuration, then a markdown
table.

    GRAD2_CACHE=.cache .venv/bin/python scripts/restricted_effect.py [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from grad2 import defenses as D
from grad2.lab import ood
from grad2.lab.data import cache_dir, to_tensor
from grad2.lab.evaluate import Lab, apply_defense
from grad2.models import predict_probs
from grad2.tools.progress import progress_bar

LAYERS = (0, 2, 3)
#: (pool, thief) pairs each configuration is attacked with.
ATTACKS = (("animal", "soft"), ("animal", "labels"), ("fashion_heldout", "soft"))


def build(defender: ood.Defender, family: str, layers: int) -> D.Defense:
    """``family`` (``grad2_gated`` or ``grad2``) at its calibrated knob, target on the last
    ``layers`` layers."""
    if family == "grad2":
        return D.GRAD2(defender.surrogate, defender.knobs["grad2"], target_layers=layers)
    return D.GatedGRAD2(defender.surrogate, ood.GATED_EPSILON, ood.GATED_EPSILON_OOD,
                        defender.knobs["grad2_gated_permute"], defender.feature_slope,
                        "permute", defender.mapping, gate_tensors=defender.feature_gate,
                        target_layers=layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--families", nargs="+", default=["grad2_gated", "grad2"])
    parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lab = Lab(cache_dir() / "eval", progress=False)
    defender = ood.Defender(lab, progress=False, names=("grad2_gated_permute", "grad2"))
    report = slice(ood.VALIDATION_SIZE, None)
    test_inputs, test_clean = lab.test_inputs[report], lab.test_probs[report]
    labels = lab.test_labels[report]
    clean_accuracy = (test_clean.argmax(1) == labels).float().mean().item()
    pools = {pool: to_tensor(ood.pool_images(pool)) for pool in {p for p, _ in ATTACKS}}
    cleans = {pool: predict_probs(lab.victim, inputs) for pool, inputs in pools.items()}
    plan = [(family, layers) for family in args.families for layers in args.layers]
    rows = []
    undefended: dict[tuple[str, str], list[float]] = {}
    for pool, thief in ATTACKS:
        for seed in args.seeds:
            clone, _ = ood.fit_clone(pools[pool], cleans[pool], seed,
                                     hard_labels=thief == "labels")
            undefended.setdefault((pool, thief), []).append(ood.clone_accuracy(clone, lab)[0])
    for family, layers in progress_bar(plan, desc="configs"):
        defense = build(defender, family, layers)
        test_answers = apply_defense(defense, test_inputs, test_clean, progress=False)
        drop = 100 * (clean_accuracy - (test_answers.argmax(1) == labels).float().mean().item())
        row = {"family": family, "target_layers": layers, "drop": round(drop, 2),
               "test_l1": round((test_answers - test_clean).abs().sum(1).mean().item(), 4)}
        for pool, thief in ATTACKS:
            answers = apply_defense(defense, pools[pool], cleans[pool], progress=False)
            accuracies = []
            for seed in args.seeds:
                clone, _ = ood.fit_clone(pools[pool], answers, seed,
                                         hard_labels=thief == "labels")
                accuracies.append(100 * ood.clone_accuracy(clone, lab)[0])
            row[f"{pool}/{thief}"] = round(statistics.mean(accuracies), 1)
            row[f"{pool}/{thief} effect"] = round(
                100 * statistics.mean(undefended[(pool, thief)]) - row[f"{pool}/{thief}"], 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    columns = [f"{pool}/{thief}" for pool, thief in ATTACKS]
    print("\nundefended clones: " + ", ".join(
        f"{pool}/{thief} {100 * statistics.mean(v):.1f}%" for (pool, thief), v in
        undefended.items()))
    print(f"seeds {args.seeds}; clone % (points removed vs undefended)\n")
    print("| defense | target_layers | defender drop | test L1 | " + " | ".join(columns) + " |")
    print("| --- " * (4 + len(columns)) + "|")
    for row in rows:
        cells = " | ".join(f"{row[c]:.1f} ({row[c + ' effect']:+.1f})" for c in columns)
        print(f"| {row['family']} | {row['target_layers'] or 'all'} | {row['drop']:.2f} | "
              f"{row['test_l1']:.3f} | {cells} |")


if __name__ == "__main__":
    main()
