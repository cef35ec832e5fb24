"""Watermark reprogramming and ownership verification.

``grad2 watermark create`` draws secret trigger images (seeded, out of distribution for the
victim; by default animal-like silhouettes the surrogate is unsure of) and secret labels,
builds the ``watermark`` target ``t = mean_w ∇_θ log s_θ(y_w | x_w)`` from the surrogate,
and writes the target (packed in the archive as ``defense.target_file``) and the secret
(kept by the owner) to separate files. A clone trained on the answers of an API serving it
(``target: file``) is steered toward mapping the triggers to their labels.

``grad2 watermark verify --secret S (--model clone.pt | --url URL)`` tests a suspect with
two statistics, both exact under the null hypothesis "the suspect is independent of the
secret labels" (see :func:`verify_scores`):

- matches: triggers whose top-1 class is the watermark label; one-sided binomial p-value
  with chance ``1/K`` per trigger;
- rank sum: the rank (1 = top) the suspect gives each watermark label, summed over the
  triggers; exact one-sided p-value of the sum of ``W`` independent uniform ranks on
  ``1..K``. It uses the whole ordering, so a clone that puts the labels second or third
  still counts as evidence: more power at the same validity.

``grad2 watermark evaluate`` trains clones on a watermarked API's answers and verifies
them; docs/watermark.md has the measurements (the watermark barely transfers here).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from grad2 import targets
from grad2.balance import balance_target
from grad2.defenses import GRAD2, Defense
from grad2.lab.data import to_tensor
from grad2.lab.families import SHORT_EPSILONS
from grad2.models import load_checkpoint, penultimate
from grad2.redirect import redirect, solve_answers
from grad2.scores import eval_mode

DEFAULT_TRIGGERS = 20
#: Defaults from the measurements in docs/watermark.md: animal-like silhouettes, the 20 the
#: surrogate is least sure of among 1,000, plain (not equalized) target.
DEFAULT_STYLE = "silhouettes"
DEFAULT_EQUALIZE = False
DEFAULT_CANDIDATES = 50
TRIGGER_STYLES = ("strokes", "silhouettes")


@dataclass(frozen=True)
class Secret:
    """The owner's secret: trigger images ``uint8 [W, 28, 28]``, labels ``[W]``, seed.

    ``uniform_labels`` says the labels were drawn uniformly from all ``num_classes``
    classes, independently of every model (secrets from before that rule avoided the
    surrogate's own class; they load with ``False`` and get conservative statistics).
    """

    triggers: np.ndarray
    labels: np.ndarray
    seed: int
    num_classes: int
    uniform_labels: bool = True

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:  # np.savez would append ".npz" to other names
            np.savez(handle, triggers=self.triggers, labels=self.labels,
                     seed=np.int64(self.seed), num_classes=np.int64(self.num_classes),
                     uniform_labels=np.bool_(self.uniform_labels))
        return path

    @classmethod
    def load(cls, path: Path) -> Secret:
        with np.load(Path(path), allow_pickle=False) as data:
            uniform = bool(data["uniform_labels"]) if "uniform_labels" in data.files else False
            secret = cls(data["triggers"], data["labels"], int(data["seed"]),
                         int(data["num_classes"]), uniform)
        if secret.triggers.dtype != np.uint8 or secret.triggers.ndim != 3:
            raise ValueError(f"{path}: triggers must be uint8 [W, H, W]")
        if secret.labels.shape != (len(secret.triggers),):
            raise ValueError(f"{path}: one label per trigger expected")
        return secret


# --------------------------------------------------------------------------- triggers


def _segment_distance(start: np.ndarray, end: np.ndarray, side: int) -> np.ndarray:
    """Pixel distances to one segment per image: ``start, end [N, 2]`` -> ``[N, side, side]``."""
    grid = np.stack(np.mgrid[0:side, 0:side])[None].astype(np.float64)  # [1, 2, S, S]
    direction = (end - start)[:, :, None, None]
    offset = grid - start[:, :, None, None]
    length2 = (direction ** 2).sum(axis=1).clip(1e-6)
    along = ((offset * direction).sum(axis=1) / length2).clip(0, 1)
    nearest = start[:, :, None, None] + along[:, None] * direction
    return np.sqrt(((grid - nearest) ** 2).sum(axis=1))


def _strokes(count: int, rng: np.random.Generator, side: int) -> np.ndarray:
    """A few bright random strokes on black, ``float [count, side, side]`` in ``[0, 1]``."""
    images = np.zeros((count, side, side))
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
    return images


def _silhouettes(count: int, rng: np.random.Generator, side: int) -> np.ndarray:
    """Random filled shapes shaped like the silhouettes a thief may send: a rotated
    elliptical body, a head blob and three or four thick limbs, white on black.
    ``float [count, side, side]`` in ``[0, 1]``."""
    grid = np.stack(np.mgrid[0:side, 0:side])[None].astype(np.float64)  # [1, 2, S, S]
    centre = rng.uniform(side * 0.35, side * 0.6, size=(count, 2))
    radii = rng.uniform([3.0, 5.0], [7.0, 11.0], size=(count, 2))
    angle = rng.uniform(0, np.pi, size=count)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    offset = grid - centre[:, :, None, None]
    along = cos * offset[:, 0] + sin * offset[:, 1]
    across = -sin * offset[:, 0] + cos * offset[:, 1]
    body = np.sqrt((along / radii[:, :1, None]) ** 2 + (across / radii[:, 1:, None]) ** 2)
    images = np.clip((1 - body) * min(radii.min(), 4.0) + 0.5, 0, 1)
    head_at = centre + rng.uniform(-1, 1, size=(count, 2)) * radii[:, ::-1]
    head = np.sqrt(((grid - head_at[:, :, None, None]) ** 2).sum(axis=1))
    images = np.maximum(images, np.clip(rng.uniform(2.5, 4.5, (count, 1, 1)) + 0.5 - head, 0, 1))
    for _ in range(4):  # limbs: from inside the body toward the lower edge
        start = centre + rng.uniform(-0.6, 0.6, size=(count, 2)) * radii
        end = np.stack([rng.uniform(side * 0.7, side - 2, count),
                        start[:, 1] + rng.uniform(-5, 5, count)], axis=1)
        width = rng.uniform(1.0, 2.0, size=(count, 1, 1))
        keep = (rng.uniform(size=(count, 1, 1)) < 0.85)
        limb = np.clip(width + 0.5 - _segment_distance(start, end, side), 0, 1) * keep
        images = np.maximum(images, limb)
    return images


def make_triggers(count: int, seed: int, side: int = 28, style: str = DEFAULT_STYLE) -> np.ndarray:
    """``count`` seeded trigger images ``uint8 [count, side, side]``, out of the victim's
    distribution: ``"strokes"`` (bright random strokes on black) or ``"silhouettes"``
    (random animal-like filled shapes, closer to what a knowledge-limited thief sends)."""
    makers = {"strokes": _strokes, "silhouettes": _silhouettes}
    if style not in makers:
        raise ValueError(f"trigger style must be one of {', '.join(makers)}, got {style!r}")
    images = makers[style](count, np.random.default_rng(seed), side)
    return (images * 255).round().astype(np.uint8)


def draw_labels(count: int, seed: int, num_classes: int) -> np.ndarray:
    """``[count]`` labels drawn uniformly from all ``num_classes`` classes, from a generator
    of their own (``seed + 1``): independent of the triggers' looks and of every model.

    Why uniform over all classes: then, for any suspect that did not see the secret, each
    label is an independent uniform draw from the suspect's point of view, so a trigger
    matches with probability exactly ``1/K`` and the label's rank is exactly uniform on
    ``1..K`` — both p-values are exact. Avoiding the surrogate's own class (the former
    rule) makes the chance ``1/(K-1)`` for models that agree with the surrogate, and the
    ``1/K`` binomial anti-conservative.
    """
    return np.random.default_rng(seed + 1).integers(0, num_classes, size=count).astype(np.int64)


def select_ambiguous(candidates: np.ndarray, model: nn.Module, count: int) -> np.ndarray:
    """The ``count`` images of ``candidates`` ``uint8 [M, H, W]`` on which ``model`` is
    least sure (lowest top-class probability), in their original order.

    A clone copies the victim's answers; where those are flat, the watermark label needs
    little extra mass to become the clone's top class. The choice looks at images and the
    model only, never at the labels (drawn afterwards, independently), so the verification
    null stays exact.
    """
    with torch.no_grad(), eval_mode(model):
        top = torch.softmax(model(to_tensor(candidates)), dim=1).max(dim=1).values
    chosen = torch.argsort(top, stable=True)[:count].sort().values
    return candidates[chosen.numpy()]


def create(surrogate: nn.Module, count: int = DEFAULT_TRIGGERS, seed: int | None = None,
           num_classes: int = 10, style: str = DEFAULT_STYLE, equalize: bool = DEFAULT_EQUALIZE,
           candidates: int = DEFAULT_CANDIDATES, references: Tensor | None = None,
           ) -> tuple[dict[str, torch.Tensor], Secret]:
    """Draw a secret (:func:`make_triggers`, :func:`draw_labels`) and build its
    ``watermark`` target from ``surrogate``.

    ``candidates``: draw ``candidates · count`` trigger images and keep the ``count`` the
    surrogate is least sure of (:func:`select_ambiguous`); 1 keeps the first draw.
    ``equalize``: every trigger's gradient at unit norm; ``references`` ``[R, 1, 28, 28]``
    (normalised inputs like the thief's): the contrastive target. Both are options of
    :func:`grad2.targets.watermark`.
    """
    seed = int(np.random.SeedSequence().entropy % 2**62) if seed is None else seed
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    triggers = make_triggers(count * candidates, seed, style=style)
    if candidates > 1:
        triggers = select_ambiguous(triggers, surrogate, count)
    secret = Secret(triggers, draw_labels(count, seed, num_classes), seed, num_classes)
    target = targets.watermark(surrogate, to_tensor(triggers), torch.from_numpy(secret.labels),
                               equalize=equalize, references=references)
    return target, secret


# --------------------------------------------------------------------------- statistics


def binomial_tail(successes: int, trials: int, chance: float) -> float:
    """``P(X ≥ successes)`` for ``X ~ Binomial(trials, chance)``."""
    return float(sum(
        math.comb(trials, k) * chance**k * (1 - chance) ** (trials - k)
        for k in range(successes, trials + 1)
    ))


def label_ranks(scores: np.ndarray | Tensor, labels: np.ndarray) -> np.ndarray:
    """Rank (1 = top) of each label among its row's scores ``[W, K]`` -> ``[W]`` ints.

    Ties count against the suspect: the rank is the number of classes scoring at least
    as high as the label (itself included), which is never below the rank any tie-break
    would give, so p-values computed as if ranks were uniform stay valid (conservative).
    """
    scores = np.asarray(scores, dtype=np.float64)
    label_scores = np.take_along_axis(scores, np.asarray(labels)[:, None], axis=1)
    return (scores >= label_scores).sum(axis=1)


def rank_sum_cdf(total: int, count: int, num_classes: int) -> float:
    """``P(R_1 + … + R_count ≤ total)`` for independent ``R_i`` uniform on ``1..num_classes``.

    Exact: the number of ways to reach each sum is built with integers (one sliding-window
    sum per term), then divided once by ``num_classes ** count``.
    """
    if total < count:
        return 0.0
    if total >= count * num_classes:
        return 1.0
    ways = [1]  # ways[s]: number of rank vectors so far whose sum is (terms so far) + s
    for _ in range(count):
        prefix = [0, *accumulate(ways)]
        length = len(ways) + num_classes - 1
        ways = [prefix[min(s + 1, len(ways))] - prefix[max(s + 1 - num_classes, 0)]
                for s in range(length)]
    favourable = sum(ways[: total - count + 1])
    return float(favourable / num_classes**count) if favourable else 0.0


def verify_scores(secret: Secret, scores: np.ndarray | Tensor) -> dict:
    """Both ownership statistics from a suspect's trigger scores ``[W, K]`` (logits or
    probabilities; only their order per row is used).

    Null hypothesis: the suspect is independent of the secret labels (it never learned from
    answers that carry this watermark). With labels drawn uniformly (:func:`draw_labels`)
    each trigger then matches its label with probability ``1/K`` and ranks it uniformly on
    ``1..K``, independently across triggers, whatever the suspect is:

    - ``matches`` (top-1 equals the label) and ``p_value = P(Binomial(W, 1/K) ≥ matches)``;
    - ``rank_sum = Σ_w rank_w`` and ``rank_p_value = P(Σ uniform ranks ≤ rank_sum)``, exact.

    Legacy secrets (labels avoided the surrogate's class): each trigger matches with
    probability at most ``1/(K-1)``, which the binomial then uses (conservative); the rank
    statistic has no exact null there and is reported as ``None``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(secret.labels), secret.num_classes):
        raise ValueError(f"expected scores [{len(secret.labels)}, {secret.num_classes}], "
                         f"got {scores.shape}")
    count, num_classes = len(secret.labels), secret.num_classes
    matches = int((scores.argmax(axis=1) == secret.labels).sum())
    chance = 1.0 / num_classes if secret.uniform_labels else 1.0 / (num_classes - 1)
    ranks = label_ranks(scores, secret.labels)
    rank_sum = int(ranks.sum())
    return {
        "triggers": count,
        "matches": matches,
        "match_rate": matches / count,
        "chance": chance,
        "p_value": binomial_tail(matches, count, chance),
        "ranks": ranks.tolist(),
        "rank_sum": rank_sum,
        "rank_sum_expected": count * (num_classes + 1) / 2,
        "rank_p_value": (rank_sum_cdf(rank_sum, count, num_classes)
                         if secret.uniform_labels else None),
    }


