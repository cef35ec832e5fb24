"""The OOD study's building blocks: pool transforms, the confidence filter, the recovery
map's features and the goals arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grad2.lab import ood


@pytest.mark.parametrize("transform", [ood.rotated_crop, ood.inverted_noise, ood.warped,
                                       ood.shifted_noise, ood.shifted_blurred_rotated])
def test_transforms_keep_the_pool_format_and_are_seeded(transform):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    once, again = transform(images, 5), transform(images, 5)
    assert once.dtype == np.uint8 and once.shape == images.shape
    assert np.array_equal(once, again)
    assert not np.array_equal(once, images)


def test_rotated_crop_is_a_rotation_of_the_centre():
    images = np.zeros((1, 28, 28), dtype=np.uint8)
    images[0, 4:14, 4:24] = 255  # a bar in the upper half
    rotated = ood.rotated_crop(images, 0)[0]
    assert rotated[:, :14].mean() > 4 * rotated[:, 14:].mean()  # now in the left half


def test_confidence_filter_drops_drained_and_unsure_answers():
    answers = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.5, 0.0], [0.4, 0.3, 0.3],
                            [0.8, 0.1, 0.1], [0.7, 0.2, 0.1]])
    kept = ood.confident_rows(answers, drop_share=0.25)
    assert not kept[1]  # an exactly drained class
    assert not kept[2]  # the least confident of the untouched
    assert kept[0] and kept[3]
    # When most answers have a drained class, that is the API's form, not a sign.
    drained = torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.5, 0.0, 0.5], [0.7, 0.3, 0.0]])
    assert ood.confident_rows(drained, drop_share=0.25).sum() == 3


def test_answer_features_see_exact_zeros_and_order():
    answers = torch.tensor([[0.2, 0.8, 0.0], [0.5, 0.25, 0.25]])
    features = ood.answer_features(answers)
    assert features.shape == (2, 3 * 3 + 1)
    assert features[:, -1].tolist() == [1.0, 0.0]
    assert torch.equal(features[0, 6:9], torch.tensor([0.8, 0.2, 0.0]))


def test_recovery_map_learns_a_known_relabelling():
    # If the defense relabels every answer by a fixed permutation the thief can simulate,
    # the map recovers the clean answers: the recovery thief's machinery works.
    generator = torch.Generator().manual_seed(0)
    clean = torch.softmax(3 * torch.randn(3000, 5, generator=generator), 1)
    permutation = torch.tensor([2, 0, 1, 4, 3])
    defended = torch.empty_like(clean).index_copy_(1, permutation, clean)
    model = ood.fit_mlp(ood.answer_features(defended[:2500]), clean[:2500], seed=0, epochs=40)
    with torch.no_grad():
        recovered = model(ood.answer_features(defended[2500:])).softmax(1)
    agree = (recovered.argmax(1) == clean[2500:].argmax(1)).float().mean()
    assert agree > 0.95


def test_goals_compare_each_defense_with_the_undefended_clones():
    def cell(value: float) -> dict:
        return {"mean": value, "std": 0.0, "seeds": 3, "values": [value] * 3}

    clones = {}
    for pool in ood.POOLS:
        for thief in ood.THIEVES:
            clones[f"none|{pool}|{thief}"] = cell(0.50)
            clones[f"{ood.RECOMMENDED}|{pool}|{thief}"] = cell(0.30)
    report = {
        "clones": clones,
        "defenses": {"none": {"defender_drop": 0.0},
                     ood.RECOMMENDED: {"defender_drop": 0.6}},
        "ownership": {"fresh": {"accused": {"a": {"p_value": 1e-4}},
                                "innocent": {f"i{k}": {"p_value": 0.5} for k in range(10)}}},
    }
    assert ood.effect(report, ood.RECOMMENDED, "animal", "soft") == pytest.approx(20.0)
    table = ood.goals_markdown(report)
    assert "| soft | −15 | +20.0" in table and table.count("| yes |") >= 6


def test_issue_23_pools_are_disjoint_from_the_pools_they_join():
    # The mixed pool is the animal pool plus 500 held-out images no other pool holds; the
    # fixer's own images are 300 more; the transformed in-distribution pool is 4,000.
    pytest.importorskip("grad2.lab.data")
    try:
        mixed = ood.pool_images("mixed")
        own = ood.pool_images(ood.OWN_POOL)
        heldout = ood.pool_images("fashion_heldout")
    except Exception as error:  # the datasets are not on this machine
        pytest.skip(str(error))
    assert mixed.shape == (4500, 28, 28) and own.shape == (300, 28, 28)
    assert np.array_equal(mixed[:4000], ood.pool_images("animal"))
    seen = {image.tobytes() for image in heldout}
    assert not any(image.tobytes() in seen for image in (*mixed[4000:], *own))
    assert ood.pool_images("fashion_transformed").shape == (4000, 28, 28)


def test_best_thief_per_pool_is_the_maximum_over_thieves():
    clones = {f"none|animal|{thief}": {"mean": value} for thief, value in
              (("soft", 0.58), ("labels", 0.52), ("fixer", 0.60))}
    clones.update({f"{ood.RECOMMENDED}|animal|{thief}": {"mean": value} for thief, value in
                   (("soft", 0.30), ("fixer", 0.55), ("mapping", 0.50))})
    best = ood.best_per_pool(clones)
    assert best["none"]["animal"] == {"thief": "fixer", "mean": 0.60}
    assert best[ood.RECOMMENDED]["animal"] == {"thief": "fixer", "mean": 0.55}
    report = {"clones": clones, "best": best}
    table = ood.best_thief_markdown(report)
    assert "| animal | 58.0 | fixer 60.0 | fixer 55.0 | +3.0 | −15 | no | +5.0 |" in table


def test_seed_rows_make_one_table() -> None:
    rows = [ood.seed_row([49.314, 47.255, 51.0], answers="none", arch="small_cnn"),
            ood.seed_row([63.4], answers="grad2_gated_permute", arch="wide_cnn")]
    assert rows[0] == {"answers": "none", "arch": "small_cnn", "mean": 49.19,
                       "values": [49.31, 47.26, 51.0]}
    assert ood.seed_table(rows, {"answers": "answers", "clone": "arch"}).splitlines() == [
        "| answers | clone | clone accuracy % (mean; per seed) |",
        "| --- | --- | --- |",
        "| none | small_cnn | 49.2; 49.3, 47.3, 51.0 |",
        "| grad2_gated_permute | wide_cnn | 63.4; 63.4 |",
    ]
