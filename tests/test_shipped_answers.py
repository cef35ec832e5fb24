"""Every shipped example config answers a fixed batch exactly as the stored answers say
(``tests/shipped_answers.py`` wrote them before the defenses became a package)."""

from __future__ import annotations

from pathlib import Path

import pytest
import shipped_answers
import torch

STORED = torch.load(shipped_answers.STORED, weights_only=False)


def current(name: str) -> dict:
    """The stored config of ``name`` as the code of the day spells it."""
    config = STORED["configs"][name]
    renamed = shipped_answers.RENAMED.get(name)
    if renamed:
        config = {**config, "defense": {**config["defense"], **renamed}}
    return config


def test_every_shipped_example_has_stored_answers():
    shipped = {name: shipped_answers.served_config(config)
               for name, config in shipped_answers.shipped_configs().items()}
    assert set(shipped) <= set(STORED["configs"])
    for name, config in shipped.items():
        assert config == current(name), name


@pytest.mark.parametrize("name", sorted(STORED["answers"]))
def test_answers_are_unchanged(name: str, tmp_path: Path):
    config = current(name)
    assert torch.equal(shipped_answers.inputs(), STORED["pixels"])
    (answers,) = shipped_answers.compute({name: config}, tmp_path).values()
    assert torch.equal(answers, STORED["answers"][name]), (
        f"{name}: max difference {(answers - STORED['answers'][name]).abs().max():.3g}")