def null_rejection_rates(scores: np.ndarray | Tensor, num_classes: int, draws: int,
                         levels: tuple[float, ...] = (0.05, 0.01, 0.001), seed: int = 0,
                         ) -> dict[str, dict[str, float]]:
    """Calibration check on a real suspect: for ``draws`` fresh uniform label vectors (a
    suspect independent of them by construction), the fraction of binomial and rank-sum
    p-values at or below each level; both should be at most the level (discrete tests sit
    a little below it). ``scores``: the suspect's trigger scores ``[W, K]``."""
    scores = np.asarray(scores, dtype=np.float64)
    count = len(scores)
    labels = np.random.default_rng(seed).integers(0, num_classes, size=(draws, count))
    label_scores = np.take_along_axis(scores[None].repeat(draws, 0), labels[..., None], 2)
    ranks = (scores[None] >= label_scores).sum(axis=2)  # [draws, W], ties against
    rank_cdf = np.array([rank_sum_cdf(t, count, num_classes)
                         for t in range(count * num_classes + 1)])
    binomial = np.array([binomial_tail(m, count, 1 / num_classes) for m in range(count + 1)])
    p_values = {"rank_p_value": rank_cdf[ranks.sum(axis=1)],
                "p_value": binomial[(ranks == 1).sum(axis=1)]}
    return {name: {f"{level:g}": float((values <= level).mean()) for level in levels}
            for name, values in p_values.items()}


