"""Thieves that read the answers and bring their own data (issue 23), as small functions
over tensors: inputs ``[N, C, H, W]``, the API's answers ``[N, K]`` and whatever data the
thief owns. Shared by ``grad2 ood-study`` and ``grad2 evaluate --archive``.

- post-hoc fixer (:func:`best_relabelling`, :class:`RelabelledClone`): trains on the
  answers, then renames its clone's outputs by the class assignment that best matches the
  API's top-1 answers to a few hundred in-distribution queries it owns;
- mapping recovery (:func:`estimate_relabelling`, :func:`undo_relabelling`,
  :func:`moved_rows`): estimates a fixed relabelling from its first clone's confusion
  against the API on its own in-distribution queries, undoes it on the answers a
  reference model (trained on those queries alone) finds more plausible undone, retrains;
- answer filter (:func:`filter_rows`): learns to tell altered answers from clean ones on
  its own run of the public defense code (its own surrogate and key, Kerckhoffs) and drops
  the API answers it flags;
- :func:`best_thief`: the highest clone accuracy any thief reaches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grad2.lab.train import set_seed

#: Detector held-out accuracy below which the filter sees no tell and keeps every answer.
FILTER_MIN_ACCURACY = 0.6
#: The filter never keeps fewer than this share of the answers (the least suspicious).
FILTER_KEEP_FLOOR = 0.2


def answer_features(answers: Tensor) -> Tensor:
    """``[N, 3K + 1]``: an answer's values, their logs, its sorted values and its count of
    exact zeros: what the recovery map and the tell detector read."""
    logs = answers.clamp_min(1e-12).log()
    ranked = answers.sort(dim=1, descending=True).values
    zeros = (answers == 0).sum(dim=1, keepdim=True).float()
    return torch.cat([answers, logs / 10, ranked, zeros], dim=1)


def fit_mlp(features: Tensor, targets: Tensor, seed: int, epochs: int = 60) -> nn.Module:
    """A small MLP fitted with Adam: soft cross-entropy for probability targets ``[N, K]``,
    cross-entropy for class ids ``[N]``."""
    set_seed(seed)
    hard = targets.ndim == 1
    outputs = int(targets.max()) + 1 if hard else targets.shape[1]
    model = nn.Sequential(nn.Linear(features.shape[1], 128), nn.ReLU(), nn.Linear(128, 128),
                          nn.ReLU(), nn.Linear(128, outputs))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(features), 256):
            rows = order[start:start + 256]
            logits = model(features[rows])
            if hard:
                loss = F.cross_entropy(logits, targets[rows])
            else:
                loss = -(targets[rows] * logits.log_softmax(1)).sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def assignment(scores: Tensor) -> Tensor:
    """``[K]``: the column given to each row of ``scores [K, K]`` in the one-to-one
    assignment of largest total score (Hungarian method, exact, ``O(K³)``)."""
    cost = -scores.double()
    size = cost.shape[0]
    infinity = float("inf")
    row_potential = [0.0] * (size + 1)
    column_potential = [0.0] * (size + 1)
    owner = [0] * (size + 1)  # owner[j]: the row (1-based) holding column j; 0 = free
    way = [0] * (size + 1)
    table = cost.tolist()
    for row in range(1, size + 1):
        owner[0] = row
        column = 0
        slack = [infinity] * (size + 1)
        used = [False] * (size + 1)
        while owner[column] != 0:
            used[column] = True
            current, delta, next_column = owner[column], infinity, 0
            for j in range(1, size + 1):
                if used[j]:
                    continue
                reduced = (table[current - 1][j - 1] - row_potential[current]
                           - column_potential[j])
                if reduced < slack[j]:
                    slack[j], way[j] = reduced, column
                if slack[j] < delta:
                    delta, next_column = slack[j], j
            for j in range(size + 1):
                if used[j]:
                    row_potential[owner[j]] += delta
                    column_potential[j] -= delta
                else:
                    slack[j] -= delta
            column = next_column
        while column:
            previous = way[column]
            owner[column] = owner[previous]
            column = previous
    chosen = torch.empty(size, dtype=torch.int64)
    for j in range(1, size + 1):
        chosen[owner[j] - 1] = j - 1
    return chosen


def confusion(predicted: Tensor, answered: Tensor, num_classes: int) -> Tensor:
    """``[K, K]`` counts of (predicted class, answered class) pairs of ``[M]`` class ids."""
    pairs = predicted.long() * num_classes + answered.long()
    return torch.bincount(pairs, minlength=num_classes ** 2).view(num_classes, num_classes)


def best_relabelling(predicted: Tensor, answered: Tensor, num_classes: int) -> Tensor:
    """``[K]`` permutation ``π`` maximising how often ``π[predicted] == answered``
    (``[M]`` class ids each); the identity wins ties with it."""
    counts = confusion(predicted, answered, num_classes).double()
    # A tiny bonus on the diagonal: with no evidence of a relabelling, keep the names.
    return assignment(counts + 1e-6 * torch.eye(num_classes, dtype=torch.float64))


def relabel_outputs(outputs: Tensor, relabelling: Tensor) -> Tensor:
    """``[N, K]`` with ``out[:, π[k]] = outputs[:, k]``: the outputs renamed by ``π``."""
    return torch.empty_like(outputs).index_copy_(1, relabelling.to(outputs.device), outputs)


class RelabelledClone(nn.Module):
    """The post-hoc fixer's model: a clone whose outputs are renamed by ``relabelling``."""

    def __init__(self, clone: nn.Module, relabelling: Tensor) -> None:
        super().__init__()
        self.clone = clone
        self.register_buffer("relabelling", relabelling.long())

    def forward(self, x: Tensor) -> Tensor:
        return relabel_outputs(self.clone(x), self.relabelling)


