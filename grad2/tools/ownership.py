"""``grad2 verify --archive A.mar --suspect MODEL.pt|URL --images DIR [--reference R.pt ...]``:
does a suspect model follow this archive's answers where they differ from the victim's?

**Which images are tested: the ones this archive moves.** An image is *moved* when the
archive's answer puts it in another class than the victim's clean top class; that class is
its *receiving class* ``r``:

- keyed archives (``grad2_gated`` with ``ood_answer: permute``): the gate flags the image
  (``α ≥ ½``; the answer is then mostly the clean vector relabelled by the secret mapping
  ``σ``) and ``r = σ(clean top)``;
- every other archive: the archive's own answer has another top-1 class than the victim;
  ``r`` is that top-1 class.

Only moved images are tested, whatever share of each class they are. A clone trained on the
archive's answers learns ``r`` on images like the moved ones; an innocent model puts a moved
image in ``r`` only by sharing the victim's confusions. Images the archive does not move
say nothing. Before any query to the suspect, ``verify`` refuses when fewer than
``min_moved`` images are moved, and says how many are and what to use instead: images the
archive treats as out of distribution (fresh natural images of another kind than the
training data, or the defender's own training images rotated, cropped or inverted).

**Statistic:** ``S``, the number of moved images the suspect puts in their receiving class.

**Null for innocent models that share the victim's confusions.** Two p-values, the verdict
takes the larger (a test that is valid when either null model holds):

- ``p_model``: per moved image ``i`` an innocent model's chance ``q_i`` of putting it in
  ``r_i``: the victim's clean probability of ``r_i``, averaged with the reference models'
  probabilities when there are some. ``p_model = P(S' ≥ S)`` for ``S'`` Poisson-binomial
  (independent Bernoulli ``q_i``): exact for a model that draws its answers from those
  probabilities. It ignores that one model's mistakes are correlated across images (a
  model that confuses two classes does so on many images), so alone it accuses real
  innocents far more often than its level says (docs/results.md): without reference models
  ``verify`` prints the figures and no verdict.
- ``p_reference`` (with ``--reference``): ``R`` models the defender trained itself, none of
  which saw the archive's answers (models trained on its own labelled training data with
  other seeds and subsets: ``grad2 train-victim --seed N``; distilled copies of the
  undefended victim: ``grad2 train-surrogate --archive undefended.mar --seed N``). Their
  counts ``S_1..S_R`` on the same moved images are the innocent population's; ``p_reference``
  is the one-sided prediction test ``P(t_{R−1} ≥ (S − mean) / (sd √(1 + 1/R)))``, exact
  when innocents' counts are normal and the suspect is exchangeable with the references.
  It measures the spread between models that ``p_model`` misses.

``random_mapping_p`` (reported, not the verdict): ``S`` against random class mappings
without fixed points (``draws`` of them): exact over the draw of a secret key, but not for
the one key an archive has (a key whose mapping follows natural confusions accuses every
innocent), which is why the verdict does not use it.

A URL suspect is queried with the lab's HTTP client (:mod:`grad2.lab.attack`, the ``lab``
extra), on the moved images only; a checkpoint suspect needs only the library. The
watermark test of the research (``--secret``) is ``grad2 watermark verify``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from grad2.serve import clean_probabilities, open_archive
from grad2.tools.images import ImageSet, open_images

#: Fewest moved images ``verify`` tests (``--min-moved``).
MIN_MOVED = 100
#: Fewest reference models ``p_reference`` is computed from.
MIN_REFERENCES = 3
#: What makes an image moved, by kind of archive.
MOVED_RULES = {
    "gate": "the gate flags it (alpha >= 1/2) and the secret mapping relabels its answer",
    "answer": "the archive's answer has another top-1 class than the victim's",
}
#: Trials per block of the Poisson-binomial's exact recursion.
_BLOCK = 64


class TooFewMovedError(ValueError):
    """The verification images hold too few images the archive moves."""


@dataclass
class Moved:
    """The images an archive moves, out of a verification set of ``images``.

    ``positions`` ``[M]``: their positions in the set; ``clean_top``, ``receivers`` ``[M]``
    the victim's top class and the receiving class; ``victim_probability`` ``[M]`` the
    victim's clean probability of the receiving class."""

    images: int
    rule: str
    positions: np.ndarray
    clean_top: np.ndarray
    receivers: np.ndarray
    victim_probability: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)