def verify_predictions(secret: Secret, predicted: np.ndarray) -> dict:
    """Matches and binomial p-value from top-1 predictions ``[W]`` alone (no ranks)."""
    one_hot = np.eye(secret.num_classes)[np.asarray(predicted)]
    report = verify_scores(secret, one_hot)
    return {key: report[key] for key in ("triggers", "matches", "match_rate", "chance",
                                         "p_value")}


def verify_model(secret: Secret, model: nn.Module) -> dict:
    """:func:`verify_scores` on a local model's trigger logits."""
    with torch.inference_mode():
        logits = model.eval()(to_tensor(secret.triggers)).float().numpy()
    return verify_scores(secret, logits)


def verify_url(secret: Secret, url: str, token: str | None) -> dict:
    """:func:`verify_scores` on the probabilities a prediction endpoint returns."""
    from grad2.lab.attack import APIClient

    answers, answered, _, _ = APIClient(url, token).query(secret.triggers, progress=False)
    if len(answered) != len(secret.triggers):
        raise RuntimeError(f"{len(secret.triggers) - len(answered)} trigger queries failed")
    return verify_scores(secret, answers.numpy())


# --------------------------------------------------------------------------- focused budget


def watermark_gain(probs: Tensor, scores: Tensor) -> Tensor:
    """``[B]``: how much the target gains per unit of mass moved to the best class,
    ``max_k c_k − c·y`` (``probs``, ``scores``: ``[B, K]``). Large where the query's
    answer can move the clone along the watermark direction."""
    return scores.max(dim=1).values - (scores * probs).sum(dim=1)


