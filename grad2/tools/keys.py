"""Mapping keys that pass a measured criterion: ``grad2 keygen --archive --images``.

The effect of ``ood_answer: permute`` depends on the class mapping ``σ`` the secret key
draws (docs/results.md, "The key lottery"). :class:`MappingScorer` rates a mapping from
the defender's own data only: the victim's answers ``P [N, K]`` and features ``F [N, D]``
on defender-chosen OOD images (for example transformed training images) and on its own
in-distribution images. :func:`select_key` draws keys from a key source until the mapping
of one passes: its score lies at or below the :data:`PASS_QUANTILE` quantile of the
scores of :data:`CALIBRATION_MAPPINGS` public reference mappings. The key stays secret:
any passing key is as likely as any other, and about a quarter of all mappings pass.

Criteria (:meth:`MappingScorer.criteria`, lower = the mapping hurts a thief more):

- ``simulated_thief``: in-distribution accuracy of a softmax-regression thief trained on the
  victim's features of the OOD images, each moved toward its relabelling under ``σ`` by the
  defense's gate weight (without one: the :data:`MOVED_SHARE` the victim is least sure
  of), measured against the victim's top classes on the defender's in-distribution images;
- ``ood_confusion``: how much mass the victim already puts on ``σ(k)`` for OOD images it
  calls ``k``, weighted by how many land in ``k`` (a mapping into classes the victim
  already mixes up changes little);
- ``own_confusion``: the same on in-distribution images;
- ``similarity``: mean cosine similarity of the victim's class-mean features of ``k`` and
  ``σ(k)`` on in-distribution images;
- ``cycles``: the number of cycles of ``σ``.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from grad2 import gate
from grad2.tools.progress import progress_bar

#: Reference mappings whose scores set the pass threshold (public, seeded draws).
CALIBRATION_MAPPINGS = 64
#: A mapping passes when its score is at or below this quantile of the reference scores.
PASS_QUANTILE = 0.25
#: Share of the OOD images the simulated gate moves: those the victim is least sure of.
MOVED_SHARE = 0.5
#: Draws after which :func:`select_key` gives up (a passing key has about a 1 in 4 chance).
MAX_DRAWS = 1000
#: The criterion :func:`select_key` ranks by (a key of :meth:`MappingScorer.criteria`).
CRITERION = "simulated_thief"
#: Steps and learning rate of the simulated thief's softmax regression.
PROBE_STEPS = 150
PROBE_LR = 0.5
#: Principal components of the victim's features the simulated thief reads.
PROBE_COMPONENTS = 64


def class_confusion(probs: Tensor) -> Tensor:
    """``[K, K]``: row ``k`` is the mean of ``probs [N, K]`` over the rows whose top class
    is ``k`` (zeros for a class no row lands in)."""
    num_classes = probs.shape[1]
    tops = probs.argmax(1)
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    sums.index_add_(0, tops, probs.double())
    counts = torch.bincount(tops, minlength=num_classes).clamp_min(1)
    return sums / counts.unsqueeze(1)


def landing_shares(probs: Tensor) -> Tensor:
    """``[K]``: the share of rows of ``probs [N, K]`` whose top class is each class."""
    tops = probs.argmax(1)
    return torch.bincount(tops, minlength=probs.shape[1]).double() / len(tops)


def class_mean_similarity(features: Tensor, probs: Tensor) -> Tensor:
    """``[K, K]`` cosine similarity of the class-mean ``features [N, D]`` (classes: the top
    of ``probs [N, K]``)."""
    num_classes = probs.shape[1]
    tops = probs.argmax(1)
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    sums.index_add_(0, tops, features.double())
    means = sums / torch.bincount(tops, minlength=num_classes).clamp_min(1).unsqueeze(1)
    unit = torch.nn.functional.normalize(means, dim=1)
    return unit @ unit.T


def cycle_count(mapping: Tensor) -> int:
    """The number of cycles of the permutation ``mapping [K]``."""
    seen = [False] * len(mapping)
    cycles = 0
    for start in range(len(mapping)):
        if not seen[start]:
            cycles += 1
            index = start
            while not seen[index]:
                seen[index] = True
                index = int(mapping[index])
    return cycles


def principal_components(first: Tensor, second: Tensor,
                         components: int = PROBE_COMPONENTS) -> tuple[Tensor, Tensor]:
    """``first [N, D]`` and ``second [M, D]`` projected on the leading ``components``
    principal axes of both together, each axis scaled to unit variance (float32)."""
    both = torch.cat([first, second]).double()
    centre = both.mean(0)
    _, _, axes = torch.linalg.svd(both - centre, full_matrices=False)
    axes = axes[:min(components, axes.shape[0])].T  # [D, C]
    projected = (both - centre) @ axes
    projected = (projected / projected.std(0).clamp_min(1e-6)).float()
    return projected[:len(first)], projected[len(first):]


def moved_answers(probs: Tensor, mapping: Tensor, moved: Tensor) -> Tensor:
    """``[N, K]``: each row of ``probs`` moved toward its relabelling by ``mapping`` by its
    weight ``moved [N]`` in ``[0, 1]`` (a gate's ``α``: 1 answers it fully permuted)."""
    return torch.lerp(probs, gate.relabel(probs, mapping), moved.to(probs.dtype).unsqueeze(1))


def least_sure(probs: Tensor, share: float = MOVED_SHARE) -> Tensor:
    """``[N]`` float: 1 for the ``share`` of rows of ``probs [N, K]`` with the lowest top
    probability (a stand-in gate when the defense has none), 0 elsewhere."""
    sure = probs.max(1).values.double()
    return (sure <= torch.quantile(sure, share)).float()


def fit_softmax_regression(features: Tensor, targets: Tensor, steps: int = PROBE_STEPS,
                           lr: float = PROBE_LR) -> tuple[Tensor, Tensor]:
    """Weights ``[D, K]`` and bias ``[K]`` of a softmax regression fitted to soft
    ``targets [N, K]`` on standardised ``features [N, D]`` (full-batch gradient descent
    from zeros: deterministic)."""
    weights = torch.zeros(features.shape[1], targets.shape[1], requires_grad=True)
    bias = torch.zeros(targets.shape[1], requires_grad=True)
    optimiser = torch.optim.SGD([weights, bias], lr=lr, momentum=0.9)
    x, y = features.float(), targets.float()
    for _ in range(steps):
        optimiser.zero_grad()
        loss = -(y * torch.log_softmax(x @ weights + bias, dim=1)).sum(1).mean()
        loss.backward()
        optimiser.step()
    return weights.detach(), bias.detach()


@dataclass
class MappingScorer:
    """The defender-side statistics a mapping is rated on: the victim's answers and
    features on OOD images (``ood_probs [N, K]``, ``ood_features [N, D]``) and on
    in-distribution images (``own_probs [M, K]``, ``own_features [M, D]``), and how far
    the defense moves each OOD answer (``ood_moved [N]``, its gate's ``α``; default
    :func:`least_sure`)."""

    ood_probs: Tensor
    ood_features: Tensor
    own_probs: Tensor
    own_features: Tensor
    ood_moved: Tensor | None = None

    def __post_init__(self) -> None:
        if self.ood_probs.shape[1] != self.own_probs.shape[1]:
            raise ValueError("OOD and in-distribution answers have different class counts")
        if len(self.ood_probs) < 2 or len(self.own_probs) < 2:
            raise ValueError("the criterion needs at least 2 OOD and 2 in-distribution images")
        self._ood_x, self._own_x = principal_components(self.ood_features, self.own_features)
        self._own_tops = self.own_probs.argmax(1)
        if self.ood_moved is None:
            self.ood_moved = least_sure(self.ood_probs)
        self._ood_confusion = class_confusion(self.ood_probs)
        self._ood_landing = landing_shares(self.ood_probs)
        self._own_confusion = class_confusion(self.own_probs)
        self._similarity = class_mean_similarity(self.own_features, self.own_probs)

    @property
    def num_classes(self) -> int:
        return self.ood_probs.shape[1]

    @classmethod
    def fit(cls, victim: torch.nn.Module, ood_images: Tensor, own_images: Tensor,
            gate_weights: Callable[[Tensor, Tensor], Tensor] | None = None,
            batch_size: int = 512) -> MappingScorer:
        """The victim's answers and penultimate features on ``ood_images`` and
        ``own_images`` (``[N, C, H, W]``, normalised as the victim expects);
        ``gate_weights(x, probs) -> [B]``: the defense's gate ``α`` (default: the least
        sure half of the OOD images counts as moved)."""
        from grad2.models import penultimate

        def read(images: Tensor) -> tuple[Tensor, Tensor]:
            probs, features = [], []
            for part in images.split(batch_size):
                features.append(penultimate(victim, part))
                with torch.no_grad():
                    probs.append(torch.softmax(victim.eval()(part).float(), dim=1))
            return torch.cat(probs), torch.cat(features)

        ood_probs, ood_features = read(ood_images)
        moved = None
        if gate_weights is not None:
            moved = torch.cat([gate_weights(x, p) for x, p in
                               zip(ood_images.split(batch_size), ood_probs.split(batch_size),
                                   strict=True)]).float()
        return cls(ood_probs, ood_features, *read(own_images), moved)

    def simulated_thief(self, mapping: Tensor) -> float:
        """In-distribution top-1 agreement with the victim of a softmax-regression thief
        trained on the OOD images answered under ``mapping`` (lower = stronger effect)."""
        answers = moved_answers(self.ood_probs, mapping, self.ood_moved)
        weights, bias = fit_softmax_regression(self._ood_x, answers)
        predicted = (self._own_x @ weights + bias).argmax(1)
        return (predicted == self._own_tops).double().mean().item()

    def criteria(self, mapping: Tensor) -> dict[str, float]:
        """Every criterion of ``mapping [K]`` (see the module docstring)."""
        classes = torch.arange(self.num_classes)
        return {
            "simulated_thief": self.simulated_thief(mapping),
            "ood_confusion": float((self._ood_landing
                                    * self._ood_confusion[classes, mapping]).sum()),
            "own_confusion": float(self._own_confusion[classes, mapping].mean()),
            "similarity": float(self._similarity[classes, mapping].mean()),
            "cycles": float(cycle_count(mapping)),
        }

    def score(self, mapping: Tensor) -> float:
        """The criterion :func:`select_key` ranks by (:data:`CRITERION`)."""
        if CRITERION == "simulated_thief":
            return self.simulated_thief(mapping)
        return self.criteria(mapping)[CRITERION]


def reference_mappings(num_classes: int, count: int = CALIBRATION_MAPPINGS) -> list[Tensor]:
    """``count`` public mappings ``[K]`` (seeded keys) that calibrate the pass threshold."""
    return [gate.keyed_mapping(hashlib.sha256(f"grad2 reference mapping {index}".encode())
                               .digest(), num_classes) for index in range(count)]


def pass_threshold(scorer: MappingScorer, count: int = CALIBRATION_MAPPINGS,
                   quantile: float = PASS_QUANTILE, progress: bool = False) -> float:
    """The score at or below which a mapping passes: the ``quantile`` of the scores of
    :func:`reference_mappings`."""
    mappings = reference_mappings(scorer.num_classes, count)
    scores = torch.tensor([scorer.score(m) for m in progress_bar(
        mappings, desc="reference mappings", disable=not progress, leave=False)])
    return float(torch.quantile(scores.double(), quantile))


def select_key(scorer: MappingScorer, source: Callable[[], str] = gate.new_key,
               threshold: float | None = None,
               max_draws: int = MAX_DRAWS,
               progress: bool = False) -> tuple[bytes, dict[str, float | int]]:
    """The first key from ``source`` (hex strings, default :func:`gate.new_key`) whose
    mapping scores at or below ``threshold`` (default :func:`pass_threshold`), with what
    was found: ``{"score", "threshold", "draws"}``. Raises ``RuntimeError`` after
    ``max_draws`` failing keys."""
    if threshold is None:
        threshold = pass_threshold(scorer, progress=progress)
    for draw in range(1, max_draws + 1):
        key = bytes.fromhex(source())
        score = scorer.score(gate.keyed_mapping(key, scorer.num_classes))
        if score <= threshold:
            return key, {"score": score, "threshold": threshold, "draws": draw}
    raise RuntimeError(f"no key of {max_draws} passed the criterion (threshold {threshold})")


def plain_key_warning() -> None:
    """Warn that a key drawn without the criterion gives an effect that depends on the draw."""
    warnings.warn("keygen without --archive/--images/--validation draws a plain key: "
                  "grad2_gated's effect depends on the draw (docs/results.md, 'The key "
                  "lottery'); with them it draws only keys whose mapping passes a "
                  "simulated-thief criterion, which is not yet shown to narrow that spread",
                  stacklevel=2)
