"""Choose the L1 budget of one model version: ``grad2 tune``.

Sweeps ``epsilon`` with the archive's own defense on a labelled validation split and
reports, per value, the defender's accuracy drop, label-flip rate and mean effective L1
(and, with ``--simulate-thief``, the accuracy of a quick distillation clone). Picks the
largest ``epsilon`` whose drop stays within ``--max-accuracy-drop`` points, writes it into
a copy of ``model-config.yaml`` and builds the next version's archive.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from grad2.config import ConfigError
from grad2.defenses import Defense, takes
from grad2.models import predict_probs
from grad2.serve import ServedModel
from grad2.tools.progress import progress_bar

#: The ε grid ``grad2 tune`` tries by default (and the lab's full sweep).
EPSILON_GRID: tuple[float, ...] = tuple(round(0.1 * step, 1) for step in range(11))


@dataclass
class TunePoint:
    epsilon: float
    accuracy: float
    accuracy_drop: float  # percentage points
    label_flip_rate: float
    effective_l1: float
    clone_accuracy: float | None = None


def sweep_epsilon(
    defense_for: Callable[[float], Defense],
    inputs: Tensor,
    labels: Tensor,
    clean: Tensor,
    epsilons: Sequence[float] = EPSILON_GRID,
    thief: Callable[[Defense], float] | None = None,
    batch_size: int = 500,
    progress: bool = True,
) -> list[TunePoint]:
    """Measure ``defense_for(epsilon)`` on ``inputs`` ``[N, C, H, W]`` with ``labels`` ``[N]``
    and clean victim probabilities ``clean`` ``[N, K]``; ``thief(defense)`` optionally
    returns a clone's accuracy."""
    batches = ((inputs[i:i + batch_size], labels[i:i + batch_size], clean[i:i + batch_size])
               for i in range(0, len(inputs), batch_size))
    return sweep_batches(defense_for, batches, epsilons, thief, progress)


def sweep_batches(
    defense_for: Callable[[float], Defense],
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    epsilons: Sequence[float] = EPSILON_GRID,
    thief: Callable[[Defense], float] | None = None,
    progress: bool = True,
) -> list[TunePoint]:
    """:func:`sweep_epsilon` over a stream of ``(x, labels, clean)`` batches: each batch is
    defended at every ``epsilon`` and only counts are kept, so memory does not grow with
    the number of images."""
    epsilons = [float(epsilon) for epsilon in epsilons]
    defenses = {epsilon: defense_for(epsilon) for epsilon in epsilons}
    count, clean_correct = 0, 0
    correct = dict.fromkeys(epsilons, 0)
    flips = dict.fromkeys(epsilons, 0)
    l1 = dict.fromkeys(epsilons, 0.0)
    for x, labels, clean in batches:
        count += len(x)
        clean_top = clean.argmax(1)
        clean_correct += int((clean_top == labels).sum())
        for epsilon, defense in defenses.items():
            defended = defense(x, clean).float()
            correct[epsilon] += int((defended.argmax(1) == labels).sum())
            flips[epsilon] += int((defended.argmax(1) != clean_top).sum())
            l1[epsilon] += float((defended - clean).abs().sum())
    if count == 0:
        raise ValueError("no validation images")
    points = []
    for epsilon in progress_bar(epsilons, desc="simulated thief",
                                disable=not progress or thief is None):
        points.append(TunePoint(
            epsilon=epsilon,
            accuracy=correct[epsilon] / count,
            accuracy_drop=100 * (clean_correct - correct[epsilon]) / count,
            label_flip_rate=flips[epsilon] / count,
            effective_l1=l1[epsilon] / count,
            clone_accuracy=None if thief is None else thief(defenses[epsilon]),
        ))
    return points


