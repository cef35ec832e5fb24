"""``grad2 ood-study``: every thief against gated defenses fitted on defender-side data only.

The defender has the victim, its training images (the first 50,000 Fashion-MNIST training
images) and the first half of the Fashion-MNIST test split as validation. From those
alone it fits (:class:`Defender`): an early-stopped surrogate distilled on 10,000 of its
training images, Adaptive Misinformation's misinformation network, and each defense's
knob (gate threshold ``τ`` or budget ``ε``) as the largest whose accuracy drop on the
validation half stays within :data:`VALIDATION_DROP`. Defender accuracy is reported on
the other half of the test split, which nothing was fitted on.

Thieves query pools no fitting step saw (:data:`POOLS`): Animal-MNIST, three transformed
copies of it (rotated and cropped; inverted with noise; shifted with lower contrast and
noise), a warped copy of the held-out Fashion-MNIST images, and the held-out images
themselves (the in-distribution thief), a shifted, blurred and rotated copy of them
(``fashion_transformed``) and the mixed pool (Animal-MNIST plus 500 held-out images).
Thieves (:data:`THIEVES`): soft, labels-only, another architecture, prior-correcting
(derived from the soft clone), recovery (learns a defended → clean map on its own
simulation of the public defense), confidence-filtering, and issue 23's thieves that read
the answers (:mod:`grad2.lab.thieves`): the post-hoc fixer (derived from the soft clone),
mapping recovery and the answer filter; the fixer and the mapping-recovery thief also own
300 held-out images (:data:`OWN_POOL`). ``--thieves`` runs only those on issue 23's pools
and reports the best thief per pool.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grad2 import defenses as D
from grad2 import gate
from grad2.lab import thieves
from grad2.lab.data import (
    cache_dir,
    pool_indices,
    thief_pool,
    to_tensor,
    victim_train_split,
)
from grad2.lab.evaluate import (
    MISMATCH_ARCH,
    Lab,
    apply_defense,
    collapsed,
    prior_corrected_logits,
)
from grad2.lab.families import STUDY_DEFENSES
from grad2.lab.thieves import answer_features, fit_mlp
from grad2.lab.train import (
    set_threads,
    train_clone,
    train_misinformation,
    train_surrogate,
)
from grad2.models import load_checkpoint, penultimate, predict_probs, save_checkpoint
from grad2.tools.ownership import permutation_test
from grad2.tools.progress import progress_bar

QUERIES = 4000
SEEDS = (0, 1, 2)
CLONE_EPOCHS = 12
#: Fashion-MNIST test images the defender calibrates on; the rest report its accuracy.
VALIDATION_SIZE = 5000
#: Largest accuracy drop (points) a knob may cost on the validation half.
VALIDATION_DROP = 0.8
#: Shares of validation queries a gate may treat as OOD (the threshold grid).
GATE_SHARES = (0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2)
GATE_SLOPE = 50.0
#: The feature gate's slope, in validation standard deviations of its score: α goes from
#: 0.12 to 0.88 within 0.2 standard deviations of the threshold.
FEATURE_SLOPE_SPREADS = 20.0
#: The redirection budget of in-distribution queries under a gate, and the OOD one.
GATED_EPSILON = 0.2
GATED_EPSILON_OOD = 2.0
#: The lab's mapping key (reproducible; a real deployment uses ``grad2 keygen``).
LAB_KEY = hashlib.sha256(b"grad2 ood-study mapping key").digest()
#: Draws of random mappings in the ownership test (p-values down to 1e-4).
OWNERSHIP_DRAWS = 10_000

#: Thieves trained on every pool, and those trained on the main pool only.
POOL_THIEVES = ("soft", "labels")
MAIN_THIEVES = ("soft", "labels", "arch", "recovery", "confidence")
#: Issue 23's thieves that read the answers, trained from the soft thief's clone.
ANSWER_THIEVES = ("mapping", "filter")
#: Thieves derived from the soft thief's clone without training: prior-correcting and the
#: post-hoc fixer.
DERIVED_THIEVES = ("prior", "fixer")
THIEVES = (*MAIN_THIEVES, *ANSWER_THIEVES, *DERIVED_THIEVES)
#: The order issue 23's runs train thieves in: the soft thief first (the others start from
#: its clone), the cheap and strong ones before the rest.
TRAINED_ORDER = (("soft", "labels", *ANSWER_THIEVES), ("recovery", "confidence", "arch"))
MAIN_POOL = "animal"
IN_DISTRIBUTION_POOL = "fashion_heldout"


def rotated_crop(images: np.ndarray, seed: int) -> np.ndarray:
    """Rotate 90°, keep the central 20x20 and scale it back to 28x28."""
    rotated = torch.from_numpy(np.rot90(images, k=1, axes=(1, 2)).copy()).float()
    crop = rotated[:, 4:24, 4:24].unsqueeze(1)
    scaled = F.interpolate(crop, size=(28, 28), mode="bilinear", align_corners=False)
    return scaled.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def inverted_noise(images: np.ndarray, seed: int) -> np.ndarray:
    """Invert (dark object on a bright background) and add Gaussian noise (σ 20)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator) * 20
    inverted = 255 - torch.from_numpy(images).float()
    return (inverted + noise).round().clamp(0, 255).to(torch.uint8).numpy()


def warped(images: np.ndarray, seed: int) -> np.ndarray:
    """A random rotation (±30°), shift (±3 px) and zoom (0.8-1.1) per image, plus noise
    (σ 15): in-distribution objects seen in other ways."""
    generator = torch.Generator().manual_seed(seed)
    count = len(images)
    angle = (torch.rand(count, generator=generator) * 2 - 1) * (torch.pi / 6)
    scale = 0.8 + 0.3 * torch.rand(count, generator=generator)
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * (3 / 14)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    source = torch.from_numpy(images).float().unsqueeze(1)
    grid = F.affine_grid(theta, list(source.shape), align_corners=False)
    moved = F.grid_sample(source, grid, align_corners=False).squeeze(1)
    noise = torch.randn(moved.shape, generator=generator) * 15
    return (moved + noise).round().clamp(0, 255).to(torch.uint8).numpy()


def shifted_noise(images: np.ndarray, seed: int) -> np.ndarray:
    """A random shift (±4 px, black fill), contrast scaled by 0.6-1.0 and Gaussian noise
    (σ 12) per image."""
    generator = torch.Generator().manual_seed(seed)
    count = len(images)
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * (4 / 14)
    ones, zeros = torch.ones(count), torch.zeros(count)
    theta = torch.stack([torch.stack([ones, zeros, shift[:, 0]], 1),
                         torch.stack([zeros, ones, shift[:, 1]], 1)], 1)
    source = torch.from_numpy(images).float().unsqueeze(1)
    grid = F.affine_grid(theta, list(source.shape), align_corners=False)
    moved = F.grid_sample(source, grid, mode="nearest", align_corners=False).squeeze(1)
    contrast = 0.6 + 0.4 * torch.rand(count, 1, 1, generator=generator)
    noise = torch.randn(moved.shape, generator=generator) * 12
    return (moved * contrast + noise).round().clamp(0, 255).to(torch.uint8).numpy()