class FocusedGRAD2(Defense):
    """GRAD² that spends ``high_epsilon`` on queries whose :func:`watermark_gain` reaches
    ``threshold`` and nothing on the others: the budget goes where it steers most.

    A pure function of the query (fixed threshold, eval-mode surrogate). The mean L1 it
    spends depends on the query distribution: :func:`calibrate_threshold` sets it on
    reference queries.
    """

    def __init__(self, grad2: GRAD2, threshold: float, high_epsilon: float = 2.0) -> None:
        self.grad2, self.threshold, self.high_epsilon = grad2, float(threshold), high_epsilon

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        scores = self.grad2.scores(x, probs)
        spend = (watermark_gain(probs, scores) >= self.threshold).to(probs.dtype)
        return redirect(probs, scores, spend * self.high_epsilon)


def calibrate_threshold(gains: Tensor, probs: Tensor, scores: Tensor, budget: float,
                        high_epsilon: float = 2.0) -> float:
    """The lowest gain threshold whose :class:`FocusedGRAD2` spends a mean L1 of at most
    ``budget`` on these reference queries (``gains [N]``, ``probs, scores [N, K]``)."""
    best = scores.argmax(dim=1, keepdim=True)
    cost = (2 * (1 - probs.gather(1, best).squeeze(1))).clamp(max=high_epsilon)
    order = torch.argsort(gains, descending=True)
    mean_spend = torch.cumsum(cost[order], 0) / len(gains)
    affordable = int((mean_spend <= budget).sum())
    return float("inf") if affordable == 0 else float(gains[order][affordable - 1])