@dataclass
class Verdict:
    images: int
    informative: int  # moved images (the ones tested)
    rule: str  # what made an image moved
    follows: int  # S: moved images the suspect puts in their receiving class
    follows_receiver: float  # S / informative
    null_mean: float  # an innocent's expected share under p_model's null (mean q)
    p_model: float
    references: int
    reference_mean: float | None  # the references' mean share
    reference_sd: float | None
    p_reference: float | None
    p_value: float  # max(p_model, p_reference); p_model alone without references
    random_mapping_p: float | None  # not calibrated for a fixed key (module docstring)
    draws: int

    @property
    def calibrated(self) -> bool:
        """Whether :attr:`p_value` holds for innocent models that share the victim's
        confusions (it does with reference models; ``p_model`` alone does not)."""
        return self.p_reference is not None

    def summary(self, alpha: float = 1e-3) -> str:
        lines = [f"moved images: {self.informative} of {self.images} ({self.rule})",
                 f"suspect puts {100 * self.follows_receiver:.1f}% of them in their receiving "
                 f"class; the probabilities expect {100 * self.null_mean:.1f}% "
                 f"(p_model = {self.p_model:.2g})"]
        if self.p_reference is not None:
            lines.append(f"{self.references} reference models: {100 * self.reference_mean:.1f}"
                         f"% +- {100 * self.reference_sd:.1f} (p_reference = "
                         f"{self.p_reference:.2g})")
        if self.random_mapping_p is not None:
            lines.append(f"random-mapping permutation p = {self.random_mapping_p:.2g} over "
                         f"{self.draws} draws (valid over the key's draw only, not the verdict)")
        if not self.calibrated:
            lines.append(f"p = {self.p_value:.2g}: no verdict without reference models (p_model "
                         "is exact only for a model that draws its answers from the victim's "
                         "probabilities; real innocent models share confusions more); pass "
                         f">= {MIN_REFERENCES} --reference checkpoints")
            return "\n".join(lines)
        verdict = "follows this archive's answers" if self.p_value < alpha else (
            "no evidence it follows this archive's answers")
        lines.append(f"p = {self.p_value:.2g} -> {verdict} (alpha {alpha:g})")
        return "\n".join(lines)


@dataclass
class PermutationVerdict:
    images: int
    informative: int  # images whose receiving class differs from the clean top class
    follows_receiver: float  # share of informative images the suspect puts in their receiver
    null_mean: float
    null_p95: float
    p_value: float
    draws: int


# ---------------------------------------------------------------- which images are moved


def moved_rows(defense: object, x: Tensor, clean: Tensor) -> tuple[Tensor, Tensor, str]:
    """``(moved [B] bool, receivers [B] int64, rule)`` of a defense on inputs ``x`` with
    clean probabilities ``clean [B, K]`` (module docstring; ``rule`` a key of
    :data:`MOVED_RULES`). Receivers of unmoved rows are their clean top class."""
    top = clean.argmax(1)
    mapping = getattr(defense, "mapping", None)
    if mapping is not None:
        moved = defense.gate_weights(x, clean) >= 0.5
        return moved, torch.where(moved, mapping[top], top), "gate"
    with torch.enable_grad():
        answers = defense(x, clean)
    receivers = answers.argmax(1)
    return receivers != top, receivers, "answer"


def moved_images(defense: object, victim: torch.nn.Module, image_set: ImageSet,
                 progress: bool = True) -> Moved:
    """The images of ``image_set`` that ``defense`` (over ``victim``) moves."""
    positions, tops, receivers, probabilities, rule = [], [], [], [], "answer"
    for x, _, indices in image_set.batches(256, progress=progress, desc="moved images"):
        clean = clean_probabilities(victim, x, None)
        moved, receiver, rule = moved_rows(defense, x, clean)
        positions.append(indices[moved])
        tops.append(clean.argmax(1)[moved])
        receivers.append(receiver[moved])
        probabilities.append(clean[moved].gather(1, receiver[moved, None]).squeeze(1))

    def joined(parts: list[Tensor], dtype: type) -> np.ndarray:
        return torch.cat(parts).numpy().astype(dtype) if parts else np.zeros(0, dtype)

    return Moved(len(image_set), MOVED_RULES[rule], joined(positions, np.int64),
                 joined(tops, np.int64), joined(receivers, np.int64),
                 joined(probabilities, np.float64))