def shifted_blurred_rotated(images: np.ndarray, seed: int) -> np.ndarray:
    """A random rotation (±15°) and shift (±2 px) per image, and a 3x3 Gaussian blur
    (σ 0.8) on a random half: the victim's own kind of images, photographed again."""
    generator = torch.Generator().manual_seed(seed)
    count = len(images)
    angle = (torch.rand(count, generator=generator) * 2 - 1) * (torch.pi / 12)
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * (2 / 14)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    source = torch.from_numpy(images).float().unsqueeze(1)
    grid = F.affine_grid(theta, list(source.shape), align_corners=False)
    moved = F.grid_sample(source, grid, align_corners=False)
    taps = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * 0.8 ** 2))
    kernel = (taps[:, None] * taps[None, :] / taps.sum() ** 2).view(1, 1, 3, 3)
    blurred = F.conv2d(F.pad(moved, (1, 1, 1, 1), mode="replicate"), kernel)
    blur = (torch.rand(count, generator=generator) < 0.5).view(-1, 1, 1, 1)
    return torch.where(blur, blurred, moved).squeeze(1).round().clamp(0, 255).to(
        torch.uint8).numpy()


#: Thief pools: name -> (lab pool it is made from, transform or None). The one list.
POOLS: dict[str, tuple[str, Callable[[np.ndarray, int], np.ndarray] | None]] = {
    "animal": ("animal", None),
    "animal_rotated": ("animal", rotated_crop),
    "animal_inverted": ("animal", inverted_noise),
    "animal_shifted": ("animal", shifted_noise),
    "heldout_warped": ("fashion_heldout", warped),
    "fashion_heldout": ("fashion_heldout", None),
    "fashion_transformed": ("fashion_heldout", shifted_blurred_rotated),
}
#: Held-out Fashion-MNIST images no pool above holds (positions after the seed-0 draw of
#: :data:`QUERIES` in that draw's order): name -> (first, stop).
HELDOUT_PARTS = {"fashion_extra": (QUERIES, QUERIES + 500),
                 "fashion_own": (QUERIES + 500, QUERIES + 800)}
#: Pools joined from others: the mixed thief's OOD pool plus 500 in-distribution queries.
MIXED_POOLS = {"mixed": ("animal", "fashion_extra")}
#: The few hundred in-distribution queries the fixer and the mapping-recovery thief own
#: (answered by the same API, on top of the pool's queries).
OWN_POOL = "fashion_own"
#: Issue 23's pools: OOD, mixed, in-distribution (transformed own-distribution images).
THIEF_POOLS = ("animal", "mixed", "fashion_transformed")
#: The pools whose queries are out of the victim's distribution and teach an undefended
#: thief something (its clone well above the 10% of chance): the goals' pools.
#: ``animal_inverted`` is reported apart: undefended clones there reach 11-21%.
OOD_POOLS = ("animal", "animal_rotated", "animal_shifted")


def pool_images(name: str, queries: int = QUERIES) -> np.ndarray:
    """``uint8 [N, 28, 28]``: a thief pool of :data:`POOLS` (seed 0 draw of ``queries``),
    a part of :data:`HELDOUT_PARTS` or a joined pool of :data:`MIXED_POOLS`."""
    if name in MIXED_POOLS:
        return np.concatenate([pool_images(part, queries) for part in MIXED_POOLS[name]])
    if name in HELDOUT_PARTS:
        heldout = thief_pool("fashion_heldout")
        first, stop = HELDOUT_PARTS[name]
        return heldout.images[pool_indices(len(heldout), len(heldout), 0)[first:stop]]
    base, transform = POOLS[name]
    images = thief_pool(base, size=queries, seed=0).images
    return images if transform is None else transform(images, 1)


@dataclass
class Run:
    defense: str
    pool: str
    thief: str
    seed: int
    clone_accuracy: float
    queries: int
    trained_on: int
    retrained: bool
    wall_time_s: float
    extra: dict


