"""Watermark reprogramming and ownership verification.

``grad2 watermark create`` draws secret trigger images (out of distribution: seeded
random strokes on black, unlike any garment) and secret labels, builds the ``watermark``
target ``t = mean_w ∇_θ log s_θ(y_w | x_w)`` from the surrogate, and writes the target
(packed in the archive as ``defense.target_file``) and the secret (kept by the owner)
to separate files. A clone trained on a ``target: watermark`` API's answers is steered
toward mapping the triggers to their labels.

``grad2 verify --secret S (--model clone.pt | --url URL)`` counts the triggers a suspect
maps to their watermark labels and gives the one-sided binomial p-value against chance
(``1/K`` per trigger).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from grad2 import targets
from grad2.data import to_tensor
from grad2.models import load_checkpoint

DEFAULT_TRIGGERS = 20


@dataclass(frozen=True)
class Secret:
    """The owner's secret: trigger images ``uint8 [W, 28, 28]``, labels ``[W]``, seed."""

    triggers: np.ndarray
    labels: np.ndarray
    seed: int
    num_classes: int

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:  # np.savez would append ".npz" to other names
            np.savez(handle, triggers=self.triggers, labels=self.labels,
                     seed=np.int64(self.seed), num_classes=np.int64(self.num_classes))
        return path

    @classmethod
    def load(cls, path: Path) -> Secret:
        with np.load(Path(path), allow_pickle=False) as data:
            secret = cls(data["triggers"], data["labels"], int(data["seed"]),
                         int(data["num_classes"]))
        if secret.triggers.dtype != np.uint8 or secret.triggers.ndim != 3:
            raise ValueError(f"{path}: triggers must be uint8 [W, H, W]")
        if secret.labels.shape != (len(secret.triggers),):
            raise ValueError(f"{path}: one label per trigger expected")
        return secret


def make_triggers(count: int, seed: int, side: int = 28) -> np.ndarray:
    """``count`` seeded out-of-distribution images: a few bright random strokes on black."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, side, side), dtype=np.float32)
    rows, cols = np.mgrid[0:side, 0:side]
    for _ in range(4):  # four strokes per image, vectorised over images
        start = rng.uniform(2, side - 2, size=(count, 2, 1, 1))
        end = rng.uniform(2, side - 2, size=(count, 2, 1, 1))
        width = rng.uniform(1.0, 2.5, size=(count, 1, 1))
        direction = end - start
        length2 = (direction ** 2).sum(axis=1).clip(1e-6)
        offset = np.stack([rows, cols])[None] - start
        t = ((offset * direction).sum(axis=1) / length2).clip(0, 1)
        nearest = start[:, :, 0, 0, None, None] + t[:, None] * direction[:, :, 0, 0, None, None]
        distance = np.sqrt(((np.stack([rows, cols])[None] - nearest) ** 2).sum(axis=1))
        images = np.maximum(images, np.clip(width + 0.5 - distance, 0, 1))
    return (images * 255).round().astype(np.uint8)


def create(surrogate: nn.Module, count: int = DEFAULT_TRIGGERS, seed: int | None = None,
           num_classes: int = 10) -> tuple[dict[str, torch.Tensor], Secret]:
    """Draw a secret and build its ``watermark`` target from ``surrogate``.

    Labels are drawn uniformly among the classes the surrogate does *not* predict for
    each trigger, so a match is evidence of the watermark, not of the triggers' looks.
    """
    seed = int(np.random.SeedSequence().entropy % 2**62) if seed is None else seed
    triggers = make_triggers(count, seed)
    with torch.no_grad():
        predicted = surrogate.eval()(to_tensor(triggers)).argmax(dim=1).numpy()
    rng = np.random.default_rng(seed + 1)
    labels = (predicted + rng.integers(1, num_classes, size=count)) % num_classes
    secret = Secret(triggers, labels.astype(np.int64), seed, num_classes)
    target = targets.watermark(surrogate, to_tensor(triggers), torch.from_numpy(secret.labels))
    return target, secret


def binomial_tail(successes: int, trials: int, chance: float) -> float:
    """``P(X ≥ successes)`` for ``X ~ Binomial(trials, chance)``."""
    return float(sum(
        math.comb(trials, k) * chance**k * (1 - chance) ** (trials - k)
        for k in range(successes, trials + 1)
    ))


def verify_predictions(secret: Secret, predicted: np.ndarray) -> dict:
    """Match rate of a suspect's trigger predictions, against chance."""
    matches = int((np.asarray(predicted) == secret.labels).sum())
    chance = 1.0 / secret.num_classes
    return {
        "triggers": len(secret.labels),
        "matches": matches,
        "match_rate": matches / len(secret.labels),
        "chance": chance,
        "p_value": binomial_tail(matches, len(secret.labels), chance),
    }


