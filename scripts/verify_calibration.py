"""How often ``grad2 verify`` accuses innocent models, and whether it catches clones of the
defended version, on verification images the defender chooses (issue 23, item 4).

    OMP_NUM_THREADS=1 GRAD2_CACHE=.cache .venv/bin/python scripts/verify_calibration.py

Suspects (cached in GRAD2_CACHE/eval; the study's defender of :mod:`grad2.lab.ood`):

- innocents: :data:`INDEPENDENT` models trained on the true labels of different subsets
  of the defender's training images (:func:`grad2.lab.ood.innocent_models`, small and wide
  networks, other seeds) and :data:`UNDEFENDED_CLONES` clones of the undefended API's
  answers (``none``) on several pools, thieves and seeds;
- clones of the defended version (``grad2_gated_permute``): :data:`DEFENDED_CLONES`.

Every suspect is tested on each kind of verification images the defender can choose
without knowing the thief's data (:data:`KINDS`): ``transformed_own`` (the defender's own
training images rotated and cropped or inverted with noise,
:func:`grad2.lab.ood.verification_pixels`), ``fresh_animal`` (natural OOD images no
thief pool drew; of the thieves' kind for the Animal-MNIST clones) and ``warped_own``
(other training images with a random rotation, shift, zoom and noise: nearly in
distribution, so the gate moves few of them and ``verify`` refuses). The reference
models of the calibrated null are :data:`REFERENCES` innocents
drawn at random from the *other* innocents for each suspect (leave the suspect out: the
references and the suspect are then exchangeable, as a defender's independently trained
references are with an innocent suspect). Output: ``docs/results/verify_calibration.json``
and a markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn

from grad2.lab import ood
from grad2.lab.data import cache_dir, to_tensor, victim_train_split
from grad2.lab.evaluate import Lab
from grad2.lab.train import train_clone
from grad2.models import load_checkpoint, predict_probs
from grad2.tools import ownership
from grad2.tools.progress import progress_bar

#: Independently trained innocents (true labels, 15,000 training images each).
INDEPENDENT = 12
#: Cheaper independent innocents (5,000 training images, 2 epochs).
SMALL_INDEPENDENT = 8
#: Clones of the undefended API: (pool, thief, seed).
UNDEFENDED_CLONES = (
    *(("animal", "soft", seed) for seed in (0, 1, 2)),
    ("animal", "labels", 0),
    *(("animal_rotated", "soft", seed) for seed in (0, 1)),
    *(("animal_shifted", "soft", seed) for seed in (0, 1)),
    ("animal_inverted", "soft", 0),
    ("heldout_warped", "soft", 0),
    ("animal_rotated", "labels", 0),
    ("animal_shifted", "labels", 0),
)
#: Clones of the defended version: (pool, thief, seed).
DEFENDED_CLONES = (
    *(("animal", "soft", seed) for seed in (0, 1, 2)),
    ("animal", "labels", 0),
    ("animal_rotated", "soft", 0),
    ("animal_shifted", "soft", 0),
    ("animal_inverted", "soft", 0),
)
DEFENDED = "grad2_gated_permute"
#: Reference models per suspect in the calibrated null.
REFERENCES = 8
KINDS = ("transformed_own", "fresh_animal", "warped_own")
#: Random mappings of the (reported, not decisive) random-mapping test.
DRAWS = 2000


def small_innocents(lab: Lab, count: int) -> list[tuple[str, nn.Module]]:
    """Cheaper independent innocents: small networks trained on the true labels of 5,000
    other training images each (2 epochs, seeds 400 + i), cached."""
    train = victim_train_split()
    models = []
    for index in progress_bar(range(count), desc="small innocents"):
        def fit(index: int = index) -> nn.Module:
            rows = np.random.default_rng(400 + index).choice(len(train), 5000, replace=False)
            one_hot = F.one_hot(torch.from_numpy(train.labels[rows]), 10).float()
            return train_clone(to_tensor(train.images[rows]), one_hot, epochs=2,
                               seed=400 + index, hard_labels=True, progress=False)

        models.append((f"independent-small-5k-{index}", lab._model(f"innocent_small_{index}",
                                                                     fit)))
    return models


def clone(defender: ood.Defender, name: str, pool: str, thief: str, seed: int) -> nn.Module:
    """A thief's clone of ``name`` (cached in ``ood_clones`` as the study names it)."""
    path = defender.lab.folder / "ood_clones" / f"{name}-{pool}-{thief}-{seed}.pt"
    if not path.exists():
        ood.run_thief(defender, name, pool, thief, seed)
    return load_checkpoint(path)[0].eval()


def suspects(defender: ood.Defender, cached_only: bool = False
             ) -> dict[str, tuple[str, nn.Module]]:
    """Every suspect by name: (group ``innocent`` or ``defended clone``, model); with
    ``cached_only`` the clones not trained yet are left out."""
    models: dict[str, tuple[str, nn.Module]] = {}
    for name, model in ood.innocent_models(defender.lab, INDEPENDENT):
        models[name] = ("innocent", model.eval())
    for name, model in small_innocents(defender.lab, SMALL_INDEPENDENT):
        models[name] = ("innocent", model.eval())
    jobs = [("none", *job) for job in UNDEFENDED_CLONES]
    jobs += [(DEFENDED, *job) for job in DEFENDED_CLONES]
    folder = defender.lab.folder / "ood_clones"
    if cached_only:
        jobs = [job for job in jobs if (folder / ("-".join(map(str, job)) + ".pt")).exists()]
    for name, pool, thief, seed in progress_bar(jobs, desc="clones"):
        group = "defended clone" if name == DEFENDED else "innocent"
        models[f"{name} clone: {pool} {thief} seed {seed}"] = (
            group, clone(defender, name, pool, thief, seed))
    return models