class Defender:
    """The defender's fitted parts and calibrated defenses (cached in ``lab.folder``)."""

    def __init__(self, lab: Lab, progress: bool = True, key: bytes = LAB_KEY,
                 names: tuple[str, ...] = STUDY_DEFENSES) -> None:
        self.lab, self.progress = lab, progress
        self.validation = slice(0, VALIDATION_SIZE)
        self.report = slice(VALIDATION_SIZE, None)
        self.train = victim_train_split()
        rng = np.random.default_rng(5)
        self.fit_images = self.train.subset(rng.choice(len(self.train), 10_000, replace=False))
        self._misinformation_rows = rng.choice(len(self.train), 20_000, replace=False)
        self.surrogate = lab._model("surrogate_defender", lambda: train_surrogate(
            lab.victim, self.fit_images, epochs=4, planned_epochs=20, seed=7,
            progress=progress))
        self._misinformation: nn.Module | None = None
        self.mapping = gate.keyed_mapping(key, 10)
        self.feature_gate = gate.fit_feature_gate(
            penultimate(self.surrogate, to_tensor(self.fit_images.images)),
            torch.from_numpy(self.fit_images.labels), 10)
        validation_scores = self.gate_scores(lab.test_inputs[self.validation])
        self.feature_slope = FEATURE_SLOPE_SPREADS / validation_scores.std().item()
        self.knobs = self._calibrate(names)

    @property
    def misinformation(self) -> nn.Module:
        """Adaptive Misinformation's network, trained on 20,000 of the victim's training
        images (cached)."""
        if self._misinformation is None:
            rows = self._misinformation_rows
            self._misinformation = self.lab._model("misinformation", lambda: train_misinformation(
                to_tensor(self.train.images[rows]), torch.from_numpy(self.train.labels[rows]),
                num_classes=10, epochs=3, seed=3, progress=self.progress))
        return self._misinformation

    def gate_scores(self, inputs: Tensor) -> Tensor:
        """``[N]`` feature-gate scores of ``inputs`` (low = likely OOD)."""
        return torch.cat([gate.feature_score(penultimate(self.surrogate, part), self.feature_gate)
                          for part in inputs.split(1000)])

    # ----------------------------------------------------------- building and calibrating
    def build(self, name: str, knob: float | None = None) -> D.Defense:
        """The defense ``name`` at ``knob`` (default: its calibrated one)."""
        knob = self.knobs.get(name) if knob is None else knob
        if name == "none":
            return D.NoDefense()
        if name == "adaptive_misinformation":
            return D.AdaptiveMisinformation(self.misinformation, knob, GATE_SLOPE)
        if name == "grad2":
            return D.GRAD2(self.surrogate, knob)
        if name.startswith("grad2_gated_"):
            answer = name.removeprefix("grad2_gated_")
            return D.GatedGRAD2(self.surrogate, GATED_EPSILON, GATED_EPSILON_OOD, knob,
                                self.feature_slope, answer, self.mapping,
                                gate_tensors=self.feature_gate)
        raise ValueError(f"unknown defense {name!r}; known: {', '.join(STUDY_DEFENSES)}")

    def _drop(self, defense: D.Defense) -> float:
        inputs = self.lab.test_inputs[self.validation]
        clean = self.lab.test_probs[self.validation]
        labels = self.lab.test_labels[self.validation]
        answers = apply_defense(defense, inputs, clean, progress=False)
        return 100 * ((clean.argmax(1) == labels).float().mean()
                      - (answers.argmax(1) == labels).float().mean()).item()

    def _calibrate(self, names: tuple[str, ...]) -> dict[str, float]:
        """Each defense's knob: the largest of its grid whose validation drop is at most
        :data:`VALIDATION_DROP` (cached in ``ood_knobs.json``)."""
        path = self.lab.folder / "ood_knobs.json"
        knobs: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
        wanted = [name for name in names if name != "none" and name not in knobs]
        if not wanted:
            return knobs
        msp = gate.max_softmax(self.lab.test_probs[self.validation])
        features = self.gate_scores(self.lab.test_inputs[self.validation])
        feature_grid = [gate.calibrate_threshold(features, share) for share in GATE_SHARES]
        grids: dict[str, list[float]] = {
            "grad2": [round(0.1 * step, 1) for step in range(1, 11)],
            "adaptive_misinformation": [gate.calibrate_threshold(msp, share)
                                        for share in GATE_SHARES],
            "grad2_gated_permute": feature_grid,
            "grad2_gated_redirect": feature_grid,
        }
        for name in progress_bar(wanted, desc="calibrate", disable=not self.progress):
            chosen = grids[name][0]
            for knob in grids[name]:
                if self._drop(self.build(name, knob)) <= VALIDATION_DROP:
                    chosen = knob
            knobs[name] = chosen
        path.write_text(json.dumps(knobs, indent=1))
        return knobs

    def gated_share(self, inputs: Tensor) -> float:
        """The share of ``inputs`` the calibrated feature gate treats as OOD (α ≥ ½)."""
        scores = self.gate_scores(inputs)
        return (scores < self.knobs["grad2_gated_permute"]).float().mean().item()

    # ---------------------------------------------------------------- answers
    def answers(self, name: str, pool: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(inputs, clean, defended)`` of ``pool`` under defense ``name`` (cached)."""
        inputs = to_tensor(pool_images(pool))
        clean = predict_probs(self.lab.victim, inputs)
        path = self.lab.folder / "ood_answers" / f"{name}-{pool}.pt"
        if path.exists():
            return inputs, clean, torch.load(path, weights_only=True)
        defended = apply_defense(self.build(name), inputs, clean, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(defended, path)
        return inputs, clean, defended

    def test_answers(self, name: str) -> Tensor:
        """The defense's answers to the whole Fashion-MNIST test split (cached)."""
        path = self.lab.folder / "ood_answers" / f"{name}-test.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        defended = apply_defense(self.build(name), self.lab.test_inputs, self.lab.test_probs,
                                 progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(defended, path)
        return defended


# ------------------------------------------------------------------------- thieves


def clone_accuracy(clone: nn.Module, lab: Lab) -> tuple[float, Tensor]:
    """The clone's Fashion-MNIST test accuracy and its logits ``[N, K]``."""
    with torch.inference_mode():
        logits = torch.cat([clone(lab.test_inputs[i:i + 1000]).float()
                            for i in range(0, len(lab.test_inputs), 1000)])
    return (logits.argmax(1) == lab.test_labels).float().mean().item(), logits


def fit_clone(inputs: Tensor, answers: Tensor, seed: int, arch: str = "small_cnn",
              hard_labels: bool = False, epochs: int = CLONE_EPOCHS) -> tuple[nn.Module, bool]:
    """A thief's clone, retrained at a tenth of the rate when its training collapsed."""
    clone = train_clone(inputs, answers, arch=arch, epochs=epochs, seed=seed,
                        hard_labels=hard_labels, progress=False)
    if collapsed(clone, inputs, answers):
        return train_clone(inputs, answers, arch=arch, epochs=epochs, seed=seed,
                           hard_labels=hard_labels, progress=False, lr=0.01), True
    return clone, False


def seed_accuracies(lab: Lab, inputs: Tensor, answers: Tensor, seeds: Sequence[int],
                    arch: str = "small_cnn", hard_labels: bool = False,
                    epochs: int = CLONE_EPOCHS) -> list[float]:
    """Fashion-MNIST test accuracy (%) of a :func:`fit_clone` clone per seed."""
    return [100 * clone_accuracy(fit_clone(inputs, answers, seed, arch, hard_labels,
                                           epochs)[0], lab)[0] for seed in seeds]


def seed_row(accuracies: Sequence[float], **labels: Any) -> dict[str, Any]:
    """A table row of :func:`seed_accuracies`: ``labels``, then the mean and each value
    (2 decimals)."""
    return {**labels, "mean": round(statistics.mean(accuracies), 2),
            "values": [round(value, 2) for value in accuracies]}


def seed_table(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str]) -> str:
    """Markdown of :func:`seed_row` rows: a column per ``header -> label key`` of
    ``columns``, then the clone accuracy (mean; per seed)."""
    lines = [f"| {' | '.join(columns)} | clone accuracy % (mean; per seed) |",
             "| --- " * (len(columns) + 1) + "|"]
    lines += [f"| {' | '.join(str(row[key]) for key in columns.values())} | "
              f"{row['mean']:.1f}; {', '.join(f'{value:.1f}' for value in row['values'])} |"
              for row in rows]
    return "\n".join(lines)


def confident_rows(answers: Tensor, drop_share: float = 0.25) -> Tensor:
    """``[N]`` bool: the answers a confidence-filtering thief keeps: those without an
    exactly drained class (unless most answers have one: then that is no sign of
    alteration), and among them a top probability above the ``drop_share`` quantile."""
    untouched = ~(answers == 0).any(dim=1)
    if untouched.float().mean() < 0.5:
        untouched = torch.ones_like(untouched)
    top = answers.max(dim=1).values
    cut = torch.quantile(top[untouched], drop_share)
    return untouched & (top >= cut)


