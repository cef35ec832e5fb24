"""A surrogate ensemble steers like the sum of its members' scores."""

from __future__ import annotations

import pytest
import torch

from grad2 import targets
from grad2.defenses import GRAD2
from grad2.models import SurrogateEnsemble, build_model
from grad2.redirect import redirect
from grad2.scores import redirection_scores


@pytest.fixture(scope="module")
def members() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    small, wide = build_model("small_cnn").eval(), build_model("wide_cnn").eval()
    return [small, wide]


def _member_target(target: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = f"members.{index}."
    return {name.removeprefix(prefix): t for name, t in target.items() if name.startswith(prefix)}


def test_ensemble_scores_are_the_members_sum_up_to_a_row_constant(members) -> None:
    ensemble = SurrogateEnsemble(members).double()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    torch.manual_seed(1)
    target = {name: torch.randn_like(p) for name, p in ensemble.named_parameters()}
    combined = redirection_scores(ensemble, x, target)
    summed = sum(redirection_scores(member, x, _member_target(target, index))
                 for index, member in enumerate(ensemble.members))
    difference = combined - summed
    # the same constant in every class of a row, and not a trivial one
    torch.testing.assert_close(difference, difference[:, :1].expand_as(difference),
                               rtol=0, atol=1e-9)
    assert summed.std(dim=1).min() > 1e-3


def test_grad2_over_an_ensemble_answers_as_the_summed_scores_would(members) -> None:
    ensemble = SurrogateEnsemble(members).double()
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    probs = torch.softmax(3 * torch.randn(16, 10, dtype=torch.float64), dim=1)
    target = targets.all_ones(ensemble)
    answers = GRAD2(ensemble, 0.6, target)(x, probs)
    summed = sum(redirection_scores(member, x, _member_target(target, index))
                 for index, member in enumerate(ensemble.members))
    torch.testing.assert_close(answers, redirect(probs, summed, 0.6), rtol=0, atol=1e-12)


def test_an_empty_ensemble_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        SurrogateEnsemble([])
