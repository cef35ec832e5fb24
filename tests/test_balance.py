"""Class-balanced redirection (``grad2.balance``): the offsets solve the dual of the pooled
LP (checked against HiGHS), keep the mean answer, and travel inside a target file."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sparse
import torch
from lp import HIGHS_OPTIONS, answer_constraints
from nets import tiny_net
from scipy.optimize import linprog

from grad2 import targets
from grad2.balance import balance_offsets, balance_target, dual_value, marginal_gap
from grad2.defenses import GRAD2
from grad2.lab.controls import MinIPGRAD2, RandomScores
from grad2.scores import redirection_scores

torch.set_num_threads(1)


def biased_instance(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean answers from peaked to flat and scores that favour the last classes."""
    generator = torch.Generator().manual_seed(seed)
    temperature = torch.tensor([0.5, 2.0, 5.0])[torch.randint(0, 3, (n, 1), generator=generator)]
    probs = torch.softmax(torch.randn(n, k, generator=generator, dtype=torch.float64)
                          * temperature, dim=1)
    scores = torch.randn(n, k, generator=generator, dtype=torch.float64) + torch.linspace(0, 2, k)
    return probs, scores


def pooled_optimum(probs: np.ndarray, scores: np.ndarray, epsilon: float,
                   preserve_top1: bool) -> float:
    """``max mean_i c_i·ỹ_i`` over every query's feasible set with ``mean ỹ = mean y``."""
    n, k = probs.shape
    blocks = [answer_constraints(row, epsilon, preserve_top1) for row in probs]
    a_ub = sparse.block_diag([block[0] for block in blocks], format="csr")
    b_ub = np.concatenate([block[1] for block in blocks])
    # One query's variables are [ỹ (k), d (k)]; the coupling sums ỹ_ik over queries.
    coupling = sparse.hstack([sparse.identity(k), sparse.csr_matrix((k, k))])
    a_eq = sparse.vstack([sparse.block_diag([block[2] for block in blocks]),
                          sparse.hstack([coupling] * n)]).tocsr()
    b_eq = np.concatenate([np.ones(n), probs.sum(axis=0)])
    objective = -np.concatenate([np.concatenate([row, np.zeros(k)]) for row in scores]) / n
    result = linprog(objective, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=(0, None),
                     method="highs", options=HIGHS_OPTIONS)
    assert result.status == 0, result.message
    return -result.fun


@pytest.mark.parametrize(("epsilon", "preserve_top1"), [(0.6, False), (1.5, True)])
def test_dual_bounds_and_reaches_the_pooled_optimum(epsilon, preserve_top1):
    probs, scores = biased_instance(60, 4, seed=1)
    solve = RandomScores(epsilon, preserve_top1=preserve_top1).solve
    optimum = pooled_optimum(probs.numpy(), scores.numpy(), epsilon, preserve_top1)
    unbalanced = solve(probs, scores)
    # Weak duality at b = 0: the unconstrained optimum bounds the pooled one.
    assert dual_value(scores, probs, unbalanced, torch.zeros(4)) >= optimum - 1e-9
    balance = balance_offsets(scores, probs, solve, steps=800)
    spread = float(scores.std(dim=1).mean())
    assert balance.dual >= optimum - 1e-6  # an upper bound wherever the walk stopped
    assert balance.dual - optimum <= 2e-3 * spread
    assert balance.gap < 0.2 * balance.gap_before


@pytest.mark.parametrize(("epsilon", "preserve_top1"), [(0.5, False), (2.0, True)])
def test_offsets_keep_the_mean_answer(epsilon, preserve_top1):
    probs, scores = biased_instance(800, 10, seed=2)
    solve = RandomScores(epsilon, preserve_top1=preserve_top1).solve
    balance = balance_offsets(scores.float(), probs.float(), solve, steps=150)
    assert balance.gap_before > 0.2
    assert balance.gap < 0.03
    answers = solve(probs.float(), scores.float() + balance.offsets)
    assert float(marginal_gap(answers, probs.float()).abs().sum()) == pytest.approx(
        balance.gap, abs=1e-6)
    if preserve_top1:
        assert torch.equal(answers.argmax(dim=1), probs.argmax(dim=1))


def test_bad_shapes_are_refused():
    probs, scores = biased_instance(10, 3, seed=0)
    with pytest.raises(ValueError, match="both be"):
        balance_offsets(scores[:, :2], probs, RandomScores(0.5).solve)
    with pytest.raises(ValueError, match="steps"):
        balance_offsets(scores, probs, RandomScores(0.5).solve, steps=0)


