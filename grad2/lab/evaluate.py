"""The trade-off sweep: thieves trained on every defense's answers (docs/results.md).

For each thief pool, defense and knob, the pool's defended answers are computed once and
cached; the defender's utility is measured on the Fashion-MNIST test split (accuracy of
``argmax ỹ``, effective L1); then each thief trains a clone from scratch on the answers
and is scored on the same test split. Results go to CSV/JSON, PNG plots and a markdown
table of clone accuracy interpolated at fixed defender accuracy drops.

Thieves:
- ``soft``: soft-label distillation (Knockoff style).
- ``labels``: trains on ``argmax ỹ`` only.
- ``arch``: a clone architecture different from the surrogate's (``wide_cnn``).
- ``smooth``: several augmented copies of each image, answers averaged; the pool is cut
  so the query count stays the same as the other thieves'.
- ``prior``: the soft clone with logit adjustment by the answers' mean class
  distribution, removing a defense's class bias. It is the same trained network as
  ``soft``, evaluated differently, so every soft run reports both.

Controls (is GRAD² steering gradients, or only biasing classes?): the same solver with
random scores, GRAD²'s scores shuffled across queries, and a fixed-class push to the class
GRAD² picks most often. Every run records the histogram of receiving classes.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from grad2 import defenses as D
from grad2 import targets
from grad2.balance import balance_target
from grad2.lab import controls
from grad2.lab.data import cache_dir, load_fashion_mnist, thief_pool, to_tensor
from grad2.lab.families import L1_FAMILIES, LAB_DEFENSES, QUICK_EPSILONS, SWEEP_FAMILIES
from grad2.lab.train import (
    CLONE_EPOCHS,
    augment_batch,
    set_seed,
    set_threads,
    train_clone,
    train_surrogate,
    train_victim,
)
from grad2.models import (
    SurrogateEnsemble,
    build_model,
    load_checkpoint,
    predict_probs,
    save_checkpoint,
)
from grad2.tools.progress import progress_bar
from grad2.tools.tune import EPSILON_GRID

THIEVES = ("soft", "labels", "arch", "smooth", "prior")
TRAINED_THIEVES = ("soft", "labels", "arch", "smooth")
POOLS = ("animal", "fashion_heldout")
MISMATCH_ARCH = "wide_cnn"
SMOOTH_COPIES = 4
DROPS = (0.5, 1.0, 2.0, 5.0)
DEFENSE_BATCH = 500
#: The evaluation's own recipe, pinned so cached models and published results stay
#: reproducible when the training defaults move: the victim trains 15 epochs (90.5% test),
#: each surrogate 4 epochs of a cosine schedule planned for 20.
EVAL_VICTIM_EPOCHS = 15
EVAL_SURROGATE_EPOCHS = 4
EVAL_SURROGATE_PLANNED_EPOCHS = 20


@dataclass(frozen=True)
class DefenseSpec:
    """One point of the sweep: a defense family (``name``) at one knob value."""

    name: str
    knob: float

    @property
    def key(self) -> str:
        return f"{self.name}@{self.knob:g}"


@dataclass
class RunResult:
    pool: str
    defense: str
    knob: float
    thief: str
    seed: int
    effective_l1: float
    defender_accuracy: float
    clone_accuracy: float
    clone_agreement: float
    label_flip_rate: float
    queries: int
    receivers: list[int] = field(default_factory=list)
    wall_time_s: float = 0.0
    #: The same clone after logit adjustment by the answers' mean (the ``prior`` thief).
    prior_clone_accuracy: float | None = None
    #: The first clone collapsed (see :func:`collapsed`) and was retrained at a lower rate.
    retrained: bool = False


@dataclass(frozen=True)
class Stage:
    """Points run after everything else: ``grid`` against each thief, with each seed."""

    grid: dict[str, tuple[float, ...]]
    thieves: tuple[str, ...] = ("soft",)
    seeds: tuple[int, ...] = (0,)


@dataclass
class Sweep:
    """What to run. ``grid`` maps a defense family to its knob values."""

    grid: dict[str, tuple[float, ...]]
    #: Run after ``grid`` on every pool: points that matter less (larger budgets, ...).
    extra_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    pools: tuple[str, ...] = POOLS
    thieves: tuple[str, ...] = ("soft",)
    seeds: tuple[int, ...] = (0,)
    pool_size: int | None = None
    clone_epochs: int = CLONE_EPOCHS
    adaptive: dict[str, tuple[float, ...]] = field(default_factory=dict)
    adaptive_thieves: tuple[str, ...] = ()
    headline: dict[str, tuple[float, ...]] = field(default_factory=dict)
    headline_seeds: tuple[int, ...] = ()
    #: Points for the smoothing thief (it queries each image several times).
    smooth: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: Points and extra seeds for the strongest adaptive thief (another architecture).
    arch_seeded: dict[str, tuple[float, ...]] = field(default_factory=dict)
    arch_seeds: tuple[int, ...] = ()
    #: Later additions, in this order, after every other point.
    stages: tuple[Stage, ...] = ()


def full_grid(epsilons: Iterable[float]) -> dict[str, tuple[float, ...]]:
    eps = tuple(epsilons)
    return {
        "none": (0.0,),
        "top1": (0.0,),
        "rounding": (2.0, 1.0),
        "reverse_sigmoid": (0.3, 0.7),
        "random": eps,
        "mad": eps,
        "mad_argmax": eps,
        "grad2": eps,
        "grad2_top1": eps,
        "grad2_min_ip": eps,
        "grad2_random_surrogate": eps,
        "grad2_misdirect": eps,
        "control_random_scores": eps,
        "control_shuffled": eps,
        "control_fixed_class": eps,
    }


def quick_sweep() -> Sweep:
    """Minutes on 2 cores: small pool, short clones, a few budgets, one seed."""
    grid = full_grid(QUICK_EPSILONS)
    grid["rounding"] = (1.0,)
    grid["reverse_sigmoid"] = (0.7,)
    return Sweep(grid=grid, pools=("animal",), pool_size=2000, clone_epochs=4)


#: Budgets of the headline families: they span defender accuracy drops of about 0.2 to 5
#: points on this victim, so clone error can be read off at +0.5, +1, +2 and +5.
HEADLINE_EPSILONS = (0.25, 0.4, 0.5, 0.6, 0.7, 0.8)
#: The defenses every seed and every adaptive thief is run against.
HEADLINE_FAMILIES = ("grad2", "grad2_misdirect", "control_fixed_class", "random", "mad")


def headline_sweep() -> Sweep:
    """The committed run, sized for a 2-core machine, in order of importance (each stage on
    both pools before the next): the soft thief (4,000 queries, 8 clone epochs) against
    every defense, the headline families over :data:`HEADLINE_EPSILONS`, the others at
    budget 0.5 or their own knobs; then the adaptive thieves (labels only and another
    architecture at budgets 0.5 and 0.7, smoothing at 0.5); then seeds 1 to 4 of GRAD²,
    misdirection (alone and with the ensemble) and the fixed-class control at budgets
    0.25-0.7, and seeds 1 and 2 of the other-architecture thief against GRAD²,
    misdirection and the control; last budget 1.0, where every L1 defense flips most
    labels."""
    headline = {"none": (0.0,)} | {family: HEADLINE_EPSILONS for family in HEADLINE_FAMILIES}
    grid = headline | {
        "control_shuffled": (0.5,), "control_random_scores": (0.5,),
        "grad2_random_surrogate": (0.5,), "grad2_min_ip": (0.5,), "grad2_top1": (0.5,),
        "mad_argmax": (0.5,), "top1": (0.0,), "reverse_sigmoid": (0.3, 0.7),
        "rounding": (1.0,), "grad2_misdirect_ensemble": (0.25, 0.5, 0.7),
    }
    seeded = ("grad2", "grad2_misdirect", "control_fixed_class")
    adapted = (*HEADLINE_FAMILIES, "grad2_misdirect_ensemble")
    extra = {family: (1.0,) for family in (*HEADLINE_FAMILIES, "grad2_top1")}
    return Sweep(
        grid=grid,
        extra_grid=extra,
        pool_size=4000,
        clone_epochs=8,
        headline={"none": (0.0,), "grad2_misdirect_ensemble": (0.25, 0.5, 0.7)}
        | {family: (0.25, 0.5, 0.6, 0.7) for family in seeded},
        headline_seeds=(1, 2, 3, 4),
        adaptive={"none": (0.0,)} | {family: (0.5, 0.7) for family in adapted},
        adaptive_thieves=("labels", "arch"),
        smooth={"none": (0.0,)} | {family: (0.5,) for family in adapted},
        arch_seeded={"none": (0.0,)} | {family: (0.5, 0.7) for family in seeded},
        arch_seeds=(1, 2),
    )


def label_keeping_sweep() -> Sweep:
    """The defenses that never flip a label (reverse sigmoid, GRAD² preserve_top1 with the
    ``all_ones`` and misdirection targets) up to the whole simplex (L1 2), against GRAD²
    misdirection, no defense, the top-1 label alone (what a labels-only thief gets from
    any of them) and three controls of the same budget and constraint (a fixed-class push,
    random scores, misdirection's scores shuffled across queries): the soft thief over 3
    seeds, then the other-architecture thief on seed 0. Self-contained (its own undefended
    runs), so it can run on a machine whose retrained victim differs in the last bits from
    the committed run's."""
    soft = {"none": (0.0,), "top1": (0.0,), "reverse_sigmoid": (0.3, 0.7),
            "grad2_top1": (1.0, 2.0), "grad2_misdirect_top1": (1.0, 2.0),
            "grad2_misdirect": (0.5, 0.7), "control_fixed_class_top1": (2.0,),
            "control_random_scores_top1": (2.0,), "control_shuffled_misdirect_top1": (2.0,)}
    # ``top1`` here is the labels-only thief's best clone against every label keeper.
    arch = {"none": (0.0,), "top1": (0.0,), "reverse_sigmoid": (0.7,), "grad2_top1": (2.0,),
            "grad2_misdirect_top1": (2.0,), "grad2_misdirect": (0.5,)}
    return Sweep(grid={}, pool_size=4000, clone_epochs=8,
                 stages=(Stage(soft, seeds=(0, 1, 2)), Stage(arch, thieves=("arch",))))


def balance_sweep() -> Sweep:
    """Class-balanced misdirection (:mod:`grad2.balance`: the mean answer kept on the
    thief's kind of queries) against plain misdirection, with and without the top-1
    constraint, aimed at the prior-correcting thief. Self-contained like
    :func:`label_keeping_sweep`. In order: the label-keeping pair at epsilon 2 with the
    balanced scores shuffled across queries (its control), no defense and the top-1 label,
    3 seeds; the other-architecture thief on seed 0; then epsilon 1, the label-flipping
    pair at 0.5, reverse sigmoid and misdirection's shuffled control, 3 seeds; the
    label-flipping pair at 0.25 and 0.7 (3 seeds); seeds 3 and 4 of no defense and the
    label-keeping pair at epsilon 2."""
    core = {"none": (0.0,), "top1": (0.0,), "grad2_misdirect_top1": (2.0,),
            "grad2_misdirect_balanced_top1": (2.0,), "control_shuffled_balanced_top1": (2.0,)}
    arch = {"none": (0.0,), "top1": (0.0,), "grad2_misdirect_top1": (2.0,),
            "grad2_misdirect_balanced_top1": (2.0,)}
    more = {"grad2_misdirect_top1": (1.0,), "grad2_misdirect_balanced_top1": (1.0,),
            "grad2_misdirect": (0.5,), "grad2_misdirect_balanced": (0.5,),
            "reverse_sigmoid": (0.7,), "control_shuffled_misdirect_top1": (2.0,)}
    curve = {"grad2_misdirect": (0.25, 0.7), "grad2_misdirect_balanced": (0.25, 0.7)}
    headline = {"none": (0.0,), "grad2_misdirect_top1": (2.0,),
                "grad2_misdirect_balanced_top1": (2.0,)}
    seeds = (0, 1, 2)
    return Sweep(grid={}, pool_size=4000, clone_epochs=8, stages=(
        Stage(core, seeds=seeds), Stage(arch, thieves=("arch",)), Stage(more, seeds=seeds),
        Stage(curve, seeds=seeds), Stage(headline, seeds=(3, 4))))


class Lab:
    """Trained models and cached answers for one evaluation folder."""

    def __init__(
        self, folder: Path, device: str = "cpu", progress: bool = True,
        victim_epochs: int = EVAL_VICTIM_EPOCHS, surrogate_epochs: int = EVAL_SURROGATE_EPOCHS,
        test_size: int | None = None,
    ) -> None:
        self.folder = folder
        self.device = device
        self.progress = progress
        self.victim_epochs, self.surrogate_epochs = victim_epochs, surrogate_epochs
        folder.mkdir(parents=True, exist_ok=True)
        test = load_fashion_mnist("test")
        self.test = test if test_size is None else test.subset(slice(0, test_size))
        self.test_inputs = to_tensor(self.test.images)
        self.test_labels = torch.from_numpy(self.test.labels)
        self.victim = self._model("victim", self._train_victim)
        self.test_probs = predict_probs(self.victim, self.test_inputs, device=device)
        self.victim_accuracy = _accuracy(self.test_probs, self.test_labels)
        self._pools: dict[tuple[str, int | None], tuple[Tensor, Tensor]] = {}
        self._defenses: dict[tuple[str, str], D.Defense] = {}

    # ---------------------------------------------------------------- models
    def _model(self, name: str, train: Callable[[], nn.Module]) -> nn.Module:
        path = self.folder / "models" / f"{name}.pt"
        if path.exists():
            model, _ = load_checkpoint(path)
            return model.to(self.device)
        started = time.perf_counter()
        model = train()
        save_checkpoint(model, path, {"role": name, "wall_time_s": time.perf_counter() - started})
        return model

    def _train_victim(self) -> nn.Module:
        model, _ = train_victim(
            epochs=self.victim_epochs, progress=self.progress, device=self.device
        )
        return model

    def surrogate(self, pool: str, random_init: bool = False, arch: str = "small_cnn",
                  ) -> nn.Module:
        """The pool's early-stopped surrogate (``arch``; the victim's by default)."""
        if random_init:
            set_seed(12345)
            return build_model(arch).eval().to(self.device)

        def train() -> nn.Module:
            return train_surrogate(
                self.victim, thief_pool(pool, seed=0), epochs=self.surrogate_epochs,
                planned_epochs=EVAL_SURROGATE_PLANNED_EPOCHS, arch=arch, seed=7,
                progress=self.progress, device=self.device,
            )

        suffix = "" if arch == "small_cnn" else f"_{arch}"
        return self._model(f"surrogate_{pool}{suffix}", train)

    def ensemble(self, pool: str) -> SurrogateEnsemble:
        """The pool's surrogates of the victim's architecture and of the adaptive thief's."""
        return SurrogateEnsemble([self.surrogate(pool), self.surrogate(pool, arch=MISMATCH_ARCH)])

    def pool(self, name: str, size: int | None) -> tuple[Tensor, Tensor]:
        """``(inputs [N,1,28,28], clean victim probabilities [N,K])`` of a thief pool."""
        if (name, size) not in self._pools:
            pool = thief_pool(name, size=size, seed=0)
            inputs = to_tensor(pool.images)
            clean = predict_probs(self.victim, inputs, device=self.device)
            self._pools[name, size] = (inputs, clean)
        return self._pools[name, size]

    # ---------------------------------------------------------------- defenses
    def defense(self, spec: DefenseSpec, pool: str) -> D.Defense:
        """The defense a spec names, with the surrogate trained on ``pool``'s distribution."""
        family, knob = spec.name, spec.knob
        if family not in SWEEP_FAMILIES:
            raise ValueError(f"unknown defense {family!r}; known: {', '.join(SWEEP_FAMILIES)}")
        surrogate = (
            self.surrogate(pool, random_init=family == "grad2_random_surrogate")
            if LAB_DEFENSES[family].surrogate
            else None
        )
        builders: dict[str, Callable[[], D.Defense]] = {
            "none": D.NoDefense,
            "top1": D.Top1,
            "rounding": lambda: D.Rounding(int(knob)),
            "reverse_sigmoid": lambda: D.ReverseSigmoid(beta=knob),
            "random": lambda: D.RandomNoise(knob, seed=0),
            "mad": lambda: D.MAD(surrogate, knob),
            "mad_argmax": lambda: D.MADArgmax(surrogate, knob),
            "grad2": lambda: D.GRAD2(surrogate, knob),
            "grad2_top1": lambda: D.GRAD2(surrogate, knob, preserve_top1=True),
            "grad2_min_ip": lambda: controls.MinIPGRAD2(surrogate, knob),
            "grad2_random_surrogate": lambda: D.GRAD2(surrogate, knob),
            "grad2_misdirect": lambda: D.GRAD2(surrogate, knob, self.misdirect_target(pool)),
            "grad2_misdirect_top1": lambda: D.GRAD2(
                surrogate, knob, self.misdirect_target(pool), preserve_top1=True),
            "grad2_misdirect_ensemble": lambda: D.GRAD2(
                self.ensemble(pool), knob, self.misdirect_target(pool, ensemble=True)),
            "control_random_scores": lambda: controls.RandomScores(knob, seed=0),
            "control_shuffled": lambda: controls.ShuffledScores(D.GRAD2(surrogate, knob), seed=0),
            "control_fixed_class": lambda: controls.FixedClassPush(
                knob, self.favourite_class(pool)),
            # Controls of the label-keeping misdirection: same budget and constraint.
            "control_fixed_class_top1": lambda: controls.FixedClassPush(
                knob, self.favourite_class(pool, "grad2_misdirect"), preserve_top1=True),
            "control_random_scores_top1": lambda: controls.RandomScores(
                knob, seed=0, preserve_top1=True),
            "control_shuffled_misdirect_top1": lambda: controls.ShuffledScores(D.GRAD2(
                surrogate, knob, self.misdirect_target(pool), preserve_top1=True), seed=0),
            "grad2_misdirect_balanced": lambda: D.GRAD2(
                surrogate, knob, self.balanced_target(pool, knob, preserve_top1=False)),
            "grad2_misdirect_balanced_top1": lambda: D.GRAD2(
                surrogate, knob, self.balanced_target(pool, knob, preserve_top1=True),
                preserve_top1=True),
            "control_shuffled_balanced_top1": lambda: controls.ShuffledScores(D.GRAD2(
                surrogate, knob, self.balanced_target(pool, knob, preserve_top1=True),
                preserve_top1=True), seed=0),
        }
        return builders[family]()

    def references(self, pool: str) -> Tensor:
        """The defender's 2,000 reference images of ``pool`` (seed 99): what the
        misdirection target and the class balance are computed on."""
        return to_tensor(thief_pool(pool, size=2000, seed=99).images)

    def misdirect_path(self, pool: str, ensemble: bool = False) -> Path:
        """Where :meth:`misdirect_target` caches its tensor file (archives pack it)."""
        return self.folder / "models" / f"misdirect_{pool}{'_ensemble' if ensemble else ''}.pt"

    def misdirect_target(self, pool: str, ensemble: bool = False) -> dict[str, Tensor]:
        """The fixed misdirection target, from the surrogate (or the ensemble) on 2,000
        pool images."""
        path = self.misdirect_path(pool, ensemble)
        surrogate = self.ensemble(pool) if ensemble else self.surrogate(pool)
        if path.exists():
            return targets.load(path, surrogate)
        target = targets.misdirect(surrogate, self.references(pool))
        return targets.load(targets.save(target, path), surrogate)

    def balanced_target(self, pool: str, epsilon: float, preserve_top1: bool) -> dict[str, Tensor]:
        """The misdirection target balanced (:func:`grad2.balance.balance_target`) for this
        budget and constraint on the same 2,000 pool images the target was computed on;
        the balance it reached is written beside the tensor file as JSON."""
        name = f"misdirect_{pool}_balanced{'_top1' if preserve_top1 else ''}_eps{epsilon:g}"
        path = self.folder / "models" / f"{name}.pt"
        surrogate = self.surrogate(pool)
        if path.exists():
            return targets.load(path, surrogate)
        references = self.references(pool)
        clean = predict_probs(self.victim, references, device=self.device)
        defense = D.GRAD2(surrogate, epsilon, self.misdirect_target(pool),
                          preserve_top1=preserve_top1)
        target, balance = balance_target(defense, references, clean)
        path.with_suffix(".json").write_text(json.dumps({
            "gap_before": balance.gap_before, "gap": balance.gap, "dual": balance.dual,
            "steps": balance.steps, "offsets": balance.offsets.tolist()}, indent=1))
        return targets.load(targets.save(target, path), surrogate)

    def favourite_class(self, pool: str, family: str = "grad2") -> int:
        """The class GRAD² (``family`` at epsilon 0.5) sends mass to most often on ``pool``."""
        answers = self.answers(DefenseSpec(family, 0.5), pool, None, "pool")
        _, clean = self.pool(pool, None)
        return most_frequent_receiver(clean, answers)

    def answers(self, spec: DefenseSpec, pool: str, size: int | None, split: str) -> Tensor:
        """Defended answers (cached on disk) for a pool (``split="pool"``) or the test set."""
        tag = f"test{len(self.test)}" if split == "test" else f"{pool}-{size or 'all'}"
        path = self.folder / "answers" / f"{spec.key}-{pool}-{tag}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        inputs, clean = (
            (self.test_inputs, self.test_probs) if split == "test" else self.pool(pool, size)
        )
        defense = self.defense(spec, pool)
        answers = apply_defense(defense, inputs, clean, progress=self.progress, desc=spec.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(answers, path)
        return answers


def apply_defense(
    defense: D.Defense, inputs: Tensor, clean: Tensor, batch_size: int = DEFENSE_BATCH,
    progress: bool = True, desc: str = "defense",
) -> Tensor:
    """``defense`` over ``inputs``/``clean`` in batches; ``[N, K]`` float32 answers."""
    parts = []
    starts = range(0, len(inputs), batch_size)
    for start in progress_bar(starts, desc=desc, leave=False, disable=not progress,
                              unit="batch"):
        x = inputs[start:start + batch_size]
        parts.append(defense(x, clean[start:start + batch_size]).float())
    return torch.cat(parts)


def receivers(clean: Tensor, answers: Tensor) -> np.ndarray:
    """The class that gained the most mass per answer (``[N]``); -1 where nothing moved."""
    gain = answers - clean
    moved = gain.abs().sum(dim=1) > 1e-6
    return torch.where(moved, gain.argmax(dim=1), -1).numpy()


def most_frequent_receiver(clean: Tensor, answers: Tensor) -> int:
    """The class that most answers sent their moved mass to (unchanged answers ignored)."""
    moved = receivers(clean, answers)
    moved = moved[moved >= 0]
    if moved.size == 0:
        raise ValueError("no answer moved any mass: there is no receiving class")
    return int(np.bincount(moved, minlength=clean.shape[1]).argmax())


def _accuracy(probs: Tensor, labels: Tensor) -> float:
    return (probs.argmax(dim=1) == labels).float().mean().item()


def prior_corrected_logits(logits: Tensor, answers: Tensor) -> Tensor:
    """Logit adjustment: remove the class prior the thief saw (mean answer) vs uniform."""
    prior = answers.mean(dim=0).clamp_min(1e-6)
    return logits - torch.log(prior * answers.shape[1])


def smoothed_answers(
    query: Callable[[Tensor], Tensor], inputs: Tensor, copies: int, seed: int
) -> tuple[Tensor, int]:
    """Answers averaged over ``copies`` augmented queries of each input; query count."""
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(0)
    for _ in range(copies):
        answers = query(augment_batch(inputs, generator))
        total = answers if total.numel() == 0 else total + answers
    return total / copies, copies * len(inputs)


#: The thief's learning rate (the clone recipe's), and the share of its own queries a
#: clone may put in one class before the thief calls the training collapsed.
THIEF_LR = 0.1
COLLAPSE_SHARE = 0.9


def collapsed(clone: nn.Module, inputs: Tensor, answers: Tensor, device: str = "cpu") -> bool:
    """Whether a clone's training diverged, judged as the thief can (no test labels): it
    puts more than :data:`COLLAPSE_SHARE` of the thief's own queries in one class although
    the answers' top classes are not that lopsided. A careful thief then retrains at a
    tenth of the learning rate rather than keep a dead network; without this, answers that
    merely destabilise the thief's recipe would count as protection."""
    with torch.inference_mode():
        predicted = torch.cat([clone(inputs[i:i + 1000].to(device)).argmax(dim=1).cpu()
                               for i in range(0, len(inputs), 1000)])
    classes = answers.shape[1]
    share = predicted.bincount(minlength=classes).max().item() / len(predicted)
    answer_share = answers.argmax(dim=1).bincount(minlength=classes).max().item() / len(answers)
    return share > COLLAPSE_SHARE and answer_share < COLLAPSE_SHARE


def run_one(
    lab: Lab, spec: DefenseSpec, pool: str, thief: str, seed: int, sweep: Sweep
) -> RunResult:
    """Train one thief's clone on ``spec``'s answers and measure everything."""
    started = time.perf_counter()
    inputs, clean = lab.pool(pool, sweep.pool_size)
    answers = lab.answers(spec, pool, sweep.pool_size, "pool")
    test_answers = lab.answers(spec, pool, None, "test")
    queries = len(inputs)
    arch = MISMATCH_ARCH if thief == "arch" else "small_cnn"
    train_inputs, train_answers = inputs, answers
    if thief == "smooth":
        keep = len(inputs) // SMOOTH_COPIES  # same query budget as every other thief
        defense = lab.defense(spec, pool)

        def query(batch: Tensor) -> Tensor:
            victim_probs = predict_probs(lab.victim, batch, device=lab.device)
            return apply_defense(defense, batch, victim_probs, progress=False)

        train_inputs = inputs[:keep]
        train_answers, queries = smoothed_answers(query, train_inputs, SMOOTH_COPIES, seed)
    def fit(lr: float) -> nn.Module:
        return train_clone(
            train_inputs, train_answers, arch=arch, epochs=sweep.clone_epochs, seed=seed,
            hard_labels=thief == "labels", progress=lab.progress, device=lab.device, lr=lr,
        )

    clone = fit(THIEF_LR)
    retrained = collapsed(clone, train_inputs, train_answers, lab.device)
    if retrained:
        clone = fit(THIEF_LR / 10)
    test_inputs, labels = lab.test_inputs, lab.test_labels
    with torch.inference_mode():
        logits = torch.cat([
            clone(test_inputs[i:i + 1000].to(lab.device)).float().cpu()
            for i in range(0, len(test_inputs), 1000)
        ])
    predicted = logits.argmax(dim=1)
    prior_predicted = prior_corrected_logits(logits, train_answers).argmax(dim=1)
    defended_top = test_answers.argmax(dim=1)
    hist = np.bincount(receivers(clean, answers) + 1, minlength=clean.shape[1] + 1)
    return RunResult(
        pool=pool, defense=spec.name, knob=spec.knob, thief=thief, seed=seed,
        effective_l1=(test_answers - lab.test_probs).abs().sum(dim=1).mean().item(),
        defender_accuracy=_accuracy(test_answers, lab.test_labels),
        clone_accuracy=(predicted == labels).float().mean().item(),
        clone_agreement=(predicted == lab.test_probs.argmax(1)).float().mean().item(),
        label_flip_rate=(defended_top != lab.test_probs.argmax(dim=1)).float().mean().item(),
        queries=queries,
        receivers=hist[1:].tolist(),
        wall_time_s=round(time.perf_counter() - started, 1),
        prior_clone_accuracy=(prior_predicted == labels).float().mean().item(),
        retrained=retrained,
    )


def with_prior_rows(results: list[RunResult]) -> list[RunResult]:
    """Add the ``prior`` thief's rows, derived from the soft runs."""
    derived = [
        RunResult(**{**asdict(r), "thief": "prior", "clone_accuracy": r.prior_clone_accuracy})
        for r in results if r.thief == "soft" and r.prior_clone_accuracy is not None
    ]
    return [r for r in results if r.thief != "prior"] + derived


def plan(sweep: Sweep) -> list[tuple[DefenseSpec, str, str, int]]:
    """Every clone the sweep needs, without repeats, most important first: the soft
    thief over the grid (every pool), then the adaptive thieves, then extra seeds, then
    the extra budgets.
    ``prior`` needs no clone of its own (it reuses ``soft``), and an L1 family at
    budget 0 is ``none``."""
    runs: list[tuple[DefenseSpec, str, str, int]] = []

    def add(grid: dict[str, tuple[float, ...]], thieves, seeds) -> None:
        for thief in thieves:
            thief = "soft" if thief == "prior" else thief
            for seed in seeds:
                for name, knobs in grid.items():
                    for knob in knobs:
                        spec = (
                            DefenseSpec("none", 0.0)
                            if name in L1_FAMILIES and knob == 0
                            else DefenseSpec(name, float(knob))
                        )
                        for pool in sweep.pools:
                            if (spec, pool, thief, seed) not in runs:
                                runs.append((spec, pool, thief, seed))

    add(sweep.grid, sweep.thieves, sweep.seeds)
    add(sweep.adaptive, sweep.adaptive_thieves, sweep.seeds)
    add(sweep.smooth, ("smooth",), sweep.seeds)
    add(sweep.headline, ("soft",), sweep.headline_seeds)
    add(sweep.arch_seeded, ("arch",), sweep.arch_seeds)
    add(sweep.extra_grid, sweep.thieves, sweep.seeds)
    for stage in sweep.stages:
        add(stage.grid, stage.thieves, stage.seeds)
    return runs


def run_key(spec: DefenseSpec, pool: str, thief: str, seed: int, sweep: Sweep) -> str:
    setting = f"{sweep.pool_size}-{sweep.clone_epochs}"
    return f"{pool}|{spec.key}|{thief}|{seed}|{setting}"


def read_journal(out: Path) -> dict[str, RunResult]:
    """Finished runs recorded in ``out/runs.jsonl``, by run key."""
    journal = out / "runs.jsonl"
    done: dict[str, RunResult] = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            record = json.loads(line)
            key = record.pop("key")
            done[key] = RunResult(**record)
    return done


#: Reports are rewritten after this many new runs, so a long sweep shows its progress.
REPORT_EVERY = 10


def evaluate(sweep: Sweep, out: Path, lab: Lab) -> list[RunResult]:
    """Run everything not yet in ``out/runs.jsonl``; write CSV, JSON, plots and table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").write_text(json.dumps({
        "victim_accuracy": lab.victim_accuracy, "test_size": len(lab.test),
        "pool_size": sweep.pool_size, "clone_epochs": sweep.clone_epochs,
    }))
    journal = out / "runs.jsonl"
    done = read_journal(out)
    todo = plan(sweep)
    bar = progress_bar(todo, desc="sweep", unit="clone", disable=not lab.progress)
    results, fresh = [], 0
    for spec, pool, thief, seed in bar:
        key = run_key(spec, pool, thief, seed, sweep)
        bar.set_postfix_str(f"{pool} {spec.key} {thief} s{seed}")
        if key not in done:
            done[key] = run_one(lab, spec, pool, thief, seed, sweep)
            with journal.open("a") as handle:
                handle.write(json.dumps({"key": key, **asdict(done[key])}) + "\n")
            fresh += 1
            if fresh % REPORT_EVERY == 0:
                write_reports(with_prior_rows([*results, done[key]]), out, lab.victim_accuracy)
        results.append(done[key])
    results = with_prior_rows(results)
    write_reports(results, out, lab.victim_accuracy)
    return results


def report_only(out: Path) -> list[RunResult]:
    """Rewrite the reports from whatever runs the journal holds (a sweep in progress)."""
    meta = json.loads((out / "meta.json").read_text())
    results = with_prior_rows(list(read_journal(out).values()))
    write_reports(results, out, meta["victim_accuracy"])
    return results


# -------------------------------------------------------------------- reports
def write_reports(results: list[RunResult], out: Path, victim_accuracy: float) -> None:
    rows = [asdict(r) for r in results]
    (out / "results.json").write_text(
        json.dumps({"victim_accuracy": victim_accuracy, "runs": rows}, indent=1)
    )
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[k for k in rows[0] if k != "receivers"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v for k, v in row.items() if k != "receivers"})
    (out / "table.md").write_text(markdown_table(results, victim_accuracy))
    plot(results, out, victim_accuracy)


def aggregate(results: list[RunResult]) -> dict[tuple, dict[str, float]]:
    """Mean and std over seeds for every (pool, thief, defense, knob); the ``none`` run
    also stands as budget 0 of every L1 family measured with the same thief."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.pool, r.thief, r.defense, r.knob), []).append(r)
    for pool, thief, family, _ in list(groups):
        baseline = groups.get((pool, thief, "none", 0.0))
        if family in L1_FAMILIES and baseline:
            groups.setdefault((pool, thief, family, 0.0), baseline)
    summary = {}
    for key, runs in groups.items():
        clone = np.array([r.clone_accuracy for r in runs]) * 100
        summary[key] = {
            "clone": float(clone.mean()),
            "clone_std": float(clone.std(ddof=1)) if len(runs) > 1 else float("nan"),
            "defender": float(np.mean([r.defender_accuracy for r in runs]) * 100),
            "l1": float(np.mean([r.effective_l1 for r in runs])),
            "seeds": len(runs),
        }
    return summary


def clone_at_drop(points: list[tuple[float, float]], drop: float) -> float:
    """Clone accuracy linearly interpolated at ``drop`` defender-accuracy points.

    ``points``: ``(defender accuracy drop, clone accuracy)`` pairs. For each drop, the
    lowest clone accuracy reachable within it (the defender picks the best knob), with
    interpolation between neighbouring knobs; NaN if no knob drops that little.
    """
    points = sorted(points)
    best = math.nan
    for (d0, c0), (d1, c1) in itertools.pairwise(points):
        if d0 <= drop <= d1 and d1 > d0:
            value = c0 + (c1 - c0) * (drop - d0) / (d1 - d0)
            best = value if math.isnan(best) else min(best, value)
    reached = [c for d, c in points if d <= drop]
    if reached:
        best = min([*reached, best]) if not math.isnan(best) else min(reached)
    return best


def drop_table_cells(results: list[RunResult], victim_accuracy: float, pool: str, thief: str,
                     family: str, summary: dict[tuple, dict[str, float]] | None = None,
                     ) -> list[tuple[float, float]]:
    """Clone accuracy (%) at each of :data:`DROPS`: mean and std over seeds, each seed's
    curve interpolated on its own over the knobs every such seed has (a seed with a single
    knob, e.g. only the shared ``none`` run, has no curve); with fewer than two such seeds,
    the curve of seed means over every knob (std NaN). ``summary``: ``aggregate(results)``
    when the caller has it already."""
    summary = aggregate(results) if summary is None else summary
    knobs = {k[3] for k in summary if k[:3] == (pool, thief, family)}
    drop_at = {k[3]: victim_accuracy * 100 - s["defender"]
               for k, s in summary.items() if k[:3] == (pool, thief, family)}
    by_seed: dict[int, dict[float, float]] = {}
    for r in results:
        if (r.pool, r.thief) != (pool, thief):
            continue
        if r.defense == family or (r.defense == "none" and family in L1_FAMILIES):
            by_seed.setdefault(r.seed, {})[r.knob] = r.clone_accuracy * 100
    curves = [curve for curve in by_seed.values() if len(curve) > 1]
    shared = set.intersection(*(set(curve) for curve in curves)) if curves else set()
    cells = []
    for drop in DROPS:
        if len(curves) > 1 and len(shared) > 1:
            values = [clone_at_drop([(drop_at[k], curve[k]) for k in shared], drop)
                      for curve in curves]
            cells.append((float(np.mean(values)), float(np.std(values, ddof=1))))
        else:
            points = [(drop_at[k], summary[pool, thief, family, k]["clone"]) for k in knobs]
            cells.append((clone_at_drop(points, drop), math.nan))
    return cells


def top_receiver_share(results: list[RunResult], pool: str, family: str, knob: float) -> float:
    """Share of the moved answers whose mass went to the most frequent receiving class."""
    runs = [r for r in results if (r.pool, r.defense, r.knob) == (pool, family, knob)
            and r.receivers]
    if not runs or sum(runs[0].receivers) == 0:
        return math.nan
    return max(runs[0].receivers) / sum(runs[0].receivers)


def _cell(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


#: The issue's goal: clone accuracy points GRAD² must remove at a 1-point defender drop.
GOAL_GAIN = {"animal": 10.0, "fashion_heldout": 5.0}
GRAD2_VARIANTS = ("grad2", "grad2_misdirect", "grad2_top1", "grad2_misdirect_top1",
                  "grad2_misdirect_balanced", "grad2_misdirect_balanced_top1")


def goal_lines(results: list[RunResult], victim_accuracy: float,
               summary: dict[tuple, dict[str, float]] | None = None) -> list[str]:
    """The goals, checked from the runs: per pool and GRAD² variant, the clone accuracy
    at defender drops of 0.5, 1 and 2 points (soft and prior-correcting thieves, mean ±
    std over seeds), the gain over no defense, and the best other defense or control."""
    lines = ["### goals (soft thief; `prior`: the prior-correcting thief on the same clones)",
             "", "| pool | defense | drop | clone | gain | prior clone | prior gain | gain kept"
             " | best other defense at this drop (soft) |", "|---" * 9 + "|"]
    families = {(r.pool, r.defense) for r in results if r.thief == "soft"}
    summary = aggregate(results) if summary is None else summary

    def cells(pool: str, thief: str, family: str) -> list[tuple[float, float]]:
        return drop_table_cells(results, victim_accuracy, pool, thief, family, summary)

    for pool in sorted({r.pool for r in results}):
        base = {thief: cells(pool, thief, "none")[0][0]
                for thief in ("soft", "prior")}
        others = {family: cells(pool, "soft", family)
                  for p, family in families
                  if p == pool and family not in (*GRAD2_VARIANTS, "none")}
        for family in GRAD2_VARIANTS:
            if (pool, family) not in families:
                continue
            soft = cells(pool, "soft", family)
            prior = cells(pool, "prior", family)
            for index, drop in enumerate(DROPS[:3]):
                gain, prior_gain = base["soft"] - soft[index][0], base["prior"] - prior[index][0]
                rivals = {f: c[index][0] for f, c in others.items() if not math.isnan(c[index][0])}
                best = min(rivals, key=rivals.get) if rivals else None
                goal = GOAL_GAIN.get(pool) if drop == 1.0 else None
                verdict = "" if goal is None else (" ✓" if gain >= goal else f" ✗ (goal {goal:g})")
                kept = f"{prior_gain / gain:.0%}" if gain > 0 else "—"
                rival = f"{best} {rivals[best]:.1f}" if best else "—"
                lines.append(
                    f"| {pool} | {family} | {drop:g} | {_cell(*soft[index])} | {gain:+.1f}{verdict}"
                    f" | {_cell(*prior[index])} | {prior_gain:+.1f} | {kept} | {rival} |")
    return [*lines, ""]


def markdown_table(results: list[RunResult], victim_accuracy: float) -> str:
    summary = aggregate(results)
    lines = [f"Victim test accuracy: {victim_accuracy * 100:.2f}%", ""]
    lines += goal_lines(results, victim_accuracy, summary)
    for pool in sorted({k[0] for k in summary}):
        for thief in sorted({k[1] for k in summary if k[0] == pool}):
            families = sorted({k[2] for k in summary if k[:2] == (pool, thief)})
            lines += [
                f"### pool `{pool}`, thief `{thief}`: clone accuracy (%) at a defender "
                "accuracy drop of at most … (mean ± std over seeds, on the knobs all of them "
                "have)",
                "",
                "| defense | " + " | ".join(f"{d:g} pt" for d in DROPS) + " | knobs |",
                "| --- | " + " | ".join("---" for _ in DROPS) + " | --- |",
            ]
            for family in families:
                cells = drop_table_cells(results, victim_accuracy, pool, thief, family, summary)
                knobs = sum(1 for k in summary if k[:3] == (pool, thief, family))
                lines.append(f"| {family} | {' | '.join(_cell(*c) for c in cells)} | {knobs} |")
            lines.append("")
    thieves = ("soft", "prior", "labels", "arch", "smooth")
    lines += ["### the strongest thief at each point (clone accuracy %, seed 0)", "",
              "| pool | defense | knob | defender acc | " + " | ".join(thieves)
              + " | strongest |", "|---" * (5 + len(thieves)) + "|"]
    seed0 = {(r.pool, r.thief, r.defense, r.knob): r.clone_accuracy * 100
             for r in results if r.seed == 0}
    for (pool, thief, family, knob), s in sorted(summary.items()):
        if thief != "labels" or (pool, "labels", family, knob) not in seed0:
            continue
        row = [seed0.get((pool, t, family, knob), math.nan) for t in thieves]
        strongest = max(v for v in row if not math.isnan(v))
        best = thieves[row.index(strongest)]
        lines.append(f"| {pool} | {family} | {knob:g} | {s['defender']:.2f} | "
                     + " | ".join("—" if math.isnan(v) else f"{v:.1f}" for v in row)
                     + f" | {strongest:.1f} ({best}) |")
    lines += ["", "### every point (mean ± std over seeds)", "",
              "| pool | thief | defense | knob | eff. L1 | defender acc | clone acc | seeds "
              "| top receiver share |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (pool, thief, family, knob), s in sorted(summary.items()):
        share = top_receiver_share(results, pool, family, knob)
        lines.append(
            f"| {pool} | {thief} | {family} | {knob:g} | {s['l1']:.3f} | {s['defender']:.2f} "
            f"| {_cell(s['clone'], s['clone_std'])} | {s['seeds']} | "
            f"{'—' if math.isnan(share) else f'{share:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


#: Thieves of :func:`thief_bars`, with their legend labels.
BAR_THIEVES = (("soft", "soft"), ("prior", "prior-correcting"), ("arch", "other architecture"))


def thief_bars(results: list[RunResult], points: Sequence[tuple[str, float, str]], out: Path,
               title: str) -> None:
    """Horizontal bars of clone accuracy per ``(family, knob, label)`` point, one panel per
    pool: the soft, prior-correcting and other-architecture thieves, mean ± std over the
    seeds recorded (``results`` with the prior rows, :func:`with_prior_rows`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def values(pool: str, thief: str, family: str, knob: float) -> list[float]:
        return [100 * r.clone_accuracy for r in results
                if (r.pool, r.thief, r.defense, r.knob) == (pool, thief, family, knob)]

    pools = sorted({r.pool for r in results})
    figure, axes = plt.subplots(1, len(pools), figsize=(7 * len(pools), 5), sharey=True)
    width = 0.27
    for axis, pool in zip(np.atleast_1d(axes), pools):
        positions = np.arange(len(points))
        for offset, (thief, label) in enumerate(BAR_THIEVES):
            cells = [values(pool, thief, family, knob) for family, knob, _ in points]
            means = [np.mean(c) if c else np.nan for c in cells]
            errors = [np.std(c, ddof=1) if len(c) > 1 else 0 for c in cells]
            axis.barh(positions + (offset - 1) * width, means, width, xerr=errors,
                      label=label, capsize=2)
        axis.set_yticks(positions, [label for _, _, label in points], fontsize=8)
        axis.set_xlabel("clone test accuracy (%)")
        axis.set_title(f"thief pool {pool}", fontsize=10)
        axis.grid(axis="x", alpha=0.3)
    # Once: the panels share the y axis, so inverting each would cancel out.
    np.atleast_1d(axes)[0].invert_yaxis()
    np.atleast_1d(axes)[0].legend(fontsize=8, loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def plot(results: list[RunResult], out: Path, victim_accuracy: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = aggregate(results)
    for pool in sorted({k[0] for k in summary}):
        figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
        families = sorted({k[2] for k in summary if k[:2] == (pool, "soft")})
        colours = plt.get_cmap("tab20")
        for axis in (left, right):
            axis.set_prop_cycle(color=[colours(i % 20) for i in range(len(families))])
        for family in families:
            points = sorted(
                (k[3], s) for k, s in summary.items() if k[:3] == (pool, "soft", family)
            )
            defender_error = [100 - s["defender"] for _, s in points]
            clone_error = [100 - s["clone"] for _, s in points]
            l1 = [s["l1"] for _, s in points]
            style = "-o" if family.startswith("grad2") else "--."
            left.plot(defender_error, clone_error, style, label=family, markersize=4)
            right.plot(l1, clone_error, style, label=family, markersize=4)
        left.set_xlabel("defender error (%)")
        right.set_xlabel("effective L1 (mean ‖ỹ − y‖₁ on the test split)")
        for axis in (left, right):
            axis.set_ylabel("clone error (%)")
            axis.grid(alpha=0.3)
        victim_error = 100 - victim_accuracy * 100
        left.axvline(victim_error, color="grey", lw=0.8)
        # the useful region; budgets that flip most labels (defender error 10-99%) are off it
        left.set_xlim(victim_error - 0.5, victim_error + 8)
        left.set_title("defender accuracy drops of 0-8 points", fontsize=9)
        right.legend(fontsize=7, ncol=2)
        figure.suptitle(f"soft-label thief, pool {pool}")
        figure.tight_layout()
        figure.savefig(out / f"tradeoff_{pool}.png", dpi=110)
        plt.close(figure)


# -------------------------------------------------------------------- CLI
def _evaluate_command(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if args.archive is not None:
        return _evaluate_archive_command(args)
    if args.pool is not None or args.test is not None:
        raise ValueError("--pool and --test go with --archive A.mar")
    if args.quick:
        sweep = quick_sweep()
    else:
        sweep = (label_keeping_sweep() if args.label_keeping
                 else balance_sweep() if args.balance else headline_sweep())
    if args.full_grid:
        sweep.grid = full_grid(EPSILON_GRID)
    if args.pools:
        sweep.pools = tuple(args.pools)
    if args.defenses:
        sweep.grid = {k: v for k, v in sweep.grid.items() if k in args.defenses}
        sweep.extra_grid = {k: v for k, v in sweep.extra_grid.items() if k in args.defenses}
        sweep.adaptive = {k: v for k, v in sweep.adaptive.items() if k in args.defenses}
        sweep.headline = {k: v for k, v in sweep.headline.items() if k in args.defenses}
        sweep.smooth = {k: v for k, v in sweep.smooth.items() if k in args.defenses}
        sweep.arch_seeded = {k: v for k, v in sweep.arch_seeded.items() if k in args.defenses}
    if args.no_adaptive:
        sweep.adaptive, sweep.headline, sweep.smooth, sweep.arch_seeded = {}, {}, {}, {}
    if args.clone_epochs:
        sweep.clone_epochs = args.clone_epochs
    if args.pool_size:
        sweep.pool_size = args.pool_size
    if args.report_only:
        results = report_only(Path(args.out))
        print((Path(args.out) / "table.md").read_text())
        print(f"{len(results)} runs so far; reports in {args.out}")
        return 0
    lab = Lab(Path(args.cache or cache_dir() / "eval"), device=args.device,
              progress=not args.no_progress, test_size=args.test_size)
    results = evaluate(sweep, Path(args.out), lab)
    print((Path(args.out) / "table.md").read_text())
    print(f"{len(results)} runs; reports in {args.out}")
    return 0


def _evaluate_archive_command(args: argparse.Namespace) -> int:
    from grad2.lab.archive_eval import evaluate_archive, format_table

    if args.pool is None or args.test is None:
        raise ValueError("--archive needs --pool DIR (thief queries) and --test DIR (labelled)")
    rows = evaluate_archive(
        Path(args.archive), Path(args.pool), Path(args.test), Path(args.out),
        epsilons=args.epsilons, quick=args.quick, seeds=args.seeds, budget=args.pool_size,
        epochs=args.clone_epochs, clone_arch=args.clone_arch,
        progress=not args.no_progress, own=args.own, thief_arch=args.thief_arch)
    print(format_table(rows))
    print(f"report: {Path(args.out) / 'evaluate.json'}, evaluate.md, evaluate.png")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="sweep thieves against every defense; write the trade-off table",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--out", default="runs/evaluate", help="report folder")
    parser.add_argument("--archive", type=Path,
                        help="evaluate this served model version on your images (with --pool "
                        "and --test) instead of the lab's sweep")
    parser.add_argument("--pool", type=Path, help="with --archive: a thief's query images")
    parser.add_argument("--test", type=Path,
                        help="with --archive: labelled folder (class sub-folders) to score on")
    parser.add_argument("--epsilons", type=float, nargs="+",
                        help="with --archive: budgets to sweep (default 0 0.25 0.5 1)")
    parser.add_argument("--own", type=Path,
                        help="with --archive: a few hundred of the thief's own in-distribution "
                        "images (adds the mixed, fixer, mapping-recovery and filter thieves)")
    parser.add_argument("--seeds", type=int, default=1, help="with --archive: clone seeds")
    parser.add_argument("--clone-arch", help="with --archive: clone architecture (default: "
                        "the victim's)")
    parser.add_argument("--thief-arch", help="with --archive: the other-architecture thief's "
                        "clone architecture (default: one other than --clone-arch that "
                        "takes the archive's inputs)")
    parser.add_argument("--cache", help="folder for models and answers (default: cache/eval)")
    parser.add_argument("--quick", action="store_true", help="a minutes-long miniature sweep")
    parser.add_argument("--full-grid", action="store_true", help="epsilon 0, 0.1, ..., 1.0")
    parser.add_argument("--label-keeping", action="store_true",
                        help="the label-keeping defenses up to L1 2 against misdirection "
                        "(3 seeds, plus the other-architecture thief)")
    parser.add_argument("--balance", action="store_true",
                        help="class-balanced misdirection (mean answer kept) against plain "
                        "misdirection and the prior-correcting thief (3 seeds, plus the "
                        "other-architecture thief)")
    parser.add_argument("--pools", nargs="+", choices=POOLS)
    parser.add_argument("--defenses", nargs="+", choices=SWEEP_FAMILIES, metavar="FAMILY",
                        help="only these defense families (grad2.lab.families)")
    parser.add_argument("--no-adaptive", action="store_true", help="soft thief only")
    parser.add_argument("--clone-epochs", type=int)
    parser.add_argument("--pool-size", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--test-size", type=int, help="first N test images only")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the reports from the runs recorded so far")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_evaluate_command)

