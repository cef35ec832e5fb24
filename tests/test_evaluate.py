"""The evaluation pipeline end to end in miniature (real data, tiny models), checking the
invariants every sweep must keep — not the headline numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from grad2.lab.evaluate import (
    Lab,
    RunResult,
    Stage,
    Sweep,
    clone_at_drop,
    collapsed,
    drop_table_cells,
    evaluate,
    markdown_table,
    most_frequent_receiver,
    plan,
    prior_corrected_logits,
    receivers,
)

L1_FAMILIES = ("grad2", "grad2_top1", "grad2_misdirect", "grad2_misdirect_top1", "random",
               "mad_argmax", "control_fixed_class", "control_shuffled")
LABEL_KEEPING = ("grad2_top1", "grad2_misdirect_top1", "mad_argmax", "top1",
                 "control_fixed_class_top1", "control_shuffled_misdirect_top1")


def test_clone_at_drop_interpolates_and_takes_the_best_knob() -> None:
    points = [(0.0, 80.0), (1.0, 70.0), (3.0, 50.0)]
    assert clone_at_drop(points, 0.5) == pytest.approx(75.0)
    assert clone_at_drop(points, 2.0) == pytest.approx(60.0)
    assert clone_at_drop(points, 5.0) == pytest.approx(50.0)  # best knob within the drop
    assert math.isnan(clone_at_drop([(1.0, 70.0), (2.0, 60.0)], 0.5))


def _synthetic(defense: str, knob: float, seed: int, defender: float, clone: float,
         thief: str = "soft") -> RunResult:
    return RunResult(pool="animal", defense=defense, knob=knob, thief=thief, seed=seed,
                     effective_l1=knob, defender_accuracy=defender, clone_accuracy=clone,
                     clone_agreement=clone, label_flip_rate=0.0, queries=10,
                     receivers=[3, 1, 0])


def test_drop_table_reads_each_seed_on_its_own_curve() -> None:
    # victim 0.90; grad2 at 0.5 drops 1 point, at 0.7 drops 3 points
    results = [_synthetic("none", 0.0, 0, 0.90, 0.60), _synthetic("none", 0.0, 1, 0.90, 0.50),
               _synthetic("grad2", 0.5, 0, 0.89, 0.40), _synthetic("grad2", 0.5, 1, 0.89, 0.30),
               _synthetic("grad2", 0.7, 0, 0.87, 0.20), _synthetic("grad2", 0.7, 1, 0.87, 0.20)]
    cells = drop_table_cells(results, 0.90, "animal", "soft", "grad2")
    # at 0.5 pt: halfway between 0 and 1 pt -> seed 0: 50, seed 1: 40
    assert cells[0][0] == pytest.approx(45.0) and cells[0][1] == pytest.approx(np.std([50, 40],
                                                                                        ddof=1))
    assert cells[2][0] == pytest.approx(np.mean([30, 25]))  # 2 pt: halfway from 1 to 3 pt
    # a seed without budget 0.7: both seeds read on the knobs they share (0 and 0.5)
    cells = drop_table_cells(results[:-1], 0.90, "animal", "soft", "grad2")
    assert cells[0] == pytest.approx((45.0, np.std([50, 40], ddof=1)))
    assert cells[3][0] == pytest.approx(35.0)  # 5 pt: the best shared knob, 0.5
    # a single seed with a curve: the curve of seed means over every knob, no std
    cells = drop_table_cells([r for r in results if r.seed == 0 or r.defense == "none"],
                             0.90, "animal", "soft", "grad2")
    assert cells[2] == pytest.approx((30.0, math.nan), nan_ok=True)  # 2 pt: 55 -> 40 -> 20
    labels_thief = _synthetic("grad2", 0.5, 0, 0.89, 0.55, thief="labels")
    table = markdown_table([*results, labels_thief], 0.90)
    assert "| animal | grad2 | 0.5 | 89.00 | 40.0 | — | 55.0 | — | — | 55.0 (labels) |" in table
    assert "| 0.75 |" in table  # the top receiver took 3 of the 4 moved answers
    # goals: none 55 (mean of seeds), grad2 at a 1-point drop 35 -> a 20-point gain
    assert "| animal | grad2 | 1 | 35.0 ± 7.1 | +20.0 ✓ |" in table


class _Constant(torch.nn.Module):
    """Logits that always favour one class (a dead network)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((len(x),), 7), 10).float()