def test_shift_scores_adds_the_offsets_to_every_query():
    surrogate = tiny_net(3)
    x = torch.rand(16, 1, 28, 28)
    target = targets.random(surrogate, seed=4)
    offsets = torch.linspace(-3.0, 5.0, 10)
    before = redirection_scores(surrogate, x, target)
    after = redirection_scores(surrogate, x, targets.shift_scores(surrogate, target, offsets))
    excess = after - before - offsets
    # What is left is one constant per query (−p(x)·offsets), which the solver ignores.
    torch.testing.assert_close(excess, excess[:, :1].expand_as(excess), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        targets.shift_scores(surrogate, target, offsets[:3])


def test_a_balanced_target_balances_through_the_defense():
    surrogate, victim = tiny_net(5), tiny_net(6)
    references = torch.rand(400, 1, 28, 28)
    with torch.no_grad():
        clean = torch.softmax(victim(references) * 4, dim=1)
    defense = GRAD2(surrogate, 1.5, targets.random(surrogate, seed=1), preserve_top1=True)
    target, balance = balance_target(defense, references, clean, steps=150)
    balanced = GRAD2(surrogate, 1.5, target, preserve_top1=True)
    answers = balanced(references, clean)
    before = marginal_gap(defense(references, clean), clean).abs().sum()
    after = marginal_gap(answers, clean).abs().sum()
    assert float(before) == pytest.approx(balance.gap_before, abs=1e-4)
    assert float(after) == pytest.approx(balance.gap, abs=1e-3)
    assert float(after) < 0.25 * float(before)
    assert torch.equal(answers.argmax(dim=1), clean.argmax(dim=1))
    # A lone query gets the same answer as inside the batch (a pure function of the query).
    torch.testing.assert_close(balanced(references[7:8], clean[7:8]), answers[7:8],
                               atol=0, rtol=0)


def test_balancing_needs_a_fixed_target():
    with pytest.raises(ValueError, match="fixed target"):
        balance_target(MinIPGRAD2(tiny_net(0), 0.5), torch.rand(4, 1, 28, 28),
                       torch.full((4, 10), 0.1))


def test_target_command_writes_a_balanced_file(tmp_path, capsys):
    from grad2.cli import main
    from grad2.lab.data import thief_pool, to_tensor
    from grad2.models import build_model, predict_probs, save_checkpoint

    torch.manual_seed(0)
    surrogate, victim = build_model("small_cnn"), build_model("small_cnn")
    save_checkpoint(surrogate, tmp_path / "surrogate.pt")
    save_checkpoint(victim, tmp_path / "victim.pt")
    out = tmp_path / "balanced.pt"
    assert main(["target", "misdirect", "--surrogate", str(tmp_path / "surrogate.pt"),
                 "--victim", str(tmp_path / "victim.pt"), "--references", "150",
                 "--balance-epsilon", "1.0", "--preserve-top1", "--balance-steps", "60",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "balanced for epsilon 1 with preserve_top1 on 150 animal images" in printed
    references = to_tensor(thief_pool("animal", size=150, seed=99).images)
    clean = predict_probs(victim, references)
    plain = GRAD2(surrogate, 1.0, targets.misdirect(surrogate, references), preserve_top1=True)
    balanced = GRAD2(surrogate, 1.0, targets.load(out, surrogate), preserve_top1=True)
    before = marginal_gap(plain(references, clean), clean).abs().sum()
    after = marginal_gap(balanced(references, clean), clean).abs().sum()
    assert float(after) < 0.5 * float(before)
    assert main(["target", "random", "--surrogate", str(tmp_path / "surrogate.pt"),
                 "--balance-epsilon", "1.0", "--out", str(out)]) == 2
    assert "needs --victim" in capsys.readouterr().err


def test_a_target_whose_bias_does_not_carry_the_offsets_is_refused():
    # The last linear layer feeds a squashing head, so a bias shift is not a score shift.
    surrogate = torch.nn.Sequential(tiny_net(1), torch.nn.Tanh()).eval()
    references = torch.rand(80, 1, 28, 28)
    clean = torch.softmax(torch.randn(80, 10) * 3, dim=1)
    defense = GRAD2(surrogate, 1.0, targets.random(surrogate, seed=0))
    with pytest.raises(ValueError, match="cannot be balanced"):
        balance_target(defense, references, clean, steps=30)