def simulated_defense(name: str, defender: Defender, own_model: nn.Module,
                      inputs: Tensor, own_clean: Tensor, seed: int) -> D.Defense:
    """The thief's copy of the public defense ``name``: the code and the configuration's
    knobs are public (Kerckhoffs), the surrogate is the thief's own model, the mapping key
    its own, the misinformation network one it trains on its own model's labels."""
    knob = defender.knobs.get(name)
    if name == "none":
        return D.NoDefense()
    if name == "adaptive_misinformation":
        misinformation = train_misinformation(inputs, own_clean.argmax(1), 10, epochs=2,
                                              seed=seed + 100, progress=False)
        return D.AdaptiveMisinformation(misinformation, knob, GATE_SLOPE)
    if name == "grad2":
        return D.GRAD2(own_model, knob)
    # Its own feature gate, fitted on its own pool with its model's labels, calibrated so
    # that it gates the share of that pool the real gate's threshold gates in the answers
    # (the thief sees which answers were altered only through its detector; this is the
    # most generous reading: it knows how many).
    own_key = hashlib.sha256(f"thief {seed}".encode()).digest()
    features = penultimate(own_model, inputs)
    own_gate = gate.fit_feature_gate(features, own_clean.argmax(1), 10)
    scores = gate.feature_score(features, own_gate)
    share = defender.gated_share(inputs)
    threshold = gate.calibrate_threshold(scores, min(max(share, 0.0), 0.99))
    return D.GatedGRAD2(own_model, GATED_EPSILON, GATED_EPSILON_OOD, threshold,
                        FEATURE_SLOPE_SPREADS / scores.std().item(),
                        name.removeprefix("grad2_gated_"), gate.keyed_mapping(own_key, 10),
                        gate_tensors=own_gate)


def recovery_answers(name: str, defender: Defender, inputs: Tensor, answers: Tensor,
                     seed: int, first: nn.Module) -> tuple[Tensor, dict]:
    """The recovery thief: with its first clone ``first`` (trained on the API's answers)
    as surrogate, the public defense run on the thief's own pool gives pairs (defended,
    clean) to fit a map defended → clean, applied to the API's answers."""
    own_clean = predict_probs(first, inputs)
    simulation = simulated_defense(name, defender, first, inputs, own_clean, seed)
    with torch.enable_grad():
        simulated = apply_defense(simulation, inputs, own_clean, progress=False)
    recover = fit_mlp(answer_features(simulated), own_clean, seed)
    with torch.no_grad():
        recovered = recover(answer_features(answers)).softmax(1)
    return recovered, {"simulated_l1": (simulated - own_clean).abs().sum(1).mean().item()}


def mapping_answers(defender: Defender, name: str, inputs: Tensor, answers: Tensor,
                    seed: int, first: nn.Module) -> tuple[Tensor, dict]:
    """The mapping-recovery thief's targets: the relabelling its first clone's confusion
    against the API on its own in-distribution queries (:data:`OWN_POOL`) shows, undone on
    the answers a reference model (a clone of those queries' answers alone) finds more
    plausible undone (:func:`grad2.lab.thieves.recover_answers`)."""
    own_inputs, _, own_answers = defender.answers(name, OWN_POOL)
    relabelling = thieves.estimate_relabelling(first, own_inputs, own_answers)
    extra = {"relabelling_found": float(torch.equal(relabelling, defender.mapping))
             if name.endswith("permute") else 0.0,
             "renamed_classes": float((relabelling != torch.arange(len(relabelling))).sum())}
    if extra["renamed_classes"] == 0:
        return answers, {**extra, "undone_share": 0.0}
    reference, _ = fit_clone(own_inputs, own_answers, seed + 50)
    recovered, moved = thieves.recover_answers(answers, relabelling,
                                               predict_probs(reference, inputs))
    return recovered, {**extra, "undone_share": moved.float().mean().item()}


def filtered_rows(defender: Defender, name: str, inputs: Tensor, answers: Tensor, seed: int,
                  first: nn.Module) -> tuple[Tensor, dict]:
    """``[N]`` bool: the answers the answer filter keeps. Its detector learns altered from
    clean answers on its own run of the public defense (its first clone as surrogate, its
    own key) over its own pool (:func:`simulated_defense`)."""
    own_clean = predict_probs(first, inputs)
    simulation = simulated_defense(name, defender, first, inputs, own_clean, seed)
    with torch.enable_grad():
        simulated = apply_defense(simulation, inputs, own_clean, progress=False)
    keep, accuracy = thieves.filter_rows(answers, simulated, own_clean, answer_features,
                                         lambda rows, labels, s: fit_mlp(rows, labels, s, 30),
                                         seed)
    return keep, {"detector_accuracy": accuracy, "kept_share": keep.float().mean().item()}


def clone_path(lab: Lab, name: str, pool: str, thief: str, seed: int) -> Path:
    """Where a thief's clone is kept."""
    return lab.folder / "ood_clones" / f"{name}-{pool}-{thief}-{seed}.pt"


def soft_clone(defender: Defender, name: str, pool: str, seed: int) -> nn.Module:
    """The soft thief's clone of ``pool`` (trained first; the later thieves' first clone)."""
    path = clone_path(defender.lab, name, pool, "soft", seed)
    if not path.exists():
        run_thief(defender, name, pool, "soft", seed)
    model, _ = load_checkpoint(path)
    return model.eval()