def check_moved(moved: int, images: int, minimum: int, rule: str) -> None:
    """Raise :class:`TooFewMovedError` naming the counts when ``moved < minimum``."""
    if moved >= minimum:
        return
    raise TooFewMovedError(
        f"{moved} of {images} images are moved by this archive ({rule}); need >= {minimum}. "
        "verify tests only the images the archive answers with another class than the "
        "victim's: use images it treats as out of distribution, for example fresh natural "
        "images of another kind than its training data, or your own training images "
        "rotated and cropped or inverted with noise (in-distribution images are not moved). "
        "More images of that kind give more moved ones.")


# ---------------------------------------------------------------------- the statistics


def poisson_binomial_sf(probabilities: np.ndarray, count: int) -> float:
    """``P(S ≥ count)`` for ``S`` the number of successes of independent Bernoulli trials
    with success probabilities ``probabilities [N]``: the exact distribution of blocks of
    :data:`_BLOCK` trials by recursion (all blocks at once), convolved by FFT."""
    q = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    size = len(q)
    if count <= 0:
        return 1.0
    if count > size:
        return 0.0
    blocks = np.zeros(-(-size // _BLOCK) * _BLOCK)
    blocks[:size] = q  # padding trials never succeed
    blocks = blocks.reshape(-1, _BLOCK)  # [B, _BLOCK]
    pmf = np.zeros((len(blocks), _BLOCK + 1))
    pmf[:, 0] = 1.0
    for column in blocks.T:  # one trial of every block per step
        pmf[:, 1:] = pmf[:, 1:] * (1 - column[:, None]) + pmf[:, :-1] * column[:, None]
        pmf[:, 0] *= 1 - column
    length = blocks.size + 1
    whole = np.fft.irfft(np.fft.rfft(pmf, n=length, axis=1).prod(axis=0), n=length)
    return float(np.clip(whole[count:size + 1].clip(0).sum(), 0.0, 1.0))


def student_t_sf(t: float, dof: int) -> float:
    """``P(T ≥ t)`` for Student's ``T`` with an integer ``dof ≥ 1`` (the closed form for
    integer degrees of freedom, Abramowitz and Stegun 26.7.3-4)."""
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    theta = math.atan(abs(t) / math.sqrt(dof))
    cos2, sin = math.cos(theta) ** 2, math.sin(theta)
    if dof % 2:  # odd
        term, total = math.cos(theta), 0.0
        for k in range(1, (dof - 1) // 2 + 1):
            total += term
            term *= cos2 * (2 * k) / (2 * k + 1)
        inside = 2 / math.pi * (theta + sin * total)
    else:
        term, total = 1.0, 0.0
        for k in range(1, dof // 2 + 1):
            total += term
            term *= cos2 * (2 * k - 1) / (2 * k)
        inside = sin * total
    tail = max(0.0, (1 - inside) / 2)
    return tail if t >= 0 else 1 - tail


def reference_p(count: int, reference_counts: Sequence[int]) -> float:
    """One-sided prediction test of a suspect's ``count`` against the counts of ``R ≥``
    :data:`MIN_REFERENCES` reference models: ``P(t_{R−1} ≥ (count − mean) / (sd √(1 +
    1/R)))``; ``sd`` is at least one image (references that all agree)."""
    counts = np.asarray(reference_counts, dtype=np.float64)
    if len(counts) < MIN_REFERENCES:
        raise ValueError(f"p_reference needs >= {MIN_REFERENCES} reference models, got "
                         f"{len(counts)}")
    spread = max(float(counts.std(ddof=1)), 1.0) * math.sqrt(1 + 1 / len(counts))
    return student_t_sf((count - counts.mean()) / spread, len(counts) - 1)


def random_mapping_p(suspect_top: np.ndarray, clean_top: np.ndarray, receivers: np.ndarray,
                     num_classes: int, draws: int = 10_000, seed: int = 0
                     ) -> PermutationVerdict:
    """The share of informative images (``receivers ≠ clean_top``) the suspect puts in
    their receiver, against ``draws`` random class mappings without fixed points applied
    to the clean top class: ``(1 + #{T(σ') ≥ T}) / (1 + draws)`` (exact over the key's
    draw, not for a fixed key: see the module docstring)."""
    informative = receivers != clean_top
    if not informative.any():
        raise TooFewMovedError("the defense moves no image to another class than its top one: "
                          "nothing to test (use out-of-distribution images)")
    suspect_top, tops = suspect_top[informative], clean_top[informative]
    observed = float((suspect_top == receivers[informative]).mean())
    rng = np.random.default_rng(seed)
    offsets = rng.integers(1, num_classes, (draws, num_classes))
    random_mappings = (np.arange(num_classes) + offsets) % num_classes  # no fixed points
    null = (random_mappings[:, tops] == suspect_top[None, :]).mean(axis=1)
    p_value = (1 + int((null >= observed).sum())) / (1 + draws)
    return PermutationVerdict(
        images=len(clean_top), informative=int(informative.sum()), follows_receiver=observed,
        null_mean=float(null.mean()), null_p95=float(np.quantile(null, 0.95)),
        p_value=p_value, draws=draws)


#: The name the lab's study imports.
permutation_test = random_mapping_p


def ownership_test(suspect_top: np.ndarray, moved: Moved,
                   reference_probabilities: np.ndarray | None = None,
                   num_classes: int | None = None, draws: int = 10_000, seed: int = 0
                   ) -> Verdict:
    """The verdict on a suspect's top classes ``suspect_top [M]`` on the moved images,
    with the reference models' probabilities ``[R, M, K]`` (or ``None``)."""
    receivers = moved.receivers
    follows = int((suspect_top == receivers).sum())
    q = moved.victim_probability
    references, mean, sd, p_ref = 0, None, None, None
    if reference_probabilities is not None and len(reference_probabilities):
        picked = np.take_along_axis(reference_probabilities, receivers[None, :, None],
                                    axis=2)[..., 0]  # [R, M]
        q = (q + picked.sum(0)) / (1 + len(picked))
        counts = (reference_probabilities.argmax(2) == receivers[None, :]).sum(1)
        references = len(counts)
        mean, sd = counts.mean() / len(moved), counts.std(ddof=1) / len(moved)
        p_ref = reference_p(follows, counts)
    p_model = poisson_binomial_sf(q, follows)
    classes = num_classes or int(max(moved.clean_top.max(), receivers.max())) + 1
    random_p = random_mapping_p(suspect_top, moved.clean_top, receivers, classes, draws,
                                seed).p_value if draws else None
    return Verdict(
        images=moved.images, informative=len(moved), rule=moved.rule, follows=follows,
        follows_receiver=follows / len(moved), null_mean=float(q.mean()), p_model=p_model,
        references=references, reference_mean=None if mean is None else float(mean),
        reference_sd=None if sd is None else float(sd), p_reference=p_ref,
        p_value=max(p_model, p_ref if p_ref is not None else 0.0), random_mapping_p=random_p,
        draws=draws)


# ------------------------------------------------------------------------ the suspects


def model_probabilities(path: Path, image_set: ImageSet) -> np.ndarray:
    """``[N, K]`` softmax probabilities of a checkpoint on every image of ``image_set``."""
    from grad2.models import load_checkpoint

    model, _ = load_checkpoint(Path(path))
    with torch.inference_mode():
        parts = [model.eval()(x).softmax(1) for x, _, _ in image_set.batches(256, False)]
    return torch.cat(parts).double().numpy()


def url_top_classes(url: str, image_set: ImageSet, token: str | None, progress: bool
                    ) -> tuple[np.ndarray, int]:
    """``([N], K)``: a prediction URL's top class per image (``-1`` if unanswered)."""
    from grad2.lab.attack import APIClient

    if image_set.files is None:
        raise ValueError("a URL suspect needs a folder of image files, not an .npz")
    answers, answered, class_names, _ = APIClient(url, token).query_bodies(
        [path.read_bytes() for path in image_set.files], progress=progress)
    top = np.full(len(image_set.files), -1)
    top[answered] = answers.argmax(1).numpy()
    return top, len(class_names)


def verify_suspect(archive: Path, suspect: str, images: Path, token: str | None = None,
                   draws: int = 10_000, seed: int = 0, progress: bool = True,
                   references: Sequence[Path] = (), min_moved: int = MIN_MOVED) -> Verdict:
    """Test ``suspect`` (a checkpoint path or a prediction URL) on the images of ``images``
    the archive moves, against the reference checkpoints ``references``. Raises
    :class:`TooFewMovedError` before any query when fewer than ``min_moved`` are moved."""
    if 0 < len(references) < MIN_REFERENCES:
        raise ValueError(f"--reference needs >= {MIN_REFERENCES} models, got "
                         f"{len(references)}")
    with open_archive(Path(archive)) as opened:
        served = opened.load()
        image_set = open_images(Path(images), served.input_config)
        moved = moved_images(served.defense, served.victim, image_set, progress)
    check_moved(len(moved), moved.images, min_moved, moved.rule)
    tested = image_set.subset(moved.positions)
    reference_probabilities = (np.stack([model_probabilities(path, tested)
                                         for path in references]) if references else None)
    num_classes = None
    if str(suspect).startswith(("http://", "https://")):
        suspect_top, num_classes = url_top_classes(suspect, tested, token, progress)
    else:
        suspect_top = model_probabilities(Path(suspect), tested).argmax(1)
    return ownership_test(suspect_top, moved, reference_probabilities, num_classes, draws,
                          seed)


def write_verdict(verdict: Verdict, path: Path) -> None:
    path.write_text(json.dumps(asdict(verdict), indent=1))


def _verify_command(args: argparse.Namespace) -> int:
    token = None
    if args.token_file is not None:
        from grad2.lab.attack import read_token

        token = read_token(args.token_file)
    verdict = verify_suspect(args.archive, args.suspect, args.images, token, draws=args.draws,
                             references=args.reference, min_moved=args.min_moved)
    print(verdict.summary())
    if args.out is not None:
        write_verdict(verdict, args.out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    verify = subparsers.add_parser(
        "verify", help="test whether a suspect follows an archive's answers",
        description="Test whether a suspect model follows this archive's answers on the "
                    "images the archive moves (answers with another class than the victim's: "
                    "for a keyed grad2_gated archive, the images its gate flags). Use images "
                    "the archive treats as out of distribution and that nothing was fitted "
                    "on: fresh natural images of another kind than the training data, or "
                    "your own training images rotated and cropped or inverted with noise. "
                    "Pass >= 3 reference models (trained by you, never on this archive's "
                    "answers) for a null that holds for innocent models sharing the "
                    "victim's confusions.")
    verify.add_argument("--archive", type=Path, required=True,
                        help="the served model version whose answers are looked for")
    verify.add_argument("--suspect", required=True,
                        help="a checkpoint (.pt) or a prediction URL")
    verify.add_argument("--images", type=Path, required=True,
                        help="verification images the archive moves: out of distribution, "
                             "never used for fitting (a folder, searched recursively, or an "
                             ".npz)")
    verify.add_argument("--reference", type=Path, nargs="+", default=[],
                        help=f">= {MIN_REFERENCES} checkpoints of innocent models you trained "
                             "(grad2 train-victim --seed N on your training data; grad2 "
                             "train-surrogate on the undefended archive)")
    verify.add_argument("--min-moved", type=int, default=MIN_MOVED,
                        help=f"refuse with fewer moved images (default {MIN_MOVED})")
    verify.add_argument("--draws", type=int, default=10_000,
                        help="random class mappings of the reported (not decisive) "
                             "random-mapping test; 0 skips it")
    verify.add_argument("--token-file", type=Path,
                        help="TorchServe's key_file.json, for a URL suspect")
    verify.add_argument("--out", type=Path, help="write the verdict as JSON here")
    verify.set_defaults(func=_verify_command)
