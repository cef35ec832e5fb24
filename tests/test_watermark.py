"""Watermark verification statistics and the focused budget: properties, not examples."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from nets import tiny_net

from grad2 import targets
from grad2.defenses import GRAD2
from grad2.lab.data import to_tensor
from grad2.lab.watermark import (
    FocusedGRAD2,
    NeighbourPush,
    Secret,
    binomial_tail,
    calibrate_threshold,
    create,
    draw_labels,
    label_ranks,
    make_triggers,
    null_rejection_rates,
    rank_sum_cdf,
    select_ambiguous,
    verify_scores,
    watermark_gain,
)


@pytest.mark.parametrize(("count", "num_classes"), [(1, 10), (3, 4), (4, 3)])
def test_rank_sum_cdf_equals_enumeration(count: int, num_classes: int) -> None:
    sums = np.array([sum(r) for r in itertools.product(range(1, num_classes + 1), repeat=count)])
    for total in range(count - 1, count * num_classes + 2):
        assert rank_sum_cdf(total, count, num_classes) == pytest.approx((sums <= total).mean(),
                                                                        rel=1e-12, abs=0)


def test_rank_sum_cdf_matches_monte_carlo() -> None:
    draws = np.random.default_rng(0).integers(1, 11, size=(400_000, 8)).sum(axis=1)
    for total in (14, 20, 30, 44):
        expected = (draws <= total).mean()
        standard_error = max(np.sqrt(expected * (1 - expected) / len(draws)), 1e-6)
        assert abs(rank_sum_cdf(total, 8, 10) - expected) < 5 * standard_error
    assert rank_sum_cdf(8, 8, 10) == pytest.approx(1e-8, rel=1e-12)  # every label on top


def test_ties_rank_against_the_suspect() -> None:
    scores = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.2, 0.5, 0.3]])
    np.testing.assert_array_equal(label_ranks(scores, np.array([0, 0, 2])), [3, 2, 2])


def test_labels_are_uniform_and_seeded() -> None:
    labels = draw_labels(50_000, 7, 10)
    np.testing.assert_array_equal(labels, draw_labels(50_000, 7, 10))
    counts = np.bincount(labels, minlength=10)
    assert (np.abs(counts - 5000) < 5 * np.sqrt(5000 * 0.9)).all()


def test_both_tests_reject_innocent_models_at_their_exact_level() -> None:
    """Many secrets (fresh uniform labels) against fixed innocent models: the fraction of
    p-values ≤ 0.05 equals each discrete test's exact size (≤ 0.05), within sampling error."""
    count, num_classes, draws = 10, 10, 4000
    triggers = torch.from_numpy(make_triggers(count, 1)).float().unsqueeze(1) / 255
    alpha = 0.05
    critical = max(s for s in range(count, count * num_classes + 1)
                   if rank_sum_cdf(s, count, num_classes) <= alpha)
    rank_size = rank_sum_cdf(critical, count, num_classes)
    binomial_size = binomial_tail(4, count, 0.1)  # 0.0128 <= 0.05 < P(>= 3 matches)
    for model_seed in (0, 1):
        with torch.no_grad():
            logits = tiny_net(model_seed)(triggers).numpy()
        rng = np.random.default_rng(model_seed)
        rank_p, binom_p = [], []
        for labels in rng.integers(0, num_classes, size=(draws, count)):
            report = verify_scores(Secret(np.zeros((count, 2, 2), np.uint8), labels, 0,
                                          num_classes), logits)
            rank_p.append(report["rank_p_value"])
            binom_p.append(report["p_value"])
        for p_values, size in ((rank_p, rank_size), (binom_p, binomial_size)):
            rate = np.mean(np.array(p_values) <= alpha)
            assert abs(rate - size) < 4 * np.sqrt(size * (1 - size) / draws) + 1e-3
        vectorised = null_rejection_rates(logits, num_classes, draws, (alpha,), seed=model_seed)
        assert vectorised["rank_p_value"]["0.05"] == np.mean(np.array(rank_p) <= alpha)
        assert vectorised["p_value"]["0.05"] == np.mean(np.array(binom_p) <= alpha)
    assert 0.04 < rank_size <= alpha < binomial_tail(3, count, 0.1)