class NeighbourPush(Defense):
    """Not gradient redirection: a query close to a trigger (cosine similarity of the
    surrogate's centred penultimate features at least ``threshold``) gets ``high_epsilon``
    of L1 moved to the nearest trigger's watermark label, taken from its likeliest classes
    first; every other query is answered unchanged. A clone then learns the labels
    around the triggers. A pure function of the query. With ``preserve_top1`` the push
    stops where the label would flip (the clean top class stays first).

    ``triggers`` ``[W, 1, H, W]`` and ``labels`` ``[W]`` come from the secret, ``centre``
    ``[D]`` is the mean feature of reference queries (:meth:`fit`).
    """

    def __init__(self, surrogate: nn.Module, triggers: Tensor, labels: Tensor, centre: Tensor,
                 threshold: float, high_epsilon: float = 2.0, preserve_top1: bool = False,
                 ) -> None:
        self.surrogate, self.labels, self.centre = surrogate.eval(), labels.long(), centre
        self.trigger_features = self._unit(penultimate(surrogate, triggers))
        self.threshold, self.high_epsilon = float(threshold), float(high_epsilon)
        self.preserve_top1 = bool(preserve_top1)

    def _unit(self, features: Tensor) -> Tensor:
        return torch.nn.functional.normalize(features - self.centre, dim=1)

    def nearest(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(similarity [B], trigger index [B])`` of each query's nearest trigger."""
        similarity = self._unit(penultimate(self.surrogate, x)) @ self.trigger_features.T
        return similarity.max(dim=1)

    def defend(self, x: Tensor, probs: Tensor) -> Tensor:
        similarity, index = self.nearest(x)
        receivers = self.labels.to(probs.device)[index]
        scores = (-probs).scatter(1, receivers.unsqueeze(1), 2.0)
        spend = (similarity >= self.threshold).to(probs.dtype) * self.high_epsilon
        return solve_answers(probs, scores, spend, self.preserve_top1)

    @classmethod
    def fit(cls, surrogate: nn.Module, secret: Secret, references: Tensor,
            reference_probs: Tensor, budget: float, high_epsilon: float = 2.0,
            preserve_top1: bool = False) -> NeighbourPush:
        """Centre on ``references`` ``[R, ...]`` and pick the lowest threshold whose mean
        L1 on them (clean answers ``reference_probs [R, K]``) stays within ``budget``."""
        centre = penultimate(surrogate, references).mean(dim=0)
        defense = cls(surrogate, to_tensor(secret.triggers), torch.from_numpy(secret.labels),
                      centre, -float("inf"), high_epsilon, preserve_top1)
        similarity, _ = defense.nearest(references)
        # What each reference would cost if pushed (every one is, at threshold -inf).
        cost = (defense.defend(references, reference_probs) - reference_probs).abs().sum(dim=1)
        defense.threshold = float("inf")
        order = torch.argsort(similarity, descending=True)
        affordable = int((torch.cumsum(cost[order], 0) / len(references) <= budget).sum())
        if affordable:
            defense.threshold = float(similarity[order][affordable - 1])
        return defense


# --------------------------------------------------------------------------- evaluation


def evaluate_watermark(
    epsilons: tuple[float, ...] = SHORT_EPSILONS, seeds: tuple[int, ...] = (0,),
    pool: str = "animal", secret_seed: int = 2024, count: int = DEFAULT_TRIGGERS,
    clone_epochs: int | None = None, out: Path = Path("runs/watermark"),
    pool_size: int | None = None, style: str = DEFAULT_STYLE,
    focus_epsilon: float | None = None, progress: bool = True,
    equalize: bool = DEFAULT_EQUALIZE, surrogate_epochs: int | None = None,
    candidates: int = DEFAULT_CANDIDATES, contrast: bool = False, neighbours: bool = False,
    centre: bool = False, preserve_top1: bool = False, balance: bool = False,
) -> list[dict]:
    """Clones trained on a watermark-defended API's answers, at several budgets.

    Every clone row: epsilon, seed, the defender's test accuracy and effective L1 on the
    Fashion test split (utility cost), the L1 spent on the thief's queries, the clone's
    test accuracy and both verification statistics. Independent models (the victim, both
    surrogates) are verified as negative controls; clones at epsilon 0 are a third.

    ``focus_epsilon``: use :class:`FocusedGRAD2` (``high_epsilon = focus_epsilon``) with
    its threshold calibrated so that the mean L1 on 2,000 reference queries of ``pool``
    (seed 99, the defender's simulated thief) is ``epsilon``; otherwise plain GRAD².
    ``surrogate_epochs``: a surrogate trained that many epochs of the lab's planned
    schedule (cached beside the lab's models) instead of the lab's early-stopped one.
    ``contrast``: the contrastive target, references = 2,000 images of ``pool`` (seed 99).
    ``neighbours``: :class:`NeighbourPush` instead of GRAD² (``high_epsilon =
    focus_epsilon or 2``), calibrated on the same reference queries. ``centre``: the
    target's scores centred per class on those queries (:func:`grad2.targets.centre_scores`).
    ``preserve_top1``: GRAD² that never flips a label (no defender accuracy lost, so budgets
    up to L1 2 are open to it). ``balance``: per budget, the target's scores shifted so
    that the answers keep the clean mean answer on those queries
    (:func:`grad2.balance.balance_target`).
    """
    from grad2.lab.data import cache_dir, thief_pool
    from grad2.lab.evaluate import Lab, apply_defense
    from grad2.lab.train import CLONE_EPOCHS, train_clone
    from grad2.models import predict_probs

    lab = Lab(cache_dir() / "eval", progress=progress)
    surrogate = (lab.surrogate(pool) if surrogate_epochs is None
                 else _longer_surrogate(lab, pool, surrogate_epochs, progress))
    reference = lab.references(pool)
    target, secret = create(surrogate, count, secret_seed, style=style, equalize=equalize,
                            candidates=candidates, references=reference if contrast else None)
    out.mkdir(parents=True, exist_ok=True)
    secret.save(out / "secret.npz")
    inputs = to_tensor(thief_pool(pool, size=pool_size, seed=0).images)
    clean = predict_probs(lab.victim, inputs)
    other = "fashion_heldout" if pool == "animal" else "animal"
    rows: list[dict] = [
        {"model": name, **verify_model(secret, model)}
        for name, model in (("victim", lab.victim), ("surrogate", surrogate),
                            ("other surrogate", lab.surrogate(other)))
    ]
    reference_probs = predict_probs(lab.victim, reference)
    if centre:
        target = targets.centre_scores(surrogate, target, reference)
    if focus_epsilon is not None and not neighbours:
        reference_scores = GRAD2(surrogate, 1.0, target).scores(reference, reference_probs)
        reference_gains = watermark_gain(reference_probs, reference_scores)
    for epsilon in epsilons:
        defense: Defense = GRAD2(surrogate, epsilon, target, preserve_top1=preserve_top1)
        if balance and epsilon > 0:
            balanced, _ = balance_target(defense, reference, reference_probs)
            defense = GRAD2(surrogate, epsilon, balanced, preserve_top1=preserve_top1)
        threshold = None
        if neighbours and epsilon > 0:
            defense = NeighbourPush.fit(surrogate, secret, reference, reference_probs, epsilon,
                                        focus_epsilon or 2.0, preserve_top1)
            threshold = defense.threshold
        elif focus_epsilon is not None and epsilon > 0:
            threshold = calibrate_threshold(reference_gains, reference_probs, reference_scores,
                                            epsilon, focus_epsilon)
            defense = FocusedGRAD2(defense, threshold, focus_epsilon)
        answers = apply_defense(defense, inputs, clean, progress=progress,
                                desc=f"watermark eps {epsilon:g}")
        test_answers = apply_defense(defense, lab.test_inputs, lab.test_probs, progress=False)
        for seed in seeds:
            clone = train_clone(inputs, answers, epochs=clone_epochs or CLONE_EPOCHS, seed=seed,
                                progress=progress)
            with torch.inference_mode():
                predicted = clone(lab.test_inputs).argmax(dim=1)
            rows.append({
                "model": "clone", "epsilon": epsilon, "seed": seed, "style": style,
                "equalize": equalize, "surrogate_epochs": surrogate_epochs,
                "candidates": candidates, "contrast": contrast, "neighbours": neighbours,
                "centre": centre, "preserve_top1": preserve_top1, "balance": balance,
                "focus_epsilon": focus_epsilon, "threshold": threshold,
                "defender_accuracy": float((test_answers.argmax(1) == lab.test_labels)
                                           .float().mean()),
                "effective_l1": float((test_answers - lab.test_probs).abs().sum(1).mean()),
                "pool_l1": float((answers - clean).abs().sum(1).mean()),
                "clone_accuracy": float((predicted == lab.test_labels).float().mean()),
                **verify_model(secret, clone),
            })
            print(json.dumps(rows[-1]), flush=True)
            (out / "watermark.json").write_text(json.dumps(rows, indent=1))
    (out / "watermark.json").write_text(json.dumps(rows, indent=1))
    return rows


def _longer_surrogate(lab, pool: str, epochs: int, progress: bool) -> nn.Module:
    """The lab's surrogate recipe run for ``epochs`` epochs (cached as a checkpoint)."""
    from grad2.lab.data import thief_pool
    from grad2.lab.evaluate import EVAL_SURROGATE_PLANNED_EPOCHS
    from grad2.lab.train import train_surrogate
    from grad2.models import save_checkpoint

    path = lab.folder / "models" / f"surrogate_{pool}_e{epochs}.pt"
    if path.exists():
        return load_checkpoint(path)[0]
    surrogate = train_surrogate(lab.victim, thief_pool(pool, seed=0), epochs=epochs,
                                planned_epochs=max(epochs, EVAL_SURROGATE_PLANNED_EPOCHS),
                                seed=7, progress=progress)
    save_checkpoint(surrogate, path, {"role": f"surrogate_{pool}", "epochs": epochs})
    return surrogate


def format_rows(rows: list[dict]) -> str:
    """A fixed-width text table of :func:`evaluate_watermark` rows."""
    lines = ["model            eps   defender  test L1  pool L1  clone acc  matches  "
             "binom p   rank sum  rank p"]
    nan = float("nan")
    for row in rows:
        eps = f"{row['epsilon']:.2f}" if "epsilon" in row else "   -"
        rank_p = row.get("rank_p_value")
        lines.append(
            f"{row['model']:<15} {eps}  {100 * row.get('defender_accuracy', nan):8.2f}"
            f"  {row.get('effective_l1', nan):7.3f}  {row.get('pool_l1', nan):7.3f}  "
            f"{100 * row.get('clone_accuracy', nan):9.2f}  "
            f"{row['matches']:>3}/{row['triggers']:<3}  {row['p_value']:.2e}  "
            f"{row['rank_sum']:>4}/{row['rank_sum_expected']:<5g} "
            f"{'-' if rank_p is None else f'{rank_p:.2e}'}")
    return "\n".join(lines)


def _evaluate_command(args: argparse.Namespace) -> int:
    from grad2.lab.train import set_threads

    set_threads(args.threads)
    rows = evaluate_watermark(tuple(args.epsilons), tuple(args.seeds), args.pool,
                              secret_seed=args.secret_seed, count=args.triggers,
                              clone_epochs=args.clone_epochs, out=Path(args.out),
                              pool_size=args.pool_size, style=args.style,
                              focus_epsilon=args.focus_epsilon, progress=not args.no_progress,
                              equalize=args.equalize, surrogate_epochs=args.surrogate_epochs,
                              candidates=args.candidates, contrast=args.contrast,
                              neighbours=args.neighbours, centre=args.centre,
                              preserve_top1=args.preserve_top1, balance=args.balance)
    print(format_rows(rows))
    return 0


def _create_command(args: argparse.Namespace) -> int:
    surrogate, _ = load_checkpoint(args.surrogate)
    references = None
    if args.references:
        from grad2.lab.data import thief_pool

        references = to_tensor(thief_pool(args.references, size=2000, seed=99).images)
    target, secret = create(surrogate, args.triggers, args.seed, style=args.style,
                            equalize=args.equalize, candidates=args.candidates,
                            references=references)
    targets.save(target, args.target_out)
    secret.save(args.secret_out)
    print(f"target: {args.target_out} (pack it with grad2 archive --target, "
          f"defense.target: file, defense.target_file: {Path(args.target_out).name})")
    print(f"secret: {args.secret_out} (keep it private; it proves ownership)")
    return 0


def _verify_command(args: argparse.Namespace) -> int:
    secret = Secret.load(args.secret)
    if args.model:
        model, _ = load_checkpoint(args.model)
        report = verify_model(secret, model)
        if args.null_draws:
            with torch.inference_mode():
                logits = model.eval()(to_tensor(secret.triggers)).float().numpy()
            report["null_rejection_rates"] = null_rejection_rates(
                logits, secret.num_classes, args.null_draws)
    else:
        from grad2.lab.attack import read_token

        report = verify_url(secret, args.url, read_token(args.token_file)
                            if args.token_file else None)
    print(json.dumps(report, indent=2))
    return 0


def _add_equalize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--equalize", action=argparse.BooleanOptionalAction,
                        default=DEFAULT_EQUALIZE,
                        help="scale every trigger's gradient to unit norm in the target")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                        help="draw this many images per trigger, keep the surrogate's least "
                             "sure")