def verify_model(secret: Secret, model: nn.Module) -> dict:
    with torch.inference_mode():
        predicted = model.eval()(to_tensor(secret.triggers)).argmax(dim=1).numpy()
    return verify_predictions(secret, predicted)


def verify_url(secret: Secret, url: str, token: str | None) -> dict:
    from grad2.attack import APIClient

    answers, answered, _, _ = APIClient(url, token).query(secret.triggers, progress=False)
    if len(answered) != len(secret.triggers):
        raise RuntimeError(f"{len(secret.triggers) - len(answered)} trigger queries failed")
    return verify_predictions(secret, answers.argmax(dim=1).numpy())


def evaluate_watermark(
    epsilons: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0), seeds: tuple[int, ...] = (0,),
    pool: str = "animal", secret_seed: int = 2024, count: int = DEFAULT_TRIGGERS,
    clone_epochs: int | None = None, out: Path = Path("runs/watermark"),
    pool_size: int | None = None,
) -> list[dict]:
    """Clones trained on a watermark-defended API's answers, at several budgets.

    Every row: epsilon, seed, the defender's test accuracy and effective L1 (utility
    cost), the clone's test accuracy and its watermark verification. Independent models
    (the victim itself, the other pool's surrogate) are verified as negative controls.
    """
    from grad2.data import cache_dir, thief_pool
    from grad2.defenses import GRAD2
    from grad2.evaluate import Lab, apply_defense
    from grad2.train import CLONE_EPOCHS, predict_probs, train_clone

    lab = Lab(cache_dir() / "eval")
    surrogate = lab.surrogate(pool)
    target, secret = create(surrogate, count, secret_seed)
    out.mkdir(parents=True, exist_ok=True)
    secret.save(out / "secret.npz")
    inputs = to_tensor(thief_pool(pool, size=pool_size, seed=0).images)
    clean = predict_probs(lab.victim, inputs)
    rows = []
    for name, model in (("victim", lab.victim),
                        ("other surrogate", lab.surrogate("fashion_heldout"))):
        rows.append({"model": name, **verify_model(secret, model)})
    for epsilon in epsilons:
        defense = GRAD2(surrogate, epsilon, target)
        answers = apply_defense(defense, inputs, clean, desc=f"watermark eps {epsilon:g}")
        test_answers = apply_defense(defense, lab.test_inputs, lab.test_probs, progress=False)
        for seed in seeds:
            clone = train_clone(inputs, answers, epochs=clone_epochs or CLONE_EPOCHS, seed=seed)
            with torch.inference_mode():
                predicted = clone(lab.test_inputs).argmax(dim=1)
            rows.append({
                "model": "clone", "epsilon": epsilon, "seed": seed,
                "defender_accuracy": float((test_answers.argmax(1) == lab.test_labels)
                                           .float().mean()),
                "effective_l1": float((test_answers - lab.test_probs).abs().sum(1).mean()),
                "clone_accuracy": float((predicted == lab.test_labels).float().mean()),
                **verify_model(secret, clone),
            })
            print(json.dumps(rows[-1]))
    (out / "watermark.json").write_text(json.dumps(rows, indent=1))
    return rows