def run_thief(defender: Defender, name: str, pool: str, thief: str, seed: int) -> list[Run]:
    """Train one thief's clone; a soft one also gives the prior-correcting thief and the
    post-hoc fixer (its outputs renamed, no retraining). Thieves whose targets equal the
    soft thief's (nothing undone, nothing dropped) reuse its clone."""
    lab = defender.lab
    started = time.perf_counter()
    inputs, clean, answers = defender.answers(name, pool)
    train_inputs, train_answers, extra = inputs, answers, {}
    arch = MISMATCH_ARCH if thief == "arch" else "small_cnn"
    if thief == "confidence":
        keep = confident_rows(answers)
        train_inputs, train_answers = inputs[keep], answers[keep]
    elif thief == "recovery":
        train_answers, extra = recovery_answers(name, defender, inputs, answers, seed,
                                                soft_clone(defender, name, pool, seed))
        extra["l1_before"] = (answers - clean).abs().sum(1).mean().item()
        extra["l1_after"] = (train_answers - clean).abs().sum(1).mean().item()
    elif thief == "mapping":
        train_answers, extra = mapping_answers(defender, name, inputs, answers, seed,
                                               soft_clone(defender, name, pool, seed))
    elif thief == "filter":
        keep, extra = filtered_rows(defender, name, inputs, answers, seed,
                                    soft_clone(defender, name, pool, seed))
        train_inputs, train_answers = inputs[keep], answers[keep]
    same_as_soft = (thief in ("mapping", "filter") and len(train_inputs) == len(inputs)
                    and torch.equal(train_answers, answers))
    if same_as_soft:
        clone, retrained = soft_clone(defender, name, pool, seed), False
    else:
        clone, retrained = fit_clone(train_inputs, train_answers, seed, arch,
                                     hard_labels=thief == "labels")
    accuracy, logits = clone_accuracy(clone, lab)
    save_checkpoint(clone, clone_path(lab, name, pool, thief, seed), {"role": "clone"})
    wall = round(time.perf_counter() - started, 1)
    runs = [Run(name, pool, thief, seed, accuracy, len(inputs), len(train_inputs), retrained,
                wall, extra)]
    if thief == "soft":
        prior = (prior_corrected_logits(logits, answers).argmax(1) == lab.test_labels)
        runs.append(Run(name, pool, "prior", seed, prior.float().mean().item(), len(inputs),
                        len(inputs), retrained, 0.0, {}))
        own_inputs, _, own_answers = defender.answers(name, OWN_POOL)
        renaming = thieves.fixer_relabelling(clone, own_inputs, own_answers)
        fixed = thieves.relabel_outputs(logits, renaming).argmax(1) == lab.test_labels
        runs.append(Run(name, pool, "fixer", seed, fixed.float().mean().item(),
                        len(inputs) + len(own_inputs), len(inputs), retrained, 0.0,
                        {"renamed_classes": float((renaming != torch.arange(len(renaming)))
                                                  .sum())}))
    return runs


# ---------------------------------------------------------------- tells and ownership


def tell_accuracy(defender: Defender, name: str, pool: str = MAIN_POOL) -> float:
    """Held-out accuracy of a classifier telling defended answers from clean ones on
    ``pool`` (half the images answered each way; 50% = no tell)."""
    _, clean, defended = defender.answers(name, pool)
    count = len(clean)
    generator = torch.Generator().manual_seed(11)
    is_defended = torch.rand(count, generator=generator) < 0.5
    shown = torch.where(is_defended.unsqueeze(1), defended, clean)
    features, labels = answer_features(shown), is_defended.long()
    split = int(0.75 * count)
    model = fit_mlp(features[:split], labels[:split], 11)
    with torch.no_grad():
        predicted = model(features[split:]).argmax(1)
    return (predicted == labels[split:]).float().mean().item()


def verification_images(defender: Defender) -> dict[str, Tensor]:
    """Fresh OOD images for ``verify``, by kind: ``fresh_animal`` (the 6,000 Animal-MNIST
    images no thief pool here draws: natural images of the kind thieves send, never
    queried) and ``transformed_own`` (the defender's own training images turned OOD,
    :func:`verification_pixels`)."""
    return {"fresh_animal": to_tensor(fresh_ood_pixels()),
            "transformed_own": to_tensor(verification_pixels(defender.train.images))}


def fresh_ood_pixels(queries: int = QUERIES) -> np.ndarray:
    """``uint8 [N, 28, 28]``: the Animal-MNIST images outside the seed-0 draw of
    ``queries`` that every Animal pool here is made from."""
    animal = thief_pool("animal")
    queried = np.zeros(len(animal), dtype=bool)
    queried[pool_indices(len(animal), queries, 0)] = True
    return animal.images[~queried]


def verification_pixels(train_images: np.ndarray) -> np.ndarray:
    """``uint8 [4000, 28, 28]``: 4,000 seeded training images (seed 21), half rotated and
    cropped, half inverted with noise."""
    rows = np.random.default_rng(21).choice(len(train_images), 4000, replace=False)
    images = train_images[rows]
    return np.concatenate([rotated_crop(images[:2000], 3), inverted_noise(images[2000:], 4)])


def ownership_p(defender: Defender, model: nn.Module, images: Tensor, clean: Tensor) -> dict:
    """Permutation test of ``model`` for the keyed mapping on ``images`` (the verification
    images the gate flags) with the victim's clean answers ``clean``."""
    tops = clean.argmax(1).numpy()
    with torch.inference_mode():
        suspect = model.eval()(images).argmax(1).numpy()
    receivers = defender.mapping.numpy()[tops]
    verdict = permutation_test(suspect, tops, receivers, 10, draws=OWNERSHIP_DRAWS)
    return {"p_value": verdict.p_value, "follows": verdict.follows_receiver,
            "null_mean": verdict.null_mean, "images": verdict.informative}


def innocent_models(lab: Lab, count: int = 4) -> list[tuple[str, nn.Module]]:
    """Models trained independently on the true task (Fashion-MNIST labels, other seeds
    and subsets, small and wide networks), cached."""
    train = victim_train_split()
    models = []
    for index in progress_bar(range(count), desc="innocent models", disable=not lab.progress):
        arch = "small_cnn" if index % 2 == 0 else MISMATCH_ARCH

        def fit(index: int = index, arch: str = arch) -> nn.Module:
            rows = np.random.default_rng(300 + index).choice(len(train), 15_000, replace=False)
            one_hot = F.one_hot(torch.from_numpy(train.labels[rows]), 10).float()
            return train_clone(to_tensor(train.images[rows]), one_hot, arch=arch, epochs=3,
                               seed=300 + index, hard_labels=True, progress=False)

        models.append((f"independent-{arch}-{index}", lab._model(f"innocent_{index}", fit)))
    return models


# ------------------------------------------------------------------------- the study


def plan(quick: bool) -> list[tuple[str, str, str, int]]:
    """(defense, pool, thief, seed) of every clone to train."""
    seeds = SEEDS[:1] if quick else SEEDS
    jobs = []
    for seed in seeds:
        for name in STUDY_DEFENSES:
            for thief in (*MAIN_THIEVES, *ANSWER_THIEVES):
                if thief in POOL_THIEVES or name != "grad2_gated_redirect":
                    jobs.append((name, MAIN_POOL, thief, seed))
            for pool in (*POOLS, *MIXED_POOLS):
                if pool != MAIN_POOL:
                    answer_thieves = ANSWER_THIEVES if pool in THIEF_POOLS else ()
                    jobs.extend((name, pool, thief, seed)
                                for thief in (*POOL_THIEVES, *answer_thieves))
    return jobs


def thief_plan(defenses: tuple[str, ...], pools: tuple[str, ...], trained: tuple[str, ...],
               seeds: tuple[int, ...]) -> list[tuple[str, str, str, int]]:
    """(defense, pool, thief, seed) of issue 23's runs, in :data:`TRAINED_ORDER` (so that a
    run cut short has the soft, labels-only, mapping and filter thieves of every pool)."""
    return [(name, pool, thief, seed) for seed in seeds for tier in TRAINED_ORDER
            for pool in pools for name in defenses for thief in tier if thief in trained]