def register(subparsers: argparse._SubParsersAction) -> None:
    watermark = subparsers.add_parser("watermark", help="create, evaluate or verify a watermark")
    actions = watermark.add_subparsers(dest="action", required=True)
    create_parser = actions.add_parser("create", help="draw triggers, build the target")
    create_parser.add_argument("--surrogate", required=True, type=Path)
    create_parser.add_argument("--triggers", type=int, default=DEFAULT_TRIGGERS)
    create_parser.add_argument("--style", choices=TRIGGER_STYLES, default=DEFAULT_STYLE)
    create_parser.add_argument("--seed", type=int, help="secret seed (default: fresh entropy)")
    _add_equalize(create_parser)
    create_parser.add_argument("--references", choices=("animal", "fashion_heldout"),
                               help="contrastive target against 2,000 images of this pool")
    create_parser.add_argument("--target-out", type=Path, default=Path("watermark_target.pt"))
    create_parser.add_argument("--secret-out", type=Path, default=Path("watermark_secret.npz"))
    create_parser.set_defaults(func=_create_command)
    evaluate = actions.add_parser("evaluate", help="clones of a watermarked API vs epsilon")
    evaluate.add_argument("--epsilons", type=float, nargs="+", default=list(SHORT_EPSILONS))
    evaluate.add_argument("--seeds", type=int, nargs="+", default=[0])
    evaluate.add_argument("--pool", default="animal", choices=("animal", "fashion_heldout"))
    evaluate.add_argument("--clone-epochs", type=int)
    evaluate.add_argument("--pool-size", type=int, help="thief queries (default: whole pool)")
    evaluate.add_argument("--triggers", type=int, default=DEFAULT_TRIGGERS)
    evaluate.add_argument("--style", choices=TRIGGER_STYLES, default=DEFAULT_STYLE)
    evaluate.add_argument("--secret-seed", type=int, default=2024)
    _add_equalize(evaluate)
    evaluate.add_argument("--neighbours", action="store_true",
                          help="NeighbourPush (not GRAD²): push queries near a trigger to "
                               "its label, --focus-epsilon each (default 2)")
    evaluate.add_argument("--centre", action="store_true",
                          help="centre the target's scores per class on 2,000 pool images")
    evaluate.add_argument("--preserve-top1", action="store_true",
                          help="GRAD² that never flips a label (budgets up to 2 cost no "
                               "defender accuracy)")
    evaluate.add_argument("--balance", action="store_true",
                          help="per budget, keep the clean mean answer on 2,000 pool images "
                               "(class-balanced scores)")
    evaluate.add_argument("--contrast", action="store_true",
                          help="contrastive target against 2,000 images of the pool (seed 99)")
    evaluate.add_argument("--surrogate-epochs", type=int,
                          help="train a surrogate this many epochs instead of the lab's")
    evaluate.add_argument("--focus-epsilon", type=float,
                          help="spend this L1 on the highest-gain queries only (FocusedGRAD2), "
                               "calibrated to a mean of --epsilons on reference queries")
    evaluate.add_argument("--out", default="runs/watermark")
    evaluate.add_argument("--threads", type=int)
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=_evaluate_command)

    verify = actions.add_parser("verify", help="test a suspect for a watermark secret's "
                                "triggers")
    verify.add_argument("--secret", type=Path, required=True,
                        help="a watermark secret (grad2 watermark create)")
    suspect = verify.add_mutually_exclusive_group(required=True)
    suspect.add_argument("--model", type=Path, help="a checkpoint (grad2 models format)")
    suspect.add_argument("--url", help="a prediction endpoint returning probabilities")
    verify.add_argument("--token-file", type=Path)
    verify.add_argument("--null-draws", type=int, default=0,
                        help="with --model: also report how often each test rejects this "
                             "model over this many random label vectors (calibration check)")
    verify.set_defaults(func=_verify_command)
