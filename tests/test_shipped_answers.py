"""Every shipped example config answers a fixed batch as the stored answers say
(``tests/shipped_answers.py`` wrote them before the defenses became a package).

The answers are bit-identical run to run on one CPU, but MKL and oneDNN pick other kernels
on other CPUs (an AMD EPYC machine gives answers up to 5e-7 away from the stored ones), so
the comparison allows float rounding: :data:`ROUNDING` absolute. A changed
defense moves answers by orders of magnitude more."""

from __future__ import annotations

from pathlib import Path

import pytest
import shipped_answers
import torch

STORED = torch.load(shipped_answers.STORED, weights_only=False)
#: The largest difference per probability that float rounding across CPUs may explain.
ROUNDING = 1e-5


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
    difference = (answers - STORED["answers"][name]).abs().max().item()
    assert difference <= ROUNDING, f"{name}: max difference {difference:.3g}"
