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
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from grad2.config import ConfigError
from grad2.defenses import Defense
from grad2.train import predict_probs, set_threads, train_clone

DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
BUDGETED = ("grad2", "random", "mad", "mad_argmax")


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
    epsilons: Sequence[float] = DEFAULT_GRID,
    thief: Callable[[Defense], float] | None = None,
    batch_size: int = 500,
    progress: bool = True,
) -> list[TunePoint]:
    """Measure ``defense_for(epsilon)`` on ``inputs`` ``[N, C, H, W]`` with ``labels`` ``[N]``
    and clean victim probabilities ``clean`` ``[N, K]``; ``thief(defense)`` optionally
    returns a clone's accuracy."""
    clean_accuracy = (clean.argmax(1) == labels).float().mean().item()
    points = []
    for epsilon in tqdm(epsilons, desc="epsilon", disable=not progress):
        defense = defense_for(float(epsilon))
        defended = torch.cat([
            defense(inputs[i:i + batch_size], clean[i:i + batch_size]).float()
            for i in range(0, len(inputs), batch_size)
        ])
        accuracy = (defended.argmax(1) == labels).float().mean().item()
        points.append(TunePoint(
            epsilon=float(epsilon),
            accuracy=accuracy,
            accuracy_drop=100 * (clean_accuracy - accuracy),
            label_flip_rate=(defended.argmax(1) != clean.argmax(1)).float().mean().item(),
            effective_l1=(defended - clean).abs().sum(1).mean().item(),
            clone_accuracy=None if thief is None else thief(defense),
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
    epsilons: Sequence[float] = DEFAULT_GRID, version: str | None = None,
    validation_size: int = 2000, simulate_thief: bool = False, thief_budget: int = 2000,
    thief_epochs: int = 5, progress: bool = True, force: bool = False,
) -> tuple[Path, list[TunePoint], TunePoint]:
    """Tune a built ``.mar``; returns the new archive, the sweep and the chosen point."""
    from grad2.data import thief_pool, to_tensor
    from grad2.serving import build_archive, read_manifest
    from grad2.serving_io import load_served_model

    manifest = read_manifest(archive)["model"]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(folder)
        config_path = folder / "model-config.yaml"
        if not config_path.is_file():
            raise ConfigError("defense", f"{archive} has no model-config.yaml")
        raw = yaml.safe_load(config_path.read_text()) or {}
        if "defense" not in raw:
            raise ConfigError("defense", f"{archive}'s model-config.yaml has no defense section")
        method = raw["defense"].get("method", "grad2")
        if method not in BUDGETED:
            raise ConfigError(
                "defense.method", f"{method} has no epsilon to tune; tunable: {', '.join(BUDGETED)}"
            )

        def served_with(epsilon: float):
            changed = copy.deepcopy(raw)
            changed["defense"]["epsilon"] = epsilon
            return load_served_model(folder, changed)

        served = served_with(0.0)
        validation = thief_pool("fashion_heldout", size=validation_size, seed=1)
        inputs = to_tensor(validation.images)
        if tuple(inputs.shape[1:]) != (served.input_config.channels, served.input_config.height,
                                       served.input_config.width):
            raise ValueError("the built-in validation split (Fashion-MNIST 1x28x28) does not "
                             "fit this archive's input section")
        if len(served.class_names) != validation.num_classes:
            raise ValueError("the archive's classes are not Fashion-MNIST's")
        labels = torch.from_numpy(validation.labels)
        clean = predict_probs(served.victim, inputs)
        thief = None
        if simulate_thief:
            pool_inputs = to_tensor(thief_pool("animal", size=thief_budget, seed=2).images)
            pool_clean = predict_probs(served.victim, pool_inputs)

            def thief(defense: Defense) -> float:
                answers = torch.cat([defense(pool_inputs[i:i + 500], pool_clean[i:i + 500])
                                     for i in range(0, len(pool_inputs), 500)])
                clone = train_clone(pool_inputs, answers.float(), epochs=thief_epochs,
                                    progress=False)
                return float((predict_probs(clone, inputs).argmax(1) == labels).float().mean())

        points = sweep_epsilon(lambda e: served_with(e).defense, inputs, labels, clean,
                               epsilons, thief, progress=progress)
        chosen = pick_epsilon(points, max_accuracy_drop)
        out.mkdir(parents=True, exist_ok=True)
        new_version = version or next_version(manifest["modelVersion"])
        tuned = copy.deepcopy(raw)
        tuned["defense"]["epsilon"] = chosen.epsilon
        tuned_config = out / f"model-config-{new_version}.yaml"
        tuned_config.write_text(yaml.safe_dump(tuned, sort_keys=False))
        (out / "tune.json").write_text(json.dumps({
            "archive": str(archive), "version": new_version,
            "max_accuracy_drop": max_accuracy_drop, "chosen": asdict(chosen),
            "points": [asdict(p) for p in points],
        }, indent=1))
        plot_points(points, out / "tune.png", max_accuracy_drop)
        surrogate_name = raw["defense"].get("surrogate") or "surrogate.pt"
        target_name = raw["defense"].get("target_file")
        index = folder / "index_to_name.json"
        new_archive = build_archive(
            name=manifest["modelName"], version=new_version,
            victim=folder / manifest["serializedFile"], config=tuned_config,
            export_path=export_path,
            surrogate=folder / surrogate_name if (folder / surrogate_name).is_file() else None,
            target=folder / target_name if target_name else None,
            index_to_name=index if index.is_file() else None,
            archive_name=f"{manifest['modelName']}_v{new_version}", force=force,
        )
    return new_archive, points, chosen


def _tune_command(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    archive, points, chosen = tune_archive(
        Path(args.archive), args.max_accuracy_drop, Path(args.export_path), Path(args.out),
        epsilons=args.epsilons, version=args.next_version,
        validation_size=args.validation_size, simulate_thief=args.simulate_thief,
        progress=not args.no_progress, force=args.force,
    )
    print(print_table(points, chosen))
    print(f"chosen epsilon {chosen.epsilon:g}; built {archive}; report in {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune", help="choose epsilon for a model version and build the next version's archive"
    )
    parser.add_argument("--archive", required=True, help="a .mar built by grad2 archive")
    parser.add_argument("--max-accuracy-drop", type=float, default=1.0,
                        help="percentage points of validation accuracy the defense may cost")
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(DEFAULT_GRID))
    parser.add_argument("--next-version", help="default: the archive's version + .1")
    parser.add_argument("--validation-size", type=int, default=2000,
                        help="held-out Fashion-MNIST images the victim never saw")
    parser.add_argument("--simulate-thief", action="store_true",
                        help="also train a quick clone on each epsilon's answers")
    parser.add_argument("--export-path", default="model_store")
    parser.add_argument("--out", default="runs/tune")
    parser.add_argument("--force", action="store_true", help="overwrite the new archive")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_tune_command)