def pick_epsilon(points: Sequence[TunePoint], max_accuracy_drop: float) -> TunePoint:
    """The largest-epsilon point whose accuracy drop is at most ``max_accuracy_drop``."""
    admissible = [p for p in points if p.accuracy_drop <= max_accuracy_drop]
    if not admissible:
        best = min(points, key=lambda p: p.accuracy_drop)
        raise ValueError(
            f"no epsilon keeps the accuracy drop within {max_accuracy_drop} points; the "
            f"smallest drop measured is {best.accuracy_drop:.2f} at epsilon {best.epsilon:g}"
        )
    return max(admissible, key=lambda p: p.epsilon)


def next_version(version: str) -> str:
    """``2.0 → 2.1``, ``3 → 3.1``, ``1.9 → 1.10``."""
    parts = version.split(".")
    if len(parts) == 1:
        return f"{version}.1"
    if not parts[-1].isdigit():
        raise ValueError(f"cannot increment version {version!r}; pass --next-version")
    return ".".join([*parts[:-1], str(int(parts[-1]) + 1)])


def print_table(points: Sequence[TunePoint], chosen: TunePoint | None) -> str:
    lines = ["epsilon  accuracy  drop(pt)  flips   eff.L1  clone acc"]
    for p in points:
        clone = "" if p.clone_accuracy is None else f"{100 * p.clone_accuracy:8.2f}"
        mark = "  <- chosen" if chosen is not None and p.epsilon == chosen.epsilon else ""
        lines.append(
            f"{p.epsilon:7.2f}  {100 * p.accuracy:8.2f}  {p.accuracy_drop:8.2f}  "
            f"{100 * p.label_flip_rate:5.2f}%  {p.effective_l1:6.3f}  {clone}{mark}"
        )
    return "\n".join(lines)


