"""``grad2 evaluate --archive A.mar --pool DIR --test DIR``: what a thief gets from a served
model version, on the user's own images.

The archive is the source of truth (victim, input section, class names, defense). For each
budget of a small grid the archive's defense is rebuilt at that ``epsilon``; the
defender's accuracy on the labelled ``--test`` folder is measured through the worker's own
decoder, victim and defense (streamed), and simulated thieves train a clone on the
defended answers to images of ``--pool`` (any folder of images): a soft-label thief, a
labels-only thief (both of the clone architecture, by default the victim's) and a soft
thief of another architecture (:func:`other_architecture`, or ``thief_arch``), the lab's
strongest thief. With ``--own DIR`` (a few hundred images of the victim's own kind the
thief owns, answered by the same API) come issue 23's thieves that read the answers
(:mod:`grad2.lab.thieves`): the mixed thief (pool plus own queries, soft and labels-only),
the own-only thief (its own queries' answers alone, trained as many steps as a pool
clone), the post-hoc fixer, the mapping-recovery thief and the answer filter (its detector
learns altered answers from its own run of the public defense code: the archive's
``defense:`` section with its own clone as surrogate, its own key and gate). The table
shows the best thief of each budget. Writes ``evaluate.json``, ``evaluate.md`` and
``evaluate.png``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from grad2 import gate
from grad2.config import ConfigError
from grad2.defenses import Defense, build_defense, takes
from grad2.lab import thieves
from grad2.lab.families import QUICK_EPSILONS, SHORT_EPSILONS
from grad2.lab.train import CLONE_EPOCHS, padding_fill, step_matched_epochs, train_clone
from grad2.models import model_spec, penultimate, predict_probs
from grad2.serve import clean_probabilities, normalise, open_archive
from grad2.tools.images import open_images

#: Thieves trained at every budget: name -> (other architecture?, top-1 label only?).
THIEVES = {"soft": (False, False), "labels_only": (False, True), "arch": (True, False)}
#: Clone architectures by the inputs they take, in the order :func:`other_architecture`
#: tries them.
ARCHITECTURES_FOR = {"gray28": ("small_cnn", "wide_cnn", "resnet18_gray"),
                     "gray": ("resnet18_gray",),
                     "color": ("torchvision:resnet18", "torchvision:mobilenet_v3_small")}
#: Thieves that need the thief's own in-distribution images (``own``).
OWN_THIEVES = ("mixed_soft", "mixed_labels", "own_only", "fixer", "mapping", "filter")
#: Share of the thief's own in-distribution images its copy of a feature gate flags.
OWN_GATE_SHARE = 0.02


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
    progress: bool = True, own: Path | None = None, thief_arch: str | None = None,
) -> list[EvaluationRow]:
    """Sweep ``epsilons`` (default :data:`~grad2.lab.families.SHORT_EPSILONS`, or
    :data:`~grad2.lab.families.QUICK_EPSILONS` with ``quick``) of ``archive``'s defense;
    returns one row per budget, thief and seed and writes the reports into ``out``.
    ``own``: a folder of the thief's in-distribution images (adds :data:`OWN_THIEVES`);
    ``thief_arch``: the ``arch`` thief's architecture (default :func:`other_architecture`;
    the thief is left out when no other architecture takes the archive's inputs)."""
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
        pool_inputs = _load_inputs(pool_set, spec, progress)
        pool_clean = predict_probs(served.victim, pool_inputs)
        own_inputs = None
        if own is not None:
            own_inputs = _load_inputs(open_images(Path(own), spec), spec, progress)
            own_clean = predict_probs(served.victim, own_inputs)
        test_set = open_images(Path(test), spec, class_names, labelled=True)
        arch = clone_arch or model_spec(served.victim)["arch"]
        other_arch = thief_arch or other_architecture(arch, spec.channels, spec.height,
                                                      spec.width)
        trained = {thief: kind for thief, kind in THIEVES.items()
                   if other_arch is not None or not kind[0]}
        fill = padding_fill(spec)
        defenses = {epsilon: served_at(epsilon).defense for epsilon in epsilons}
        accuracy = _defender_accuracy(served.victim, defenses, test_set, progress)
        rows = []
        for epsilon in epsilons:
            defense = defenses[epsilon]
            answers = _answer(defense, pool_inputs, pool_clean)
            l1 = float((answers - pool_clean).abs().sum(1).mean())

            def fit(inputs, targets, seed, hard=False, steps_of=None, other=False):
                scaled = epochs if steps_of is None else step_matched_epochs(
                    epochs, steps_of, len(inputs))
                return train_clone(inputs, targets, arch=other_arch if other else arch,
                                   epochs=scaled, seed=seed, hard_labels=hard,
                                   progress=progress, fill=fill)

            for seed in range(seeds):
                clones = {thief: fit(pool_inputs, answers, seed, hard, other=other)
                          for thief, (other, hard) in trained.items()}
                if own_inputs is not None:
                    own_answers = _answer(defense, own_inputs, own_clean)
                    clones.update(own_thieves(
                        fit, clones["soft"], pool_inputs, answers, own_inputs, own_answers,
                        opened.config["defense"], epsilon, seed))
                for thief, clone in clones.items():
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
        "own": None if own is None else str(own),
        "own_images": 0 if own_inputs is None else len(own_inputs),
        "pool_images": len(pool_inputs), "test_images": len(test_set),
        "clone_arch": arch, "thief_arch": other_arch, "epochs": epochs, "seeds": seeds,
        "undefended_accuracy": accuracy["clean"],
        "wall_time_s": round(time.perf_counter() - started, 1),
        "rows": [asdict(row) for row in rows],
    }, indent=1))
    (out / "evaluate.md").write_text(format_table(rows) + "\n")
    plot_rows(rows, out / "evaluate.png", str(archive))
    return rows


