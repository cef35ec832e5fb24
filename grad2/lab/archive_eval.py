"""``grad2 evaluate --archive A.mar --pool DIR --test DIR``: what a thief gets from a served
model version, on the user's own images.

The archive is the source of truth (victim, input section, class names, defense). For
each budget of a small grid the archive's defense is rebuilt at that ``epsilon``; the
defender's accuracy on the labelled ``--test`` folder is measured through the worker's
own decoder, victim and defense (streamed), and simulated thieves train a clone on the
defended answers to images of ``--pool`` (any folder of images): a soft-label thief and a
labels-only thief. Writes ``evaluate.json``, ``evaluate.md`` and ``evaluate.png``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from grad2.config import ConfigError
from grad2.defenses import takes
from grad2.lab.families import QUICK_EPSILONS, SHORT_EPSILONS
from grad2.lab.train import CLONE_EPOCHS, padding_fill, train_clone
from grad2.models import model_spec, predict_probs
from grad2.serve import clean_probabilities, normalise, open_archive
from grad2.tools.images import open_images

#: Thieves trained at every budget: name -> train on the top-1 label only?
THIEVES = {"soft": False, "labels_only": True}


@dataclass
class EvaluationRow:
    epsilon: float
    thief: str
    seed: int
    defender_accuracy: float
    defender_drop: float  # percentage points below the undefended victim
    effective_l1: float  # mean L1 between defended and clean answers on the pool
    clone_accuracy: float


def evaluate_archive(
    archive: Path, pool: Path, test: Path, out: Path,
    epsilons: Sequence[float] | None = None, quick: bool = False, seeds: int = 1,
    budget: int | None = None, epochs: int | None = None, clone_arch: str | None = None,
    progress: bool = True,
) -> list[EvaluationRow]:
    """Sweep ``epsilons`` (default :data:`~grad2.lab.families.SHORT_EPSILONS`, or
    :data:`~grad2.lab.families.QUICK_EPSILONS` with ``quick``) of ``archive``'s defense;
    returns one row per budget, thief and seed and writes the reports into ``out``."""
    started = time.perf_counter()
    epsilons = list(epsilons or (QUICK_EPSILONS if quick else SHORT_EPSILONS))
    budget = budget or (1000 if quick else 4000)
    epochs = epochs or (3 if quick else CLONE_EPOCHS)
    with open_archive(Path(archive)) as opened:
        method = opened.config.get("defense", {}).get("method")
        if method not in takes("epsilon"):
            raise ConfigError("defense.method", f"{archive} serves method {method}, which has "
                              "no epsilon to sweep; evaluate a grad2/random/mad archive")

        def served_at(epsilon: float):
            config = copy.deepcopy(opened.config)
            config["defense"]["epsilon"] = float(epsilon)
            return opened.load(config)

        served = served_at(0.0)
        spec, class_names = served.input_config, served.class_names
        pool_set = open_images(Path(pool), spec)
        if budget < len(pool_set):  # spread over the folder, not its first sub-folders
            pool_set = pool_set.subset(range(0, len(pool_set), len(pool_set) // budget)[:budget])
        pixels, _ = pool_set.load(progress=progress)
        pool_inputs = normalise(pixels.float() / 255.0, spec)
        pool_clean = predict_probs(served.victim, pool_inputs)
        test_set = open_images(Path(test), spec, class_names, labelled=True)
        arch = clone_arch or model_spec(served.victim)["arch"]
        fill = padding_fill(spec)
        defenses = {epsilon: served_at(epsilon).defense for epsilon in epsilons}
        accuracy = _defender_accuracy(served.victim, defenses, test_set, progress)
        rows = []
        for epsilon in epsilons:
            defense = defenses[epsilon]
            with torch.enable_grad():
                answers = torch.cat([defense(pool_inputs[i:i + 256], pool_clean[i:i + 256])
                                     for i in range(0, len(pool_inputs), 256)]).float()
            l1 = float((answers - pool_clean).abs().sum(1).mean())
            for thief, hard in THIEVES.items():
                for seed in range(seeds):
                    clone = train_clone(pool_inputs, answers, arch=arch, epochs=epochs,
                                        seed=seed, hard_labels=hard, progress=progress,
                                        fill=fill)
                    rows.append(EvaluationRow(
                        epsilon=epsilon, thief=thief, seed=seed,
                        defender_accuracy=accuracy[epsilon],
                        defender_drop=100 * (accuracy["clean"] - accuracy[epsilon]),
                        effective_l1=l1,
                        clone_accuracy=_clone_accuracy(clone, test_set)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluate.json").write_text(json.dumps({
        "archive": str(archive), "pool": str(pool), "test": str(test),
        "pool_images": len(pool_inputs), "test_images": len(test_set),
        "clone_arch": arch, "epochs": epochs, "seeds": seeds,
        "undefended_accuracy": accuracy["clean"],
        "wall_time_s": round(time.perf_counter() - started, 1),
        "rows": [asdict(row) for row in rows],
    }, indent=1))
    (out / "evaluate.md").write_text(format_table(rows) + "\n")
    plot_rows(rows, out / "evaluate.png", str(archive))
    return rows


def _defender_accuracy(victim, defenses, test_set, progress: bool) -> dict:
    """Accuracy of the clean answers (``"clean"``) and of each budget's defended answers
    on the labelled test images, streamed in batches."""
    correct = dict.fromkeys(["clean", *defenses], 0)
    count = 0
    for x, labels, _ in test_set.batches(256, progress=progress, desc="defender"):
        clean = clean_probabilities(victim, x, None)
        correct["clean"] += int((clean.argmax(1) == labels).sum())
        with torch.enable_grad():
            for epsilon, defense in defenses.items():
                correct[epsilon] += int((defense(x, clean).argmax(1) == labels).sum())
        count += len(x)
    return {key: value / count for key, value in correct.items()}


def _clone_accuracy(clone: torch.nn.Module, test_set) -> float:
    hits = total = 0
    with torch.inference_mode():
        for x, labels, _ in test_set.batches(256, progress=False):
            hits += int((clone(x).argmax(1) == labels).sum())
            total += len(x)
    return hits / total


def format_table(rows: Sequence[EvaluationRow]) -> str:
    """Mean over seeds, one line per budget: defender accuracy and each thief's clone."""
    thieves = list(dict.fromkeys(row.thief for row in rows))
    lines = ["| epsilon | defender accuracy | drop (points) | effective L1 | "
             + " | ".join(f"clone, {thief}" for thief in thieves) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in thieves) + " |"]
    for epsilon in dict.fromkeys(row.epsilon for row in rows):
        at = [row for row in rows if row.epsilon == epsilon]
        clones = []
        for thief in thieves:
            values = [row.clone_accuracy for row in at if row.thief == thief]
            clones.append(f"{100 * sum(values) / len(values):.2f}")
        lines.append(f"| {epsilon:g} | {100 * at[0].defender_accuracy:.2f} | "
                     f"{at[0].defender_drop:.2f} | {at[0].effective_l1:.3f} | "
                     + " | ".join(clones) + " |")
    return "\n".join(lines)


def plot_rows(rows: Sequence[EvaluationRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for thief in dict.fromkeys(row.thief for row in rows):
        points = {}
        for row in rows:
            if row.thief == thief:
                points.setdefault(row.defender_drop, []).append(100 * row.clone_accuracy)
        drops = sorted(points)
        axis.plot(drops, [sum(points[d]) / len(points[d]) for d in drops], "-o", label=thief)
    axis.set_xlabel("defender accuracy drop (points)")
    axis.set_ylabel("clone accuracy (%)")
    axis.set_title(title, fontsize=8)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