def plot_points(points: Sequence[TunePoint], path: Path, max_drop: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    eps = [p.epsilon for p in points]
    axis.plot(eps, [p.accuracy_drop for p in points], "-o", label="defender accuracy drop (pt)")
    axis.axhline(max_drop, color="grey", ls="--", lw=0.8, label=f"limit {max_drop:g} pt")
    if all(p.clone_accuracy is not None for p in points):
        other = axis.twinx()
        other.plot(eps, [100 * p.clone_accuracy for p in points], "-s", color="C3")
        other.set_ylabel("simulated clone accuracy (%)", color="C3")
    axis.set_xlabel("epsilon (L1 budget)")
    axis.set_ylabel("accuracy drop (points)")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------- archives
def tune_archive(
    archive: Path, max_accuracy_drop: float, export_path: Path, out: Path,
    epsilons: Sequence[float] = EPSILON_GRID, version: str | None = None,
    validation: Path | None = None, thief_pool: Path | None = None,
    precision: float = 0.5, validation_size: int = 2000, simulate_thief: bool = False,
    thief_budget: int = 2000, thief_epochs: int = 5, progress: bool = True,
    force: bool = False,
) -> tuple[Path, list[TunePoint], TunePoint]:
    """Tune a built ``.mar``; returns the new archive, the sweep and the chosen point.

    ``validation`` is a labelled folder (class sub-folders named as the archive's classes)
    or ``.npz``, streamed through the archive's own decoder, victim and defense; it must
    hold enough images for a ``± precision``-point answer at ``max_accuracy_drop``
    (:func:`grad2.tools.images.images_needed`). ``thief_pool`` (any folder of images) adds a
    simulated thief's clone accuracy per epsilon. Without them, the lab's Fashion-MNIST
    held-out split and Animal-MNIST pool are used (the demo's model only).
    """
    from grad2.serve import open_archive

    with open_archive(archive) as opened:
        method = opened.config.get("defense", {}).get("method", "grad2")
        if method not in takes("epsilon"):
            tunable = ", ".join(takes("epsilon"))
            raise ConfigError(
                "defense.method", f"{method} has no epsilon to tune; tunable: {tunable}"
            )

        def served_with(epsilon: float):
            changed = copy.deepcopy(opened.config)
            changed["defense"]["epsilon"] = epsilon
            return opened.load(changed)

        served = served_with(0.0)
        if validation is not None:
            batches, labels_of = _folder_batches(served, validation, max_accuracy_drop,
                                                 precision, progress)
        else:
            batches, labels_of = _lab_batches(served, validation_size)
        thief = None
        if simulate_thief or thief_pool is not None:
            thief = _simulated_thief(served, thief_pool, thief_budget, thief_epochs,
                                     labels_of, progress)
        points = sweep_batches(lambda e: served_with(e).defense, batches, epsilons, thief,
                               progress)
        chosen = pick_epsilon(points, max_accuracy_drop)
        out.mkdir(parents=True, exist_ok=True)
        new_version = version or next_version(opened.version)
        tuned = copy.deepcopy(opened.config)
        tuned["defense"]["epsilon"] = chosen.epsilon
        tuned_config = out / f"model-config-{new_version}.yaml"
        tuned_config.write_text(yaml.safe_dump(tuned, sort_keys=False))
        (out / "tune.json").write_text(json.dumps({
            "archive": str(archive), "version": new_version,
            "validation": str(validation) if validation else "lab: fashion_heldout",
            "thief_pool": str(thief_pool) if thief_pool else None,
            "max_accuracy_drop": max_accuracy_drop, "chosen": asdict(chosen),
            "points": [asdict(p) for p in points],
        }, indent=1))
        plot_points(points, out / "tune.png", max_accuracy_drop)
        new_archive = opened.rebuild(new_version, tuned_config, export_path, force=force)
    return new_archive, points, chosen


def _folder_batches(served: ServedModel, folder: Path, max_drop: float, precision: float,
                    progress: bool):
    """A re-iterable stream of ``(x, labels, clean)`` from a labelled folder, after checking
    it is large enough; and a function giving labelled test inputs for a thief's clone."""
    from grad2.serve import clean_probabilities
    from grad2.tools.images import images_needed, open_images

    images = open_images(Path(folder), served.input_config, served.class_names, labelled=True)
    needed = images_needed(max_drop, precision)
    if len(images) < needed:
        raise ValueError(
            f"{folder} holds {len(images)} labelled images; an accuracy drop near "
            f"{max_drop:g} points needs {needed} for a ±{precision:g}-point answer (95%). "
            f"Add images, or pass --precision {_precision_for(len(images), max_drop):.1f}")
    print(images.describe())

    class Stream:
        def __iter__(self):
            for x, labels, _ in images.batches(batch_size=256, progress=progress,
                                               desc="validation"):
                yield x, labels, clean_probabilities(served.victim, x, None)

    def labelled_inputs() -> tuple[Tensor, Tensor]:
        xs, ys = zip(*[(x, y) for x, y, _ in images.batches(256, progress=False)], strict=True)
        return torch.cat(xs), torch.cat(ys)

    return Stream(), labelled_inputs


def _precision_for(count: int, max_drop: float) -> float:
    """The ± half-width (points) ``count`` images give at ``max_drop``, rounded up."""
    from grad2.tools.images import images_needed

    precision = 0.5
    while images_needed(max_drop, precision) > count:
        precision += 0.1
    return precision


def _lab_batches(served: ServedModel, validation_size: int):
    """The lab's default: Fashion-MNIST held-out images (the demo's model only)."""
    from grad2.lab.data import thief_pool, to_tensor

    validation = thief_pool("fashion_heldout", size=validation_size, seed=1)
    inputs = to_tensor(validation.images)
    spec = served.input_config
    if tuple(inputs.shape[1:]) != (spec.channels, spec.height, spec.width) or (
            len(served.class_names) != validation.num_classes):
        raise ValueError("without --validation DIR, tune uses the lab's Fashion-MNIST split, "
                         "which does not fit this archive; pass --validation with a labelled "
                         "folder of your own images")
    labels = torch.from_numpy(validation.labels)
    clean = predict_probs(served.victim, inputs)
    batches = [(inputs[i:i + 500], labels[i:i + 500], clean[i:i + 500])
               for i in range(0, len(inputs), 500)]
    return batches, lambda: (inputs, labels)


def _simulated_thief(served: ServedModel, pool: Path | None, budget: int, epochs: int,
                     labelled_inputs: Callable[[], tuple[Tensor, Tensor]], progress: bool
                     ) -> Callable[[Defense], float]:
    """``defense -> clone accuracy``: a thief distils a clone of the victim's architecture
    from the defended answers to ``budget`` images of ``pool`` (default: the lab's
    Animal-MNIST), scored on the validation images."""
    from grad2.lab.train import padding_fill, train_clone
    from grad2.models import model_spec
    from grad2.serve import normalise

    if pool is not None:
        from grad2.tools.images import open_images

        images = open_images(Path(pool), served.input_config)
        pixels, _ = images.load(progress=progress)
        pool_inputs = normalise(pixels[:budget].float() / 255.0, served.input_config)
    else:
        from grad2.lab.data import thief_pool as lab_pool
        from grad2.lab.data import to_tensor

        pool_inputs = to_tensor(lab_pool("animal", size=budget, seed=2).images)
    pool_clean = predict_probs(served.victim, pool_inputs)
    test_inputs, test_labels = labelled_inputs()
    arch = model_spec(served.victim)["arch"]
    fill = padding_fill(served.input_config)

    def thief(defense: Defense) -> float:
        answers = torch.cat([defense(pool_inputs[i:i + 500], pool_clean[i:i + 500])
                             for i in range(0, len(pool_inputs), 500)])
        clone = train_clone(pool_inputs, answers.float(), arch=arch, epochs=epochs,
                            progress=False, fill=fill)
        return float((predict_probs(clone, test_inputs).argmax(1) == test_labels).float().mean())

    return thief


def _tune_command(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    archive, points, chosen = tune_archive(
        Path(args.archive), args.max_accuracy_drop, Path(args.export_path), Path(args.out),
        epsilons=args.epsilons, version=args.next_version, validation=args.validation,
        thief_pool=args.thief_pool, precision=args.precision,
        validation_size=args.validation_size, simulate_thief=args.simulate_thief,
        thief_budget=args.thief_budget, thief_epochs=args.thief_epochs,
        progress=not args.no_progress, force=args.force,
    )
    print(print_table(points, chosen))
    print(f"chosen epsilon {chosen.epsilon:g}; built {archive}; report in {args.out} "
          "(tune.json, tune.png)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune", help="choose epsilon for a model version and build the next version's archive"
    )
    parser.add_argument("--archive", required=True, help="a .mar built by grad2 archive")
    parser.add_argument("--max-accuracy-drop", type=float, default=1.0,
                        help="percentage points of validation accuracy the defense may cost")
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILON_GRID))
    parser.add_argument("--next-version", help="default: the archive's version + .1")
    parser.add_argument("--validation", type=Path,
                        help="labelled folder (class sub-folders named as the archive's "
                        "classes) or .npz the victim never trained on")
    parser.add_argument("--precision", type=float, default=0.5,
                        help="± points the accuracy drop must be known to (sets how many "
                        "validation images are needed; default 0.5)")
    parser.add_argument("--thief-pool", type=Path,
                        help="any folder of images: also report a simulated thief's clone "
                        "accuracy per epsilon")
    parser.add_argument("--thief-budget", type=int, default=2000,
                        help="images of the thief pool used (default 2000)")
    parser.add_argument("--thief-epochs", type=int, default=5)
    parser.add_argument("--validation-size", type=int, default=2000,
                        help="without --validation: held-out Fashion-MNIST images (lab)")
    parser.add_argument("--simulate-thief", action="store_true",
                        help="without --thief-pool: a simulated thief on the lab's pool")
    parser.add_argument("--export-path", default="model_store")
    parser.add_argument("--out", default="runs/tune")
    parser.add_argument("--force", action="store_true", help="overwrite the new archive")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_tune_command)