def train_planned(defender: Defender, jobs: list[tuple[str, str, str, int]], journal: Path,
                  progress: bool = True) -> list[Run]:
    """Train every job not yet in ``journal`` (one JSON run a line, appended as they end)."""
    done = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            run = Run(**json.loads(line))
            done[run.defense, run.pool, run.thief, run.seed] = run
    for job in progress_bar(jobs, desc="clones", disable=not progress):
        if job in done:
            continue
        for run in run_thief(defender, *job):
            done[run.defense, run.pool, run.thief, run.seed] = run
            with open(journal, "a") as handle:
                handle.write(json.dumps(asdict(run)) + "\n")
    return list(done.values())


def run_study(out: Path, folder: Path, quick: bool = False, progress: bool = True) -> dict:
    """Fit the defender, train every planned clone (journal in ``out``), measure tells and
    ownership, write ``ood.json`` and ``ood.md``."""
    out.mkdir(parents=True, exist_ok=True)
    lab = Lab(folder, progress=progress)
    defender = Defender(lab, progress)
    runs = train_planned(defender, plan(quick), out / "ood_runs.jsonl", progress)
    report = summarise(defender, runs)
    (out / "ood.json").write_text(json.dumps(report, indent=1))
    (out / "ood.md").write_text(goals_markdown(report) + "\n" + markdown(report))
    plot_study(report, out / "ood.png")
    return report


def summarise(defender: Defender, runs: list[Run]) -> dict:
    """Defender cost, clone accuracy per (defense, pool, thief), tells and ownership."""
    lab = defender.lab
    report: dict = {"knobs": defender.knobs, "victim_accuracy": lab.victim_accuracy,
                    "mapping": defender.mapping.tolist(), "defenses": {}, "clones": {}}
    labels = lab.test_labels[defender.report]
    clean_report = lab.test_probs[defender.report]
    base = (clean_report.argmax(1) == labels).float().mean().item()
    for name in STUDY_DEFENSES:
        answers = defender.test_answers(name)[defender.report]
        _, pool_clean, pool_answers = defender.answers(name, MAIN_POOL)
        report["defenses"][name] = {
            "defender_accuracy": (answers.argmax(1) == labels).float().mean().item(),
            "defender_drop": 100 * (base - (answers.argmax(1) == labels).float().mean().item()),
            "test_l1": (answers - clean_report).abs().sum(1).mean().item(),
            "pool_l1": (pool_answers - pool_clean).abs().sum(1).mean().item(),
            "pool_flips": (pool_answers.argmax(1) != pool_clean.argmax(1)).float().mean().item(),
            "pool_exact_zeros": (pool_answers == 0).any(1).float().mean().item(),
            "tell_accuracy": tell_accuracy(defender, name),
        }
    report["defender_report_accuracy"] = base
    report["gated_share"] = {}
    for pool in POOLS:
        inputs = to_tensor(pool_images(pool))
        clean = predict_probs(lab.victim, inputs)
        msp = gate.max_softmax(clean) < defender.knobs["adaptive_misinformation"]
        report["gated_share"][pool] = {"msp": msp.float().mean().item(),
                                       "features": defender.gated_share(inputs)}
    report["clones"], report["recovery"] = clone_cells(runs)
    report["best"] = best_per_pool(report["clones"])
    report["ownership"] = ownership_report(defender, runs)
    return report


def clone_cells(runs: list[Run]) -> tuple[dict, dict]:
    """Clone accuracy per ``"defense|pool|thief"`` (mean, std, seeds, values) and the mean
    of each thief's extra figures."""
    cells: dict[str, list[float]] = {}
    extras: dict[str, list[dict]] = {}
    for run in runs:
        key = f"{run.defense}|{run.pool}|{run.thief}"
        cells.setdefault(key, []).append(run.clone_accuracy)
        if run.extra:
            extras.setdefault(key, []).append(run.extra)
    clones = {key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "seeds": len(v),
                    "values": v} for key, v in cells.items()}
    means = {key: {name: float(np.mean([e[name] for e in v])) for name in v[0]}
             for key, v in extras.items()}
    return clones, means


def best_per_pool(clones: dict) -> dict[str, dict[str, dict]]:
    """``{defense: {pool: {"thief", "mean"}}}``: the best thief of each pool (the highest
    mean clone accuracy any thief measured there reaches)."""
    accuracies: dict[tuple[str, str], dict[str, float]] = {}
    for key, cell in clones.items():
        name, pool, thief = key.split("|")
        accuracies.setdefault((name, pool), {})[thief] = cell["mean"]
    best: dict[str, dict[str, dict]] = {}
    for (name, pool), values in accuracies.items():
        thief, mean = thieves.best_thief(values)
        best.setdefault(name, {})[pool] = {"thief": thief, "mean": mean}
    return best


def ownership_report(defender: Defender, runs: list[Run]) -> dict:
    """p-values of every clone of the keyed defense and of the innocent models, on each
    kind of verification images."""
    lab = defender.lab
    suspects: dict[str, tuple[str, nn.Module]] = {}
    for run in runs:
        if run.thief in DERIVED_THIEVES or run.defense not in (RECOMMENDED, "none"):
            continue
        model, _ = load_checkpoint(clone_path(lab, run.defense, run.pool, run.thief, run.seed))
        group = "accused" if run.defense == RECOMMENDED else "innocent"
        suspects[f"clone of {run.defense}: {run.pool} {run.thief} seed {run.seed}"] = (group,
                                                                                       model)
    for name, model in innocent_models(lab):
        suspects[name] = ("innocent", model)
    results: dict[str, dict] = {}
    for kind, images in verification_images(defender).items():
        gated = defender.gate_scores(images) < defender.knobs[RECOMMENDED]
        images = images[gated]
        clean = predict_probs(lab.victim, images)
        results[kind] = {"accused": {}, "innocent": {}}
        for name, (group, model) in suspects.items():
            results[kind][group][name] = ownership_p(defender, model, images, clean)
    return results


def _cell(report: dict, name: str, pool: str, thief: str) -> str:
    cell = report["clones"].get(f"{name}|{pool}|{thief}")
    if cell is None:
        return "–"
    return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"


def pool_table(report: dict, pool: str, defenses: tuple[str, ...]) -> list[str]:
    """Markdown lines: clone accuracy of every thief measured on ``pool``, one row per
    defense, and the best thief (the highest mean any thief reaches)."""
    measured = {key.split("|")[2] for key in report["clones"] if key.split("|")[1] == pool}
    names = [thief for thief in THIEVES if thief in measured]
    if not names:
        return []
    lines = [f"**{pool}**", "", "| defense | " + " | ".join(names) + " | best thief |",
             "| --- " * (len(names) + 2) + "|"]
    for name in defenses:
        best = report["best"].get(name, {}).get(pool)
        best_cell = f"{best['thief']} {100 * best['mean']:.1f}" if best else "–"
        lines.append(f"| {name} | " + " | ".join(_cell(report, name, pool, t) for t in names)
                     + f" | {best_cell} |")
    return [*lines, ""]