def fixer_relabelling(clone: nn.Module, own_inputs: Tensor, own_answers: Tensor) -> Tensor:
    """``[K]``: the renaming of ``clone``'s outputs that best matches the API's top-1
    answers ``own_answers [M, K]`` to the thief's in-distribution queries ``own_inputs``."""
    with torch.inference_mode():
        predicted = clone.eval()(own_inputs).argmax(1)
    return best_relabelling(predicted, own_answers.argmax(1), own_answers.shape[1])


def estimate_relabelling(first_clone: nn.Module, own_inputs: Tensor,
                         own_answers: Tensor) -> Tensor:
    """``[K]`` estimate of ``σ`` with ``answer[:, σ[k]] = clean[:, k]`` on relabelled rows:
    what the first clone (trained on the answers) says where the API, answering the
    thief's in-distribution queries, says ``k``."""
    with torch.inference_mode():
        predicted = first_clone.eval()(own_inputs).argmax(1)
    return best_relabelling(own_answers.argmax(1), predicted, own_answers.shape[1])


def undo_relabelling(answers: Tensor, relabelling: Tensor) -> Tensor:
    """``[N, K]``: ``answers`` with the relabelling ``σ`` undone (``out[:, k] =
    answers[:, σ[k]]``)."""
    return answers[:, relabelling.to(answers.device)]


def moved_rows(answers: Tensor, undone: Tensor, reference: Tensor) -> Tensor:
    """``[N]`` bool: the rows whose undone answer a reference model's probabilities
    ``reference [N, K]`` find more likely than the answer as given (cross-entropy)."""
    def fit(rows: Tensor) -> Tensor:
        return (reference * rows.clamp_min(1e-8).log()).sum(1)

    return fit(undone) > fit(answers)


def recover_answers(answers: Tensor, relabelling: Tensor, reference: Tensor) -> tuple[Tensor,
                                                                                      Tensor]:
    """``([N, K], [N] bool)``: the mapping-recovery thief's training targets (``answers``
    with ``σ`` undone on the rows :func:`moved_rows` picks) and which rows it undid."""
    undone = undo_relabelling(answers, relabelling)
    moved = moved_rows(answers, undone, reference)
    return torch.where(moved.unsqueeze(1), undone, answers), moved


def filter_rows(answers: Tensor, altered: Tensor, clean: Tensor, features: Callable[[Tensor],
                Tensor], fit: Callable[[Tensor, Tensor, int], nn.Module], seed: int,
                keep_floor: float = FILTER_KEEP_FLOOR) -> tuple[Tensor, float]:
    """``([N] bool, detector accuracy)``: the API answers the answer filter keeps.

    A detector (``fit(features, labels, seed)``, a classifier of ``features(rows)``) learns
    the thief's own ``altered [M, K]`` from ``clean [M, K]`` answers (its run of the public
    defense); its held-out accuracy on that simulation says whether there is a tell. With
    one (at least :data:`FILTER_MIN_ACCURACY`) it drops the answers it flags as altered,
    keeping at least ``keep_floor`` of them (the least suspicious); without one it keeps
    all. Rows whose altered and clean copies are equal are no example of either."""
    differs = (altered - clean).abs().sum(1) > 1e-6
    altered, clean = altered[differs], clean[differs]
    count = len(altered)
    if count < 20:
        return torch.ones(len(answers), dtype=torch.bool), 0.5
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(count, generator=generator)
    shown = torch.cat([altered[order], clean[order]])
    labels = torch.cat([torch.ones(count), torch.zeros(count)]).long()
    train = torch.cat([torch.arange(int(0.75 * count)), count + torch.arange(int(0.75 * count))])
    held = torch.cat([torch.arange(int(0.75 * count), count),
                      count + torch.arange(int(0.75 * count), count)])
    detector = fit(features(shown[train]), labels[train], seed)
    with torch.no_grad():
        held_accuracy = (detector(features(shown[held])).argmax(1) == labels[held]).float()
        suspicion = detector(features(answers)).softmax(1)[:, 1]
    accuracy = held_accuracy.mean().item()
    if accuracy < FILTER_MIN_ACCURACY:
        return torch.ones(len(answers), dtype=torch.bool), accuracy
    keep = suspicion < 0.5
    floor = max(1, int(keep_floor * len(answers)))
    if keep.sum() < floor:
        keep = torch.zeros_like(keep)
        keep[suspicion.argsort()[:floor]] = True
    return keep, accuracy


def best_thief(accuracies: Mapping[str, float]) -> tuple[str, float]:
    """The thief with the highest clone accuracy, and that accuracy."""
    name = max(accuracies, key=accuracies.__getitem__)
    return name, accuracies[name]