def test_verify_scores_on_a_perfect_and_a_legacy_suspect() -> None:
    labels = np.array([3, 1, 4, 1])
    scores = np.eye(10)[labels] + 0.01 * np.arange(10)
    secret = Secret(np.zeros((4, 2, 2), np.uint8), labels, 0, 10)
    report = verify_scores(secret, scores)
    assert report["matches"] == 4 and report["rank_sum"] == 4
    assert report["rank_p_value"] == pytest.approx(1e-4) == report["p_value"]
    legacy = verify_scores(Secret(secret.triggers, labels, 0, 10, uniform_labels=False), scores)
    assert legacy["chance"] == pytest.approx(1 / 9) and legacy["rank_p_value"] is None
    assert legacy["p_value"] == pytest.approx(9.0**-4)


def test_legacy_secret_files_load_as_legacy(tmp_path) -> None:
    path = tmp_path / "old.npz"
    with path.open("wb") as handle:
        np.savez(handle, triggers=np.zeros((2, 28, 28), np.uint8), labels=np.array([1, 2]),
                 seed=np.int64(0), num_classes=np.int64(10))
    assert not Secret.load(path).uniform_labels


def test_silhouette_triggers_are_seeded_filled_shapes() -> None:
    first = make_triggers(16, 3, style="silhouettes")
    np.testing.assert_array_equal(first, make_triggers(16, 3, style="silhouettes"))
    assert first.dtype == np.uint8 and first.shape == (16, 28, 28)
    bright = (first > 128).reshape(16, -1).mean(axis=1)
    assert ((bright > 0.08) & (bright < 0.6)).all()  # a body, not a stroke, not a page
    with pytest.raises(ValueError, match="style"):
        make_triggers(2, 0, style="noise")


def test_focused_defense_spends_only_above_its_threshold_and_per_query() -> None:
    surrogate = tiny_net(3)
    target, _ = create(surrogate, count=4, seed=1)
    grad2 = GRAD2(surrogate, 1.0, target)
    x = torch.randn(64, 1, 28, 28)
    probs = torch.softmax(2 * torch.randn(64, 10), dim=1)
    scores = grad2.scores(x, probs)
    gains = watermark_gain(probs, scores)
    threshold = calibrate_threshold(gains, probs, scores, budget=0.3)
    focused = FocusedGRAD2(grad2, threshold)
    answers = focused(x, probs)
    spent = (answers - probs).abs().sum(dim=1)
    assert spent.mean() <= 0.3 + 1e-5
    assert (spent[gains < threshold] == 0).all() and (spent[gains >= threshold] > 0).all()
    alone = torch.cat([focused(x[i:i + 1], probs[i:i + 1]) for i in (0, 17, 40)])
    torch.testing.assert_close(alone, answers[[0, 17, 40]])
    assert calibrate_threshold(gains, probs, scores, budget=0.0) == float("inf")


def test_equalized_target_is_the_mean_of_unit_norm_trigger_gradients() -> None:
    surrogate = tiny_net(6)
    triggers = torch.randn(5, 1, 28, 28)
    labels = torch.tensor([0, 3, 3, 9, 1])
    plain = targets.watermark(surrogate, triggers, labels)
    equalized = targets.watermark(surrogate, triggers, labels, equalize=True)
    singles = [targets.watermark(surrogate, triggers[i:i + 1], labels[i:i + 1]) for i in range(5)]
    norms = [torch.sqrt(sum(g.pow(2).sum() for g in single.values())) for single in singles]
    for name in plain:
        torch.testing.assert_close(plain[name], sum(s[name] for s in singles) / 5)
        expected = sum(s[name] / n for s, n in zip(singles, norms, strict=True)) / 5
        torch.testing.assert_close(equalized[name], expected)


def test_selected_triggers_are_the_least_sure_and_leave_the_labels_alone() -> None:
    surrogate = tiny_net(7)
    candidates = make_triggers(40, 11, style="silhouettes")
    chosen = select_ambiguous(candidates, surrogate, 5)
    with torch.no_grad():
        top = torch.softmax(surrogate(to_tensor(candidates)), 1).max(1).values.numpy()
    chosen_top = np.sort(top[[np.flatnonzero((candidates == c).all(axis=(1, 2)))[0]
                              for c in chosen]])
    np.testing.assert_allclose(chosen_top, np.sort(top)[:5])
    _, plain = create(surrogate, count=5, seed=11, style="silhouettes")
    _, selected = create(surrogate, count=5, seed=11, style="silhouettes", candidates=8)
    np.testing.assert_array_equal(plain.labels, selected.labels)
    assert not np.array_equal(plain.triggers, selected.triggers)