def markdown(report: dict) -> str:
    """The study's tables: defender cost and tells, clones per pool and thief, ownership."""
    lines = ["| defense | knob | defender acc. (test half) | drop | test L1 | animal L1 | "
             "animal flips | exact zeros | tell detector |", "| --- " * 9 + "|"]
    for name, row in report["defenses"].items():
        knob = report["knobs"].get(name, "")
        knob = f"{knob:.3f}" if isinstance(knob, float) else knob
        lines.append(f"| {name} | {knob} | {100 * row['defender_accuracy']:.2f} | "
                     f"{row['defender_drop']:.2f} | {row['test_l1']:.3f} | {row['pool_l1']:.3f} | "
                     f"{100 * row['pool_flips']:.1f}% | {100 * row['pool_exact_zeros']:.1f}% | "
                     f"{100 * row['tell_accuracy']:.1f}% |")
    lines += ["", "Share of each pool's queries the calibrated gates treat as OOD:", "",
              "| pool | msp (adaptive misinformation) | features (grad2_gated) |",
              "| --- | --- | --- |"]
    lines += [f"| {pool} | {100 * row['msp']:.1f}% | {100 * row['features']:.1f}% |"
              for pool, row in report["gated_share"].items()]
    lines += ["", "Clone accuracy (%, mean ± std over seeds) on the Fashion-MNIST test split:", ""]
    for pool in (*POOLS, *MIXED_POOLS):
        lines += pool_table(report, pool, STUDY_DEFENSES)
    for kind, groups in report["ownership"].items():
        lines += [f"Ownership on {kind} images (permutation test, 10,000 random mappings):",
                  "", "| model | group | follows σ | p |", "| --- | --- | --- | --- |"]
        for group, models in groups.items():
            for name, row in models.items():
                lines.append(f"| {name} | {group} | {100 * row['follows']:.1f}% | "
                             f"{row['p_value']:.2g} |")
        lines.append("")
    return "\n".join(lines) + "\n"


#: The goals of issue 17, in clone-accuracy points removed (mean of the OOD pools).
GOALS = {"soft": 15.0, "labels": 10.0, "arch": 10.0}
ADAPTIVE = ("prior", "recovery", "confidence")
RECOMMENDED = "grad2_gated_permute"


def effect(report: dict, name: str, pool: str, thief: str) -> float | None:
    """Points of clone accuracy ``name`` removes for ``thief`` on ``pool`` (vs ``none``)."""
    base = report["clones"].get(f"none|{pool}|{thief}")
    defended = report["clones"].get(f"{name}|{pool}|{thief}")
    if base is None or defended is None:
        return None
    return 100 * (base["mean"] - defended["mean"])


def goals_markdown(report: dict, name: str = RECOMMENDED) -> str:
    """The goals table for defense ``name``: each row measured, met or not."""
    def mean_effect(thief: str, pools: tuple[str, ...]) -> tuple[float, list[str]]:
        values = [(pool, effect(report, name, pool, thief)) for pool in pools]
        values = [(pool, value) for pool, value in values if value is not None]
        cells = [f"{pool} {value:+.1f}" for pool, value in values]
        return float(np.mean([value for _, value in values])), cells

    drop = report["defenses"][name]["defender_drop"]
    lines = [f"Defense `{name}`, defender drop {drop:.2f} points on the test half it was not "
             "calibrated on. Clone points removed (undefended minus defended, mean of 3 "
             "seeds, 4,000 queries):", "",
             "| thief, OOD pools | goal | measured | met |", "| --- | --- | --- | --- |"]
    for thief, goal in GOALS.items():
        pools = OOD_POOLS if thief != "arch" else (MAIN_POOL,)
        value, cells = mean_effect(thief, pools)
        lines.append(f"| {thief} | −{goal:g} | {value:+.1f} ({'; '.join(cells)}) | "
                     f"{'yes' if value >= goal else 'no'} |")
    soft = effect(report, name, MAIN_POOL, "soft") or 0.0
    for thief in ADAPTIVE:
        value = effect(report, name, MAIN_POOL, thief)
        if value is None:
            continue
        met = soft > 0 and value >= soft / 2
        lines.append(f"| {thief} ({MAIN_POOL}) | ≥ half the soft effect ({soft / 2:+.1f}) | "
                     f"{value:+.1f} | {'yes' if met else 'no'} |")
    for kind, groups in report["ownership"].items():
        accused, innocent = groups["accused"], groups["innocent"]
        worst = max(row["p_value"] for row in accused.values()) if accused else float("nan")
        lowest = min(row["p_value"] for row in innocent.values())
        caught = sum(row["p_value"] < 1e-3 for row in accused.values())
        lines.append(f"| ownership on {kind} images: every clone p < 1e-3 | all of "
                     f"{len(accused)} | {caught} (largest p {worst:.2g}) | "
                     f"{'yes' if caught == len(accused) else 'no'} |")
        lines.append(f"| ownership on {kind} images: no innocent below p 0.05 | "
                     f"{len(innocent)} models | smallest p {lowest:.2g} | "
                     f"{'yes' if lowest >= 0.05 else 'no'} |")
    for rival in ("adaptive_misinformation", "grad2", "grad2_gated_redirect"):
        if rival == name or rival not in report["defenses"]:
            continue
        rival_drop = report["defenses"][rival]["defender_drop"]
        ours, _ = mean_effect("soft", OOD_POOLS)
        theirs = float(np.mean([effect(report, rival, pool, "soft") or 0.0
                                for pool in OOD_POOLS]))
        ours_labels, _ = mean_effect("labels", OOD_POOLS)
        theirs_labels = float(np.mean([effect(report, rival, pool, "labels") or 0.0
                                       for pool in OOD_POOLS]))
        better = ours > theirs and ours_labels > theirs_labels and drop <= rival_drop + 0.25
        lines.append(f"| rival {rival} (drop {rival_drop:.2f}) | beaten at the same drop | "
                     f"soft {ours:+.1f} vs {theirs:+.1f}, labels {ours_labels:+.1f} vs "
                     f"{theirs_labels:+.1f} | {'yes' if better else 'no'} |")
    in_soft = effect(report, name, IN_DISTRIBUTION_POOL, "soft")
    in_labels = effect(report, name, IN_DISTRIBUTION_POOL, "labels")
    if in_soft is not None and in_labels is not None:
        lines.append(f"| in-distribution thief ({IN_DISTRIBUTION_POOL}) | reported | soft "
                     f"{in_soft:+.1f}, labels {in_labels:+.1f} | — |")
    return "\n".join(lines) + "\n"