def verification_sets(defender: ood.Defender) -> dict[str, Tensor]:
    """The defender-chosen verification images by kind (:data:`KINDS`)."""
    sets = ood.verification_images(defender)
    rows = np.random.default_rng(22).choice(len(defender.train), 4000, replace=False)
    sets["warped_own"] = to_tensor(ood.warped(defender.train.images[rows], 5))
    return {kind: sets[kind] for kind in KINDS}


def moved_set(defender: ood.Defender, images: Tensor) -> ownership.Moved:
    """The images of ``images`` the defended version moves (as ``grad2 verify`` finds
    them in an archive)."""
    defense = defender.build(DEFENDED)
    clean = predict_probs(defender.lab.victim, images)
    moved, receivers, rule = ownership.moved_rows(defense, images, clean)
    positions = torch.nonzero(moved).squeeze(1)
    return ownership.Moved(
        len(images), ownership.MOVED_RULES[rule], positions.numpy(),
        clean.argmax(1)[positions].numpy(), receivers[positions].numpy(),
        clean[positions].gather(1, receivers[positions, None]).squeeze(1).double().numpy())


def test_all(models: dict[str, tuple[str, nn.Module]], images: Tensor, moved: ownership.Moved,
             seed: int = 0) -> dict[str, dict]:
    """Every suspect's verdicts on the moved images: with :data:`REFERENCES` references
    drawn from the other innocents, and with the victim's probabilities alone."""
    names = list(models)
    inputs = images[torch.from_numpy(moved.positions)]
    probabilities = np.stack([predict_probs(model, inputs).double().numpy()
                              for _, model in models.values()])  # [S, M, K]
    innocents = [i for i, name in enumerate(names) if models[name][0] == "innocent"]
    rng = np.random.default_rng(seed)
    results = {}
    for index, name in enumerate(names):
        others = [i for i in innocents if i != index]
        chosen = rng.choice(others, REFERENCES, replace=False)
        top = probabilities[index].argmax(1)
        verdict = ownership.ownership_test(top, moved, probabilities[chosen], 10, DRAWS, seed)
        alone = ownership.ownership_test(top, moved, None, 10, 0)
        results[name] = {"group": models[name][0], "follows": verdict.follows_receiver,
                         "reference_mean": verdict.reference_mean,
                         "reference_sd": verdict.reference_sd,
                         "p_value": verdict.p_value, "p_reference": verdict.p_reference,
                         "p_model": verdict.p_model, "p_model_victim_only": alone.p_model,
                         "victim_expects": alone.null_mean,
                         "random_mapping_p": verdict.random_mapping_p}
    return results


def summary(results: dict[str, dict]) -> dict:
    """Per p-value kind: innocents below 0.05, their KS distance to uniform, their sorted
    p-values, and the largest p of a defended clone."""
    out = {}
    for key in ("p_value", "p_reference", "p_model", "p_model_victim_only", "random_mapping_p"):
        innocent = sorted(r[key] for r in results.values() if r["group"] == "innocent")
        clones = [r[key] for r in results.values() if r["group"] != "innocent"]
        out[key] = {"innocents": len(innocent),
                    "innocents_below_0.05": sum(p < 0.05 for p in innocent),
                    "ks_uniform": float(stats.kstest(innocent, "uniform").statistic),
                    "innocent_sorted": [round(p, 4) for p in innocent],
                    "clones": len(clones), "clones_max_p": max(clones),
                    "clones_below_1e-3": sum(p < 1e-3 for p in clones)}
    return out


def markdown(report: dict) -> str:
    """The summary table of the report."""
    lines = ["| images | moved | p-value | innocents < 0.05 | KS vs uniform | largest "
             "defended-clone p | defended clones < 1e-3 |", "| --- | --- | --- | --- | --- "
             "| --- | --- |"]
    for kind, entry in report.items():
        if "refused" in entry:
            lines.append(f"| {kind} | {entry['refused']} | | | | | |")
            continue
        for key, cell in entry["summary"].items():
            lines.append(f"| {kind} | {entry['moved']} of {entry['images']} | {key} | "
                         f"{cell['innocents_below_0.05']} of {cell['innocents']} | "
                         f"{cell['ks_uniform']:.2f} | {cell['clones_max_p']:.2g} | "
                         f"{cell['clones_below_1e-3']} of {cell['clones']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--cached-only", action="store_true",
                        help="test only the clones already trained (the run in docs/results.md)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/verify_calibration.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lab = Lab(cache_dir() / "eval", progress=False)
    defender = ood.Defender(lab, progress=False, names=(DEFENDED,))
    models = suspects(defender, args.cached_only)
    if args.train_only:
        return 0
    report: dict[str, dict] = {}
    for kind, images in verification_sets(defender).items():
        moved = moved_set(defender, images)
        try:
            ownership.check_moved(len(moved), moved.images, ownership.MIN_MOVED, moved.rule)
        except ownership.TooFewMovedError as error:
            report[kind] = {"refused": str(error).split(";")[0]}
            continue
        results = test_all(models, images, moved)
        report[kind] = {"images": moved.images, "moved": len(moved),
                        "summary": summary(results), "suspects": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