def test_contrastive_target_subtracts_the_labels_gradient_on_references() -> None:
    surrogate = tiny_net(8)
    triggers, references = torch.randn(3, 1, 28, 28), torch.randn(6, 1, 28, 28)
    labels = torch.tensor([2, 2, 7])
    contrastive = targets.watermark(surrogate, triggers, labels, references=references)
    plain = targets.watermark(surrogate, triggers, labels)
    common = [targets.watermark(surrogate, references, torch.full((6,), int(k))) for k in labels]
    for name in plain:
        expected = plain[name] - sum(c[name] for c in common) / 3
        torch.testing.assert_close(contrastive[name], expected)


def test_neighbour_push_moves_trigger_lookalikes_to_their_label_within_budget() -> None:
    surrogate = tiny_net(9)
    _, secret = create(surrogate, count=4, seed=2, style="silhouettes")
    references = to_tensor(make_triggers(200, 5, style="silhouettes"))
    reference_probs = torch.softmax(torch.randn(200, 10), dim=1)
    defense = NeighbourPush.fit(surrogate, secret, references, reference_probs, budget=0.3)
    answers = defense(references, reference_probs)
    spent = (answers - reference_probs).abs().sum(dim=1)
    assert spent.mean() <= 0.3 + 1e-5 and (spent > 0).any() and (spent == 0).any()
    similarity, index = defense.nearest(references)
    moved = spent > 0
    assert (similarity[moved] >= defense.threshold).all()
    np.testing.assert_array_equal(answers[moved].argmax(1).numpy(), secret.labels[index[moved]])
    triggers = to_tensor(secret.triggers)
    uniform = torch.full((4, 10), 0.1)
    pushed = defense(triggers, uniform)  # a trigger is its own nearest neighbour
    np.testing.assert_array_equal(pushed.argmax(1).numpy(), secret.labels)
    alone = torch.cat([defense(references[i:i + 1], reference_probs[i:i + 1]) for i in (3, 99)])
    torch.testing.assert_close(alone, answers[[3, 99]])


def test_neighbour_push_keeping_labels_stays_in_budget_and_never_flips() -> None:
    surrogate = tiny_net(8)
    _, secret = create(surrogate, count=4, seed=2, style="silhouettes")
    references = to_tensor(make_triggers(200, 5, style="silhouettes"))
    reference_probs = torch.softmax(torch.randn(200, 10) * 2, dim=1)
    defense = NeighbourPush.fit(surrogate, secret, references, reference_probs, budget=0.3,
                                preserve_top1=True)
    answers = defense(references, reference_probs)
    spent = (answers - reference_probs).abs().sum(dim=1)
    assert spent.mean() <= 0.3 + 1e-5 and (spent > 1e-3).any()
    assert torch.equal(answers.argmax(dim=1), reference_probs.argmax(dim=1))
    similarity, index = defense.nearest(references)
    moved = spent > 1e-3
    assert (similarity[moved] >= defense.threshold).all()
    gained = answers - reference_probs
    labels = torch.from_numpy(secret.labels)[index[moved]]
    # The mass goes to the nearest trigger's label unless that label is the top class.
    not_top = labels != reference_probs[moved].argmax(dim=1)
    assert torch.equal(gained[moved].argmax(dim=1)[not_top], labels[not_top])


def test_centred_target_gives_every_class_the_same_mean_score_on_references() -> None:
    from grad2.scores import redirection_scores

    surrogate = tiny_net(10)
    target, _ = create(surrogate, count=4, seed=4)
    references = torch.randn(32, 1, 28, 28)
    before = redirection_scores(surrogate, references, target).mean(dim=0)
    centred = targets.centre_scores(surrogate, target, references)
    after = redirection_scores(surrogate, references, centred).mean(dim=0)
    assert before.std() > 10 * after.std()
    torch.testing.assert_close(after, after.mean().expand(10), atol=1e-4 * before.abs().max(),
                               rtol=0)
    queries = torch.randn(8, 1, 28, 28)
    shift = redirection_scores(surrogate, queries, centred) - redirection_scores(
        surrogate, queries, target)  # −m_k plus a constant per query
    differences = shift + before  # constant along each row
    torch.testing.assert_close(differences, differences[:, :1].expand(-1, 10),
                               atol=1e-4 * before.abs().max(), rtol=0)
