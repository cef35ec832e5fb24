"""The lab's one table of defense families, and the modules that read it."""

from __future__ import annotations

import argparse

import pytest
import torch

from grad2 import targets
from grad2.lab import evaluate, ood
from grad2.lab.families import L1_FAMILIES, LAB_DEFENSES, STUDY_DEFENSES, SWEEP_FAMILIES
from grad2.models import build_model


def test_selections_name_families_of_the_table():
    assert set(SWEEP_FAMILIES) <= set(LAB_DEFENSES)
    assert set(STUDY_DEFENSES) <= set(LAB_DEFENSES)
    assert len(set(SWEEP_FAMILIES)) == len(SWEEP_FAMILIES)
    assert set(L1_FAMILIES) == {name for name in SWEEP_FAMILIES
                                if LAB_DEFENSES[name].knob == "epsilon"}
    assert {"none", "top1", "rounding", "reverse_sigmoid"}.isdisjoint(L1_FAMILIES)


def test_ood_study_no_longer_shadows_the_served_registry():
    assert not hasattr(ood, "DEFENSES")
    assert ood.Defender.__init__.__defaults__[-1] == STUDY_DEFENSES


class _FakeLab:
    """What :meth:`evaluate.Lab.defense` asks of a lab, without training anything."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = build_model("small_cnn").eval()

    def surrogate(self, pool: str, random_init: bool = False) -> torch.nn.Module:
        return self.model

    def ensemble(self, pool: str) -> torch.nn.Module:
        return self.model

    def misdirect_target(self, pool: str, ensemble: bool = False) -> dict:
        return targets.all_ones(self.model)

    def balanced_target(self, pool: str, epsilon: float, preserve_top1: bool) -> dict:
        return targets.all_ones(self.model)

    def favourite_class(self, pool: str, family: str = "grad2") -> int:
        return 3


@pytest.mark.parametrize("family", SWEEP_FAMILIES)
def test_the_sweep_builds_every_family_it_lists(family):
    defense = evaluate.Lab.defense(_FakeLab(), evaluate.DefenseSpec(family, 0.5), "animal")
    x = torch.randn(2, 1, 28, 28)
    probs = torch.softmax(torch.randn(2, 10), dim=1)
    answers = defense(x, probs)
    assert answers.shape == (2, 10)


def test_unknown_families_are_refused():
    with pytest.raises(ValueError, match="unknown defense 'grad3'"):
        evaluate.Lab.defense(_FakeLab(), evaluate.DefenseSpec("grad3", 0.5), "animal")
    parser = argparse.ArgumentParser()
    evaluate.register(parser.add_subparsers())
    assert parser.parse_args(["evaluate", "--defenses", "grad2", "mad"]).defenses == [
        "grad2", "mad"]
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--defenses", "grad3"])


def test_the_lab_writes_its_budget_grids_once():
    import inspect

    from grad2.lab import archive_eval, watermark
    from grad2.lab.families import QUICK_EPSILONS, SHORT_EPSILONS

    default = inspect.signature(watermark.evaluate_watermark).parameters["epsilons"].default
    assert default == SHORT_EPSILONS
    assert archive_eval.QUICK_EPSILONS is QUICK_EPSILONS
    assert evaluate.quick_sweep().grid["grad2"] == QUICK_EPSILONS