#: Issue 23's goals: clone points the best thief must lose against the undefended soft
#: clone, per pool.
BEST_THIEF_GOALS = {"animal": 15.0, "mixed": 8.0, "fashion_transformed": 5.0}


def best_thief_markdown(report: dict, name: str = RECOMMENDED) -> str:
    """Per pool: the undefended soft clone, the best thief against ``none`` and against
    ``name``, and the points the defense takes from the best thief (issue 23's goals)."""
    lines = ["| pool | undefended soft | best thief, undefended | best thief, "
             f"{name} | points removed vs undefended soft | goal | met | points removed "
             "vs the best undefended thief |", "| --- " * 8 + "|"]
    for pool, goal in BEST_THIEF_GOALS.items():
        soft = report["clones"].get(f"none|{pool}|soft")
        plain = report["best"].get("none", {}).get(pool)
        defended = report["best"].get(name, {}).get(pool)
        if soft is None or defended is None:
            continue
        removed = 100 * (soft["mean"] - defended["mean"])
        plain_cell = f"{plain['thief']} {100 * plain['mean']:.1f}" if plain else "–"
        best_removed = f"{100 * (plain['mean'] - defended['mean']):+.1f}" if plain else "–"
        lines.append(f"| {pool} | {100 * soft['mean']:.1f} | {plain_cell} | "
                     f"{defended['thief']} {100 * defended['mean']:.1f} | {removed:+.1f} | "
                     f"−{goal:g} | {'yes' if removed >= goal else 'no'} | {best_removed} |")
    return "\n".join(lines) + "\n"


def run_thief_study(out: Path, folder: Path, defenses: tuple[str, ...] = ("none", RECOMMENDED),
                    pools: tuple[str, ...] = THIEF_POOLS,
                    trained: tuple[str, ...] = (*MAIN_THIEVES, *ANSWER_THIEVES),
                    seeds: tuple[int, ...] = (0,), progress: bool = True) -> dict:
    """Issue 23's thieves on ``pools`` against ``defenses`` (journal ``thieves_runs.jsonl``
    in ``out``): writes ``thieves.json`` and ``thieves.md`` with the best thief per pool."""
    out.mkdir(parents=True, exist_ok=True)
    lab = Lab(folder, progress=progress)
    defender = Defender(lab, progress, names=defenses)
    jobs = thief_plan(defenses, pools, trained, seeds)
    runs = [run for run in train_planned(defender, jobs, out / "thieves_runs.jsonl", progress)
            if run.defense in defenses and run.pool in pools and run.seed in seeds]
    clones, extras = clone_cells(runs)
    report = {"defenses": list(defenses), "pools": list(pools), "seeds": list(seeds),
              "knobs": {name: defender.knobs.get(name) for name in defenses},
              "mapping": defender.mapping.tolist(),
              "gated_share": {pool: defender.gated_share(to_tensor(pool_images(pool)))
                              for pool in (*pools, OWN_POOL)},
              "clones": clones, "extras": extras, "best": best_per_pool(clones)}
    (out / "thieves.json").write_text(json.dumps(report, indent=1))
    (out / "thieves.md").write_text(thieves_markdown(report))
    return report


def thieves_markdown(report: dict) -> str:
    """The best-thief goals table, each pool's thieves and the thieves' own figures."""
    lines = [best_thief_markdown(report), "Clone accuracy (%, mean ± std over seeds "
             f"{', '.join(map(str, report['seeds']))}) on the Fashion-MNIST test split:", ""]
    for pool in report["pools"]:
        lines += pool_table(report, pool, tuple(report["defenses"]))
    lines += ["Share of each pool the feature gate treats as OOD: " + ", ".join(
        f"{pool} {100 * share:.1f}%" for pool, share in report["gated_share"].items()), "",
        "What the thieves saw (means over seeds):", "", "| defense, pool, thief | figures |",
        "| --- | --- |"]
    lines += [f"| {key.replace('|', ', ')} | " + ", ".join(f"{k} {v:.3g}" for k, v in row.items())
              + " |" for key, row in report["extras"].items()]
    return "\n".join(lines) + "\n"


def plot_study(report: dict, path: Path) -> None:
    """Clone accuracy per pool, soft and labels-only thieves, one bar per defense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    width = 0.8 / len(STUDY_DEFENSES)
    for axis, thief in zip(axes, POOL_THIEVES, strict=True):
        for index, name in enumerate(STUDY_DEFENSES):
            cells = [report["clones"].get(f"{name}|{pool}|{thief}") for pool in POOLS]
            means = [100 * c["mean"] if c else 0 for c in cells]
            errors = [100 * c["std"] if c else 0 for c in cells]
            offset = (index - len(STUDY_DEFENSES) / 2 + 0.5) * width
            positions = [p + offset for p in range(len(POOLS))]
            axis.bar(positions, means, width, yerr=errors, label=name, capsize=2)
        axis.set_xticks(range(len(POOLS)), list(POOLS), rotation=15, fontsize=8)
        axis.set_title(f"{thief} thief, 4,000 queries")
    axes[0].set_ylabel("clone accuracy on Fashion-MNIST test (%)")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _study_command(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    folder = args.folder or cache_dir() / "eval"
    if args.thieves:
        report = run_thief_study(args.out, folder, tuple(args.defenses), tuple(args.pools),
                                 tuple(args.trained), tuple(args.seeds))
        print(thieves_markdown(report))
        return 0
    report = run_study(args.out, folder, quick=args.quick)
    print(goals_markdown(report) + "\n" + markdown(report))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ood-study", help="gated defenses fitted on defender data vs every thief",
        description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/ood"))
    parser.add_argument("--folder", type=Path, default=None,
                        help="models and answers cache (default: GRAD2_CACHE/eval)")
    parser.add_argument("--quick", action="store_true", help="one seed")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, one per core)")
    parser.add_argument("--thieves", action="store_true",
                        help="only issue 23's thieves (best thief per pool) on --pools "
                             "against --defenses, --seeds")
    parser.add_argument("--defenses", nargs="+", default=["none", RECOMMENDED],
                        choices=STUDY_DEFENSES)
    parser.add_argument("--pools", nargs="+", default=list(THIEF_POOLS),
                        choices=[*POOLS, *MIXED_POOLS])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--trained", nargs="+", default=[*MAIN_THIEVES, *ANSWER_THIEVES],
                        choices=[*MAIN_THIEVES, *ANSWER_THIEVES],
                        help="with --thieves: the thieves to train (prior and fixer come "
                             "with soft)")
    parser.set_defaults(func=_study_command)
