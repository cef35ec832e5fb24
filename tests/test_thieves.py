"""Issue 23's thieves on small synthetic data: the fixer recovers a known renaming, the
mapping-recovery thief a planted relabelling, the filter drops rows a planted tell marks,
and the best thief is the maximum over thieves."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from grad2 import gate
from grad2.lab import thieves
from grad2.lab.thieves import answer_features, fit_mlp


@pytest.mark.parametrize("seed", range(4))
def test_assignment_is_the_best_one_to_one_matching(seed):
    scores = torch.randint(0, 20, (6, 6), generator=torch.Generator().manual_seed(seed))
    chosen = thieves.assignment(scores)
    assert sorted(chosen.tolist()) == list(range(6))
    best = max(sum(scores[row, column].item() for row, column in enumerate(perm))
               for perm in itertools.permutations(range(6)))
    assert scores[torch.arange(6), chosen].sum().item() == best


def test_assignment_matches_scipy_on_ten_classes():
    optimize = pytest.importorskip("scipy.optimize")
    scores = torch.rand(10, 10, generator=torch.Generator().manual_seed(3))
    rows, columns = optimize.linear_sum_assignment(scores.numpy(), maximize=True)
    assert thieves.assignment(scores).tolist() == columns[rows.argsort()].tolist()


class Fixed(nn.Module):
    """A 'clone' that returns stored logits for the row ids it is given."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x.long().view(-1)]


def test_fixer_recovers_a_known_permutation_exactly():
    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 10, (400,), generator=generator)
    renaming = gate.keyed_mapping(b"fixer test", 10)
    # The clone says renaming⁻¹[k] where the API says k, 70% of the time; noise elsewhere.
    said = torch.argsort(renaming)[truth]
    noisy = torch.rand(400, generator=generator) > 0.7
    said = torch.where(noisy, torch.randint(0, 10, (400,), generator=generator), said)
    clone = Fixed(torch.nn.functional.one_hot(said, 10).float())
    api = torch.nn.functional.one_hot(truth, 10).float()
    found = thieves.fixer_relabelling(clone, torch.arange(400).float(), api)
    assert torch.equal(found, renaming)
    fixed = thieves.RelabelledClone(clone, found)(torch.arange(400).float()).argmax(1)
    assert torch.equal(fixed[~noisy], truth[~noisy])


def test_fixer_keeps_the_names_without_a_relabelling():
    truth = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(1))
    found = thieves.best_relabelling(truth, truth, 5)
    assert torch.equal(found, torch.arange(5))
    assert torch.equal(thieves.best_relabelling(truth[:0], truth[:0], 5), torch.arange(5))


def test_mapping_recovery_undoes_a_planted_relabelling():
    generator = torch.Generator().manual_seed(2)
    clean = torch.softmax(4 * torch.randn(600, 10, generator=generator), 1)
    sigma = gate.keyed_mapping(b"planted", 10)
    moved = torch.rand(600, generator=generator) < 0.8
    answers = torch.where(moved.unsqueeze(1), gate.relabel(clean, sigma), clean)
    # Own in-distribution queries: the API answers them clean; the first clone (trained on
    # mostly moved answers) says σ(k) for them.
    own_truth = torch.randint(0, 10, (300,), generator=generator)
    first = Fixed(torch.nn.functional.one_hot(sigma[own_truth], 10).float())
    estimate = thieves.estimate_relabelling(first, torch.arange(300).float(),
                                            torch.nn.functional.one_hot(own_truth, 10).float())
    assert torch.equal(estimate, sigma)
    # A reference agreeing with the clean top-1 picks exactly the moved rows.
    reference = torch.nn.functional.one_hot(clean.argmax(1), 10).float() * 0.9 + 0.01
    recovered, undone = thieves.recover_answers(answers, estimate, reference)
    assert torch.equal(undone, moved)
    assert torch.allclose(recovered, clean)


def test_filter_drops_the_rows_a_planted_tell_marks():
    generator = torch.Generator().manual_seed(4)

    def tell(rows: torch.Tensor) -> torch.Tensor:  # altered answers drain class 0 exactly
        return torch.cat([rows[:, :1] * 0, rows[:, 1:] / rows[:, 1:].sum(1, keepdim=True)], 1)

    own = torch.softmax(2 * torch.randn(800, 6, generator=generator), 1)
    api_clean = torch.softmax(2 * torch.randn(400, 6, generator=generator), 1)
    marked = torch.rand(400, generator=generator) < 0.3
    api = torch.where(marked.unsqueeze(1), tell(api_clean), api_clean)

    def fit(features, labels, seed):
        return fit_mlp(features, labels, seed, epochs=15)

    keep, accuracy = thieves.filter_rows(api, tell(own), own, answer_features, fit, seed=0)
    assert accuracy > 0.95
    assert (keep == ~marked).float().mean() > 0.97


def test_filter_keeps_everything_without_a_tell():
    own = torch.softmax(torch.randn(300, 4, generator=torch.Generator().manual_seed(5)), 1)
    keep, _ = thieves.filter_rows(own, own.clone(), own, answer_features,
                                  lambda f, y, s: fit_mlp(f, y, s, epochs=2), seed=0)
    assert keep.all()


def test_best_thief_is_the_maximum_over_thieves():
    accuracies = {"soft": 0.41, "labels": 0.38, "fixer": 0.72, "mapping": 0.70}
    assert thieves.best_thief(accuracies) == ("fixer", 0.72)
    assert thieves.best_thief({"soft": 0.5}) == ("soft", 0.5)
