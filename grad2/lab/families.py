"""The lab's defense families (one table of every name the sweep and the OOD study build)
and its budget grids.

A family is a served method (:data:`grad2.defenses.DEFENSES`) with a fixed setting
(``grad2_top1``), another target (``grad2_misdirect``) or network (``grad2_random_surrogate``),
or a control that is never served (:mod:`grad2.lab.controls`), and one knob the lab varies.
:mod:`grad2.lab.evaluate` builds :data:`SWEEP_FAMILIES` at the knobs of its grids,
:mod:`grad2.lab.ood` builds :data:`STUDY_DEFENSES` at knobs calibrated on validation
images. ``grad2 bench`` times served defense classes by score method and surrogate size
instead (:func:`grad2.lab.bench.timed_defenses`), not families.
"""

from __future__ import annotations

from dataclasses import dataclass

#: What a family's knob sets.
KNOBS = ("", "epsilon", "decimals", "beta", "threshold")


@dataclass(frozen=True)
class Family:
    """One lab defense family: what its knob sets (:data:`KNOBS`; ``epsilon`` is the L1
    budget, ``threshold`` a gate's, ``""`` none), whether it needs the defender's
    surrogate (or a second network), and what it is."""

    knob: str
    surrogate: bool
    about: str

    def __post_init__(self) -> None:
        if self.knob not in KNOBS:
            raise ValueError(f"knob must be one of {KNOBS}, got {self.knob!r}")


def _l1(about: str, surrogate: bool = True) -> Family:
    return Family("epsilon", surrogate, about)


#: Every lab defense family, ``name -> Family``.
LAB_DEFENSES: dict[str, Family] = {
    "none": Family("", False, "the clean answer"),
    "top1": Family("", False, "the clean top-1 label alone, one-hot"),
    "rounding": Family("decimals", False, "probabilities rounded to the knob's decimals"),
    "reverse_sigmoid": Family("beta", False, "reverse sigmoid of strength beta"),
    "random": _l1("half the budget to a seeded random non-top class", surrogate=False),
    "mad": _l1("MAD, the last layer's Jacobian"),
    "mad_argmax": _l1("MAD that keeps the top-1 label"),
    "grad2": _l1("GRAD², all_ones target"),
    "grad2_top1": _l1("GRAD², all_ones target, preserve_top1"),
    "grad2_min_ip": _l1("GRAD² along min_ip, recomputed per batch (the paper's ablation)"),
    "grad2_random_surrogate": _l1("GRAD², all_ones target, an untrained surrogate"),
    "grad2_misdirect": _l1("GRAD², the misdirection target"),
    "grad2_misdirect_top1": _l1("GRAD², the misdirection target, preserve_top1"),
    "grad2_misdirect_ensemble": _l1(
        "GRAD², misdirection through the surrogates of two architectures"),
    "grad2_misdirect_balanced": _l1("GRAD², misdirection balanced to keep the mean answer"),
    "grad2_misdirect_balanced_top1": _l1("GRAD², balanced misdirection, preserve_top1"),
    "control_random_scores": _l1("the solver on random scores", surrogate=False),
    "control_random_scores_top1": _l1("random scores, preserve_top1", surrogate=False),
    "control_shuffled": _l1("GRAD²'s scores shuffled across queries"),
    "control_shuffled_misdirect_top1": _l1(
        "misdirection's scores shuffled across queries, preserve_top1"),
    "control_shuffled_balanced_top1": _l1(
        "balanced misdirection's scores shuffled across queries, preserve_top1"),
    "control_fixed_class": _l1("the budget to the class GRAD² favours", surrogate=False),
    "control_fixed_class_top1": _l1(
        "the budget to the class misdirection favours, preserve_top1", surrogate=False),
    "adaptive_misinformation": Family(
        "threshold", True, "Adaptive Misinformation, its misinformation network"),
    "grad2_gated_permute": Family(
        "threshold", True, "GRAD² with the feature gate, OOD answers keyed-relabelled"),
    "grad2_gated_redirect": Family(
        "threshold", True, "GRAD² with the feature gate, OOD budget to the GRAD² LP"),
}

#: The trade-off sweep's families (``grad2 evaluate --defenses``).
SWEEP_FAMILIES: tuple[str, ...] = (
    "none", "top1", "rounding", "reverse_sigmoid", "random", "mad", "mad_argmax", "grad2",
    "grad2_top1", "grad2_min_ip", "grad2_random_surrogate", "grad2_misdirect",
    "grad2_misdirect_top1", "grad2_misdirect_ensemble", "control_random_scores",
    "control_shuffled", "control_fixed_class", "control_fixed_class_top1",
    "control_random_scores_top1", "control_shuffled_misdirect_top1",
    "grad2_misdirect_balanced", "grad2_misdirect_balanced_top1",
    "control_shuffled_balanced_top1",
)
#: The sweep's families whose knob is an L1 budget: at 0 they all equal ``none``.
L1_FAMILIES: tuple[str, ...] = tuple(
    name for name in SWEEP_FAMILIES if LAB_DEFENSES[name].knob == "epsilon")
#: The OOD study's defenses (``grad2 ood-study``), each at its calibrated knob.
STUDY_DEFENSES: tuple[str, ...] = (
    "none", "adaptive_misinformation", "grad2", "grad2_gated_permute", "grad2_gated_redirect",
)

#: The lab's short budget grid (archive and watermark evaluations); the tuning grid is
#: :data:`grad2.tools.tune.EPSILON_GRID`.
SHORT_EPSILONS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
#: The budgets of ``--quick`` runs (the archive evaluation, the quick sweep).
QUICK_EPSILONS: tuple[float, ...] = (0.0, 0.5, 1.0)

