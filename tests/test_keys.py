"""Key selection (grad2.tools.keys, ``grad2 keygen``): properties on synthetic victims."""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from grad2 import gate
from grad2.tools import gate_files, keys


def synthetic_scorer(num_classes: int, seed: int = 0, per_class: int = 30,
                     dims: int = 8) -> keys.MappingScorer:
    """A victim on Gaussian class clusters: answers ``[N, K]`` and features ``[N, D]``
    for in-distribution rows and for OOD rows (clusters shrunk toward the origin)."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(num_classes, dims, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)

    def rows(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        features = scale * centres[labels] + torch.randn(len(labels), dims, generator=generator)
        probs = torch.softmax(-torch.cdist(features, scale * centres), dim=1)
        return probs, features

    return keys.MappingScorer(*rows(0.4), *rows(1.0))


def paired_scorer(seed: int = 0, per_class: int = 40) -> keys.MappingScorer:
    """Six classes in three pairs (0,1), (2,3), (4,5) that the victim confuses: OOD rows
    sit between a pair's clusters and are answered half one, half the other."""
    generator = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(6, 8, generator=generator)
    labels = torch.arange(6).repeat_interleave(per_class)
    partner = labels ^ 1
    own_features = centres[labels] + 0.5 * torch.randn(len(labels), 8, generator=generator)
    own_probs = torch.full((len(labels), 6), 0.01)
    own_probs[torch.arange(len(labels)), labels] = 0.8
    own_probs[torch.arange(len(labels)), partner] = 0.16
    lean = 0.05 + 0.1 * torch.rand(len(labels), generator=generator)
    ood_features = ((0.5 + lean).unsqueeze(1) * centres[labels]
                    + (0.5 - lean).unsqueeze(1) * centres[partner]
                    + 0.3 * torch.randn(len(labels), 8, generator=generator))
    ood_probs = torch.full((len(labels), 6), 0.025)
    ood_probs[torch.arange(len(labels)), labels] = 0.45 + lean
    ood_probs[torch.arange(len(labels)), partner] = 0.45 - lean
    return keys.MappingScorer(ood_probs, ood_features, own_probs, own_features)


def counting_source(label: str) -> Callable[[], str]:
    """Seeded hex keys: the ``i``-th call returns SHA-256 of ``label`` and ``i``."""
    calls = iter(range(1 << 30))
    return lambda: hashlib.sha256(f"{label} {next(calls)}".encode()).hexdigest()


@pytest.mark.parametrize("num_classes", [2, 3, 5, 10, 17])
def test_selected_mappings_are_derangements(num_classes: int) -> None:
    scorer = synthetic_scorer(num_classes, per_class=8)
    threshold = keys.pass_threshold(scorer, count=12)
    source = counting_source(f"derangement {num_classes}")
    for _ in range(3):
        key, _ = keys.select_key(scorer, source, threshold)
        mapping = gate.keyed_mapping(key, num_classes)
        assert torch.equal(mapping.sort().values, torch.arange(num_classes))
        assert (mapping != torch.arange(num_classes)).all()


def test_selection_is_a_function_of_the_key_stream() -> None:
    scorer = synthetic_scorer(7)
    threshold = keys.pass_threshold(scorer, count=12)
    first = keys.select_key(scorer, counting_source("stream"), threshold)
    second = keys.select_key(scorer, counting_source("stream"), threshold)
    other = keys.select_key(scorer, counting_source("another stream"), threshold)
    assert first == second
    assert other[0] != first[0]


def test_failing_keys_are_never_returned() -> None:
    scorer = synthetic_scorer(8, seed=3)
    threshold = keys.pass_threshold(scorer, count=16)
    source = counting_source("failing")
    drawn = [bytes.fromhex(source()) for _ in range(40)]
    scores = [scorer.score(gate.keyed_mapping(key, 8)) for key in drawn]
    assert any(s > threshold for s in scores) and any(s <= threshold for s in scores)
    replay = iter(drawn)
    returned = []
    for _ in range(3):
        key, found = keys.select_key(scorer, lambda: next(replay).hex(), threshold)
        returned.append(key)
        assert found["score"] <= threshold
    passing = [key for key, score in zip(drawn, scores, strict=True) if score <= threshold]
    assert returned == passing[:3]


def test_no_passing_key_raises() -> None:
    scorer = synthetic_scorer(6)
    with pytest.raises(RuntimeError, match="passed the criterion"):
        keys.select_key(scorer, counting_source("never"), threshold=-1.0, max_draws=5)


def test_mappings_into_confused_classes_rank_below_others() -> None:
    scorer = paired_scorer()
    into_partner = torch.tensor([1, 0, 3, 2, 5, 4])  # each class to the one it is mixed with
    elsewhere = torch.tensor([2, 3, 4, 5, 0, 1])  # each class to another pair
    bad, good = scorer.criteria(into_partner), scorer.criteria(elsewhere)
    assert bad["simulated_thief"] > good["simulated_thief"] + 0.1
    assert bad["ood_confusion"] > good["ood_confusion"]
    assert bad["own_confusion"] > good["own_confusion"]
    threshold = keys.pass_threshold(scorer, count=16)
    assert scorer.score(into_partner) > threshold >= scorer.score(elsewhere)


def test_cycle_count() -> None:
    assert keys.cycle_count(torch.tensor([1, 0, 3, 2])) == 2
    assert keys.cycle_count(torch.tensor([1, 2, 3, 0])) == 1
    assert keys.cycle_count(torch.tensor([1, 2, 0, 4, 3])) == 2


def keygen_args(out: Path, **options: object) -> argparse.Namespace:
    return argparse.Namespace(out=out, force=False, archive=None, images=None,
                              validation=None, **options)


def test_plain_keygen_warns_and_keeps_the_file_format(tmp_path: Path) -> None:
    out = tmp_path / "mapping.key"
    with pytest.warns(UserWarning, match="depends on the draw"):
        assert gate_files._keygen_command(keygen_args(out)) == 0
    assert len(gate.read_key(out)) == gate.KEY_BYTES
    assert out.stat().st_mode & 0o777 == 0o600


def test_keygen_needs_all_criterion_inputs(tmp_path: Path) -> None:
    args = keygen_args(tmp_path / "k")
    args.archive = tmp_path / "model.mar"
    with pytest.raises(ValueError, match="together"):
        gate_files._keygen_command(args)