def other_architecture(arch: str, channels: int, height: int, width: int) -> str | None:
    """The first clone architecture of :data:`ARCHITECTURES_FOR` other than ``arch`` that
    takes ``[channels, height, width]`` inputs, or None when there is none."""
    kind = "color" if channels != 1 else "gray28" if (height, width) == (28, 28) else "gray"
    return next((other for other in ARCHITECTURES_FOR[kind] if other != arch), None)


def _load_inputs(image_set, spec, progress: bool) -> torch.Tensor:
    pixels, _ = image_set.load(progress=progress)
    return normalise(pixels.float() / 255.0, spec)


def _answer(defense, inputs: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` float answers of ``defense`` in batches of 256."""
    with torch.enable_grad():
        return torch.cat([defense(inputs[i:i + 256], clean[i:i + 256])
                          for i in range(0, len(inputs), 256)]).float()


def own_thieves(fit, soft: torch.nn.Module, inputs: torch.Tensor, answers: torch.Tensor,
                own_inputs: torch.Tensor, own_answers: torch.Tensor,
                defense_section: Mapping[str, Any], epsilon: float,
                seed: int) -> dict[str, torch.nn.Module]:
    """The clones of :data:`OWN_THIEVES` (those it can build): ``fit(inputs, targets,
    seed, hard, steps_of)`` trains one (``steps_of``: as many SGD steps as a clone of that
    many queries); ``soft`` is the soft thief's clone of the API's ``answers [N, K]`` to
    ``inputs``; ``own_answers [M, K]`` the API's answers to the thief's own
    in-distribution ``own_inputs``. ``own_only`` trains on those answers alone, as long as
    the pool's clones: what a thief keeps whatever the defense does to its other queries."""
    mixed_inputs = torch.cat([inputs, own_inputs])
    mixed_answers = torch.cat([answers, own_answers])
    clones = {"mixed_soft": fit(mixed_inputs, mixed_answers, seed),
              "mixed_labels": fit(mixed_inputs, mixed_answers, seed, True),
              "own_only": fit(own_inputs, own_answers, seed, steps_of=len(inputs)),
              "fixer": thieves.RelabelledClone(
                  soft, thieves.fixer_relabelling(soft, own_inputs, own_answers))}
    relabelling = thieves.estimate_relabelling(soft, own_inputs, own_answers)
    clones["mapping"] = soft
    if not torch.equal(relabelling, torch.arange(len(relabelling))):
        reference = predict_probs(fit(own_inputs, own_answers, seed + 50), inputs)
        recovered, _ = thieves.recover_answers(answers, relabelling, reference)
        clones["mapping"] = fit(inputs, recovered, seed)
    twin = thief_defense(defense_section, epsilon, soft, own_inputs, own_answers, seed)
    if twin is not None:
        own_clean = predict_probs(soft, inputs)
        altered = _answer(twin, inputs, own_clean)
        keep, _ = thieves.filter_rows(answers, altered, own_clean, thieves.answer_features,
                                      lambda rows, labels, s: thieves.fit_mlp(rows, labels, s, 30),
                                      seed)
        clones["filter"] = soft if keep.all() else fit(inputs[keep], answers[keep], seed)
    return clones


def thief_defense(defense_section: Mapping[str, Any], epsilon: float, own_model: torch.nn.Module,
                  own_inputs: torch.Tensor, own_answers: torch.Tensor,
                  seed: int) -> Defense | None:
    """The thief's run of the public defense code (Kerckhoffs): the archive's ``defense:``
    section at ``epsilon`` with ``own_model`` as surrogate, its own mapping key, and its
    own feature gate (fitted on its in-distribution images, labelled by the API, flagging
    :data:`OWN_GATE_SHARE` of them). ``None`` where the section needs another secret file
    (a target file) the thief cannot make up."""
    section = {**copy.deepcopy(dict(defense_section)), "epsilon": float(epsilon)}
    files: dict[str, Any] = {}
    if section.get("mapping_key") is not None:
        files["mapping_key"] = hashlib.sha256(f"thief key {seed}".encode()).digest()
    if section.get("gate_file") is not None:
        features = penultimate(own_model, own_inputs)
        own_gate = gate.fit_feature_gate(features, own_answers.argmax(1),
                                         own_answers.shape[1])
        scores = gate.feature_score(features, own_gate)
        files["gate_file"] = own_gate
        section["gate_threshold"] = gate.calibrate_threshold(scores, OWN_GATE_SHARE)
        section["gate_slope"] = 20.0 / max(scores.std().item(), 1e-6)
    if any(key.endswith("_file") and key not in files and section.get(key) is not None
           for key in section):
        return None
    try:
        return build_defense(section, surrogate=own_model, files=files)
    except (ConfigError, ValueError):
        return None


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
    """Mean over seeds, one line per budget: defender accuracy, each thief's clone and the
    best thief (the highest mean clone accuracy any thief reaches at that budget)."""
    names = list(dict.fromkeys(row.thief for row in rows))
    lines = ["| epsilon | defender accuracy | drop (points) | effective L1 | "
             + " | ".join(f"clone, {thief}" for thief in names) + " | best thief |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " | --- |"]
    for epsilon in dict.fromkeys(row.epsilon for row in rows):
        at = [row for row in rows if row.epsilon == epsilon]
        means = {}
        for thief in names:
            values = [row.clone_accuracy for row in at if row.thief == thief]
            if values:
                means[thief] = sum(values) / len(values)
        best, value = thieves.best_thief(means)
        lines.append(f"| {epsilon:g} | {100 * at[0].defender_accuracy:.2f} | "
                     f"{at[0].defender_drop:.2f} | {at[0].effective_l1:.3f} | "
                     + " | ".join(f"{100 * means[t]:.2f}" if t in means else "–"
                                  for t in names)
                     + f" | {best} {100 * value:.2f} |")
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