class _FirstPixel(torch.nn.Module):
    """Logits from the first pixel's value: predictions spread over the classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bins = (x.flatten(1)[:, 0].clamp(0, 0.999) * 10).long()
        return torch.nn.functional.one_hot(bins, 10).float()


def test_collapse_is_judged_from_the_thiefs_own_queries() -> None:
    inputs = torch.rand(200, 1, 4, 4)
    spread = torch.softmax(torch.randn(200, 10), dim=1)
    lopsided = torch.nn.functional.one_hot(torch.full((200,), 7), 10).float()
    assert collapsed(_Constant(), inputs, spread)
    assert not collapsed(_FirstPixel(), inputs, spread)
    assert not collapsed(_Constant(), inputs, lopsided)  # it learned what it was told


def test_prior_correction_is_neutral_for_a_uniform_prior_and_removes_a_bias() -> None:
    logits = torch.randn(5, 4)
    uniform = torch.full((10, 4), 0.25)
    torch.testing.assert_close(prior_corrected_logits(logits, uniform), logits)
    biased = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(10, 1)
    corrected = prior_corrected_logits(torch.zeros(1, 4), biased)
    assert corrected.argmin().item() == 0  # the over-represented class is pushed down


def test_receivers_marks_unchanged_rows() -> None:
    clean = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.25, 0.25]])
    answers = torch.tensor([[0.4, 0.3, 0.3], [0.5, 0.25, 0.25]])
    assert receivers(clean, answers).tolist() == [2, -1]


def test_most_frequent_receiver_ignores_unchanged_answers() -> None:
    clean = torch.tensor([[0.6, 0.3, 0.1]] * 4)
    answers = torch.tensor([[0.4, 0.3, 0.3], [0.4, 0.3, 0.3], [0.4, 0.5, 0.1],
                            [0.6, 0.3, 0.1]])  # the last one did not move
    assert most_frequent_receiver(clean, answers) == 2
    with pytest.raises(ValueError, match="no answer moved"):
        most_frequent_receiver(clean, clean)


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    torch.set_num_threads(2)
    folder = tmp_path_factory.mktemp("eval")
    lab = Lab(folder / "cache", progress=False, victim_epochs=1, surrogate_epochs=1,
              test_size=1000)
    grid = {"none": (0.0,), "top1": (0.0,), "reverse_sigmoid": (0.7,),
            **{family: (0.5,) for family in L1_FAMILIES}}
    sweep = Sweep(grid=grid, pools=("animal",), pool_size=400, clone_epochs=1,
                  adaptive={"grad2": (0.5,), "top1": (0.0,)},
                  adaptive_thieves=("labels", "arch", "smooth", "prior"),
                  stages=(Stage({"grad2_misdirect_top1": (2.0,), "grad2": (0.5,),
                                 "control_fixed_class_top1": (2.0,),
                                 "control_shuffled_misdirect_top1": (2.0,)}),))
    out = folder / "report"
    results = evaluate(sweep, out, lab)
    return lab, sweep, out, results


def _run(results, defense, thief="soft", knob=None):
    (run,) = [r for r in results if r.defense == defense and r.thief == thief
              and knob in (None, r.knob)]
    return run


def test_stages_run_last_without_repeating_points() -> None:
    sweep = Sweep(grid={"grad2": (0.5,)}, pools=("animal",),
                  stages=(Stage({"grad2": (0.5, 1.0)}), Stage({"top1": (0.0,)}, ("arch",))))
    assert [(spec.key, thief) for spec, _, thief, _ in plan(sweep)] == [
        ("grad2@0.5", "soft"), ("grad2@1", "soft"), ("top1@0", "arch")]


@pytest.mark.slow
def test_miniature_sweep_keeps_the_invariants(miniature) -> None:
    lab, sweep, _, results = miniature
    trained = [r for r in results if r.thief != "prior"]
    assert len(trained) == len(plan(sweep))
    prior = _run(results, "grad2", "prior")
    assert prior.prior_clone_accuracy == prior.clone_accuracy  # derived from the soft clone
    assert prior.effective_l1 == _run(results, "grad2").effective_l1
    none = _run(results, "none")
    assert none.defender_accuracy == pytest.approx(lab.victim_accuracy)
    assert none.effective_l1 == 0 and none.label_flip_rate == 0 and sum(none.receivers) == 0
    for family in L1_FAMILIES:
        run = _run(results, family, knob=0.5)
        assert 0 < run.effective_l1 <= 0.5 + 1e-5, family
        assert 0 < sum(run.receivers) <= 400, family
    for family in LABEL_KEEPING:
        for run in (r for r in results if r.defense == family):
            assert run.label_flip_rate == 0, family
    whole = _run(results, "grad2_misdirect_top1", knob=2.0)
    assert 0.5 < whole.effective_l1 <= 2 + 1e-5
    assert 0.5 < _run(results, "control_shuffled_misdirect_top1").effective_l1 <= 2 + 1e-5
    assert np.count_nonzero(_run(results, "control_fixed_class_top1").receivers) == 1
    fixed = _run(results, "control_fixed_class")
    assert np.count_nonzero(fixed.receivers) == 1  # one class receives everything
    top1 = _run(results, "top1")
    expected_l1 = (2 * (1 - lab.test_probs.max(dim=1).values)).mean().item()
    assert top1.effective_l1 == pytest.approx(expected_l1, abs=1e-5)
    assert _run(results, "grad2", "smooth").queries == 400  # same budget, honestly counted
    for run in results:
        assert 0 <= run.clone_accuracy <= 1 and 0 <= run.clone_agreement <= 1


@pytest.mark.slow
def test_miniature_sweep_writes_reports_and_reuses_its_cache(miniature) -> None:
    lab, sweep, out, results = miniature
    for name in ("results.csv", "results.json", "table.md", "tradeoff_animal.png", "runs.jsonl"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "results.json").read_text())
    assert len(report["runs"]) == len(results)
    assert "| grad2 |" in (out / "table.md").read_text()
    journal = (out / "runs.jsonl").read_text()
    again = evaluate(sweep, out, lab)  # everything cached: no clone is trained again
    assert (out / "runs.jsonl").read_text() == journal
    assert [r.clone_accuracy for r in again] == [r.clone_accuracy for r in results]


# ------------------------------------------------------------- grad2 evaluate --archive


def test_archive_table_names_the_best_thief_of_each_budget() -> None:
    from grad2.lab.archive_eval import EvaluationRow, format_table

    def row(epsilon: float, thief: str, seed: int, accuracy: float) -> EvaluationRow:
        return EvaluationRow(epsilon, thief, seed, 0.9, 0.0, 0.1, accuracy)

    rows = [row(0.0, "soft", 0, 0.60), row(0.0, "soft", 1, 0.62), row(0.0, "fixer", 0, 0.55),
            row(0.5, "soft", 0, 0.30), row(0.5, "fixer", 0, 0.58), row(0.5, "fixer", 1, 0.56)]
    lines = format_table(rows).splitlines()
    assert lines[0].endswith("| best thief |")
    assert lines[2].endswith("| soft 61.00 |") and lines[3].endswith("| fixer 57.00 |")


def test_the_thiefs_copy_of_the_defense_has_its_own_surrogate_key_and_gate() -> None:
    from grad2.defenses import GRAD2, GatedGRAD2
    from grad2.lab.archive_eval import thief_defense
    from grad2.models import build_model

    torch.manual_seed(0)
    own = build_model("small_cnn", num_classes=10, in_channels=1).eval()
    inputs = torch.randn(64, 1, 28, 28)
    answers = torch.softmax(torch.randn(64, 10), 1)
    section = {"method": "grad2_gated", "epsilon": 0.2, "epsilon_ood": 2.0,
               "mapping_key": "secret.key", "gate_score": "features", "gate_file": "gate.pt",
               "gate_threshold": -1000.0, "gate_slope": 1.0}
    twin = thief_defense(section, 0.3, own, inputs, answers, seed=0)
    assert isinstance(twin, GatedGRAD2) and twin.surrogate is own and twin.epsilon == 0.3
    assert twin.threshold != -1000.0  # recalibrated on the thief's own gate scores
    flagged = (twin.gate_scores(inputs, answers) < twin.threshold).float().mean()
    assert flagged <= 0.1
    assert torch.equal(twin.mapping.sort().values, torch.arange(10))
    assert (twin.mapping != torch.arange(10)).all()  # its own key's derangement
    assert isinstance(thief_defense({"method": "grad2", "epsilon": 0.5}, 0.1, own, inputs,
                                    answers, 0), GRAD2)
    # A secret target file the thief cannot make up: no copy.
    assert thief_defense({"method": "grad2", "epsilon": 0.5, "target_file": "t.pt"}, 0.1, own,
                         inputs, answers, 0) is None


def test_own_thieves_train_on_what_each_thief_has() -> None:
    from grad2.lab.archive_eval import OWN_THIEVES, own_thieves
    from grad2.models import build_model

    torch.manual_seed(0)
    soft = build_model("small_cnn", num_classes=10, in_channels=1).eval()
    inputs, own_inputs = torch.randn(48, 1, 28, 28), torch.randn(12, 1, 28, 28)
    answers = torch.softmax(torch.randn(48, 10), 1)
    own_answers = torch.softmax(torch.randn(12, 10), 1)
    calls: list[tuple[int, bool, int | None]] = []

    def fit(x, targets, seed, hard=False, steps_of=None):
        assert len(x) == len(targets)
        calls.append((len(x), hard, steps_of))
        return soft

    clones = own_thieves(fit, soft, inputs, answers, own_inputs, own_answers,
                         {"method": "grad2", "epsilon": 0.5}, 0.5, seed=0)
    assert set(clones) == set(OWN_THIEVES)
    assert calls[0] == (60, False, None) and calls[1] == (60, True, None)  # mixed pool
    # The own-only thief: its 12 own answers alone, as many steps as a 48-query clone.
    assert calls[2] == (12, False, 48)


@pytest.mark.parametrize("arch, shape", [
    ("small_cnn", (1, 28, 28)), ("wide_cnn", (1, 28, 28)), ("resnet18_gray", (1, 28, 28)),
    ("torchvision:resnet18", (3, 32, 32)), ("torchvision:mobilenet_v3_small", (3, 32, 32)),
    ("torchvision:vgg11", (3, 32, 32))])
def test_other_architecture_differs_and_takes_the_inputs(arch: str, shape) -> None:
    from grad2.lab.archive_eval import other_architecture
    from grad2.lab.train import check_input_size
    from grad2.models import build_model

    other = other_architecture(arch, *shape)
    assert other is not None and other != arch
    model = build_model(other, num_classes=10, in_channels=shape[0])
    check_input_size(model, shape, other)  # raises when the clone cannot take the inputs
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_no_other_architecture_for_gray_images_of_another_size() -> None:
    from grad2.lab.archive_eval import other_architecture

    # resnet18_gray is the only gray architecture for 64x64: the arch thief is left out.
    assert other_architecture("resnet18_gray", 1, 64, 64) is None
    assert other_architecture("small_cnn", 1, 64, 64) == "resnet18_gray"