def _evaluate_command(args: argparse.Namespace) -> int:
    from grad2.train import set_threads

    set_threads(args.threads)
    rows = evaluate_watermark(tuple(args.epsilons), tuple(args.seeds), args.pool,
                              clone_epochs=args.clone_epochs, out=Path(args.out),
                              pool_size=args.pool_size, count=args.triggers)
    print("model            eps   defender  eff.L1  clone acc  matches  p-value")
    for row in rows:
        eps = f"{row['epsilon']:.2f}" if "epsilon" in row else "   -"
        print(f"{row['model']:<15} {eps}  {100 * row.get('defender_accuracy', float('nan')):8.2f}"
              f"  {row.get('effective_l1', float('nan')):6.3f}  "
              f"{100 * row.get('clone_accuracy', float('nan')):9.2f}  "
              f"{row['matches']:>3}/{row['triggers']:<3}  {row['p_value']:.2e}")
    return 0


def _create_command(args: argparse.Namespace) -> int:
    surrogate, _ = load_checkpoint(args.surrogate)
    target, secret = create(surrogate, args.triggers, args.seed)
    targets.save(target, args.target_out)
    secret.save(args.secret_out)
    print(f"target: {args.target_out} (pack it with grad2 archive --target, "
          f"defense.target: watermark, defense.target_file: {Path(args.target_out).name})")
    print(f"secret: {args.secret_out} (keep it private; it proves ownership)")
    return 0


def _verify_command(args: argparse.Namespace) -> int:
    secret = Secret.load(args.secret)
    if args.model:
        model, _ = load_checkpoint(args.model)
        report = verify_model(secret, model)
    else:
        from grad2.attack import read_token

        report = verify_url(secret, args.url, read_token(args.token_file)
                            if args.token_file else None)
    print(json.dumps(report, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    watermark = subparsers.add_parser("watermark", help="create a watermark target and secret")
    actions = watermark.add_subparsers(dest="action", required=True)
    create_parser = actions.add_parser("create", help="draw triggers, build the target")
    create_parser.add_argument("--surrogate", required=True, type=Path)
    create_parser.add_argument("--triggers", type=int, default=DEFAULT_TRIGGERS)
    create_parser.add_argument("--seed", type=int, help="secret seed (default: fresh entropy)")
    create_parser.add_argument("--target-out", type=Path, default=Path("watermark_target.pt"))
    create_parser.add_argument("--secret-out", type=Path, default=Path("watermark_secret.npz"))
    create_parser.set_defaults(func=_create_command)
    evaluate = actions.add_parser("evaluate", help="clones of a watermarked API vs epsilon")
    evaluate.add_argument("--epsilons", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    evaluate.add_argument("--seeds", type=int, nargs="+", default=[0])
    evaluate.add_argument("--pool", default="animal", choices=("animal", "fashion_heldout"))
    evaluate.add_argument("--clone-epochs", type=int)
    evaluate.add_argument("--pool-size", type=int, help="thief queries (default: whole pool)")
    evaluate.add_argument("--triggers", type=int, default=DEFAULT_TRIGGERS)
    evaluate.add_argument("--out", default="runs/watermark")
    evaluate.add_argument("--threads", type=int)
    evaluate.set_defaults(func=_evaluate_command)

    verify = subparsers.add_parser("verify", help="test a suspect model for the watermark")
    verify.add_argument("--secret", required=True, type=Path)
    suspect = verify.add_mutually_exclusive_group(required=True)
    suspect.add_argument("--model", type=Path, help="a checkpoint (grad2 models format)")
    suspect.add_argument("--url", help="a prediction endpoint returning probabilities")
    verify.add_argument("--token-file", type=Path)
    verify.set_defaults(func=_verify_command)
