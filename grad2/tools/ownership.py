"""``grad2 verify --archive A.mar --suspect MODEL.pt|URL --images DIR``: does a suspect model
follow this archive's redirection?

On each image the archive's defense sends mass to a *receiving* class ``r(x)`` (the
class with the highest redirection score). Summarised per clean top class ``k``, that is
a mapping ``σ(k)`` (the most frequent receiver of images whose top class is ``k``); a
clone trained on defended answers learns to put images of top class ``k`` in ``σ(k)``
more often than a model that never saw the answers. The statistic ``T(σ)`` is the share
of images (those with ``σ(k) ≠ k``) on which the suspect's top class is ``σ(k)``. Its
null distribution is ``T`` for ``draws`` random mappings without fixed points (each
``σ'(k)`` uniform over the other classes): the p-value ``(1 + #{T(σ') ≥ T(σ)}) / (1 +
draws)`` needs no distributional assumption. A model that predicts the clean (or true)
class follows no mapping without fixed points, so it is not accused; a clone is, when it
learned ``σ``. A mapping that matches the classes' natural confusions would accuse
honest models too: a keyed random mapping avoids that.

For a keyed defense (``grad2_gated`` with ``ood_answer: permute``) the receiving class of
an image the gate treats as OOD (``α ≥ ½``) is ``σ(k)`` for the secret mapping ``σ`` of
the archive's ``mapping_key``; images the gate lets through are not informative.

Use fresh images of the kind thieves send (out of the victim's distribution), never the
ones a target or gate was fitted on.

A URL suspect is queried with the lab's HTTP client (:mod:`grad2.lab.attack`, the ``lab``
extra); a checkpoint suspect needs only the library. The watermark test of the research
(``--secret``) is ``grad2 watermark verify``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from grad2.serve import clean_probabilities, open_archive
from grad2.tools.images import open_images


@dataclass
class Verdict:
    images: int
    informative: int  # images whose receiving class differs from the clean top class
    follows_receiver: float  # T(σ): share of informative images the suspect puts in σ(k)
    null_mean: float
    null_p95: float
    p_value: float
    draws: int

    def summary(self, alpha: float = 1e-3) -> str:
        verdict = "follows this archive's redirection" if self.p_value < alpha else (
            "no evidence it follows this archive's redirection")
        return (f"suspect puts {100 * self.follows_receiver:.1f}% of {self.informative} "
                f"informative images in the defense's receiving class (random mappings: "
                f"{100 * self.null_mean:.1f}% on average, 95th percentile "
                f"{100 * self.null_p95:.1f}%); permutation p = {self.p_value:.2g} -> "
                f"{verdict} (alpha {alpha:g})")


def receiving_classes(archive: Path, images: Path, progress: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor, list[Path] | None, object]:
    """Per image of ``images``: the clean top class and the receiving class of the
    archive's defense (``[N]`` each), the files (for a URL suspect) and the image set."""
    with open_archive(Path(archive)) as opened:
        served = opened.load()
        defense = served.defense
        if not hasattr(defense, "scores"):
            raise ValueError(f"{archive} serves {served.defense_config.method}, which has no "
                             "redirection scores; verify needs a grad2 or random archive")
        image_set = open_images(Path(images), served.input_config)
        tops, receivers, kept = [], [], []
        for x, _, indices in image_set.batches(256, progress=progress, desc="receivers"):
            clean = clean_probabilities(served.victim, x, None)
            top = clean.argmax(1)
            if getattr(defense, "mapping", None) is not None:
                gated = defense.gate_weights(x, clean) >= 0.5
                receiver = torch.where(gated, defense.mapping[top], top)
            else:
                with torch.enable_grad():
                    receiver = defense.scores(x, clean).argmax(1)
            tops.append(top)
            receivers.append(receiver)
            kept.append(indices)
        order = torch.cat(kept)
        files = None if image_set.files is None else [image_set.files[i] for i in order]
        return torch.cat(tops), torch.cat(receivers), files, image_set


def class_mapping(clean_top: np.ndarray, receivers: np.ndarray, num_classes: int
                  ) -> np.ndarray:
    """``σ`` ``[K]``: per clean top class, its most frequent receiving class (ties: the
    lowest), ``-1`` for a class no image has as its top."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (clean_top, receivers), 1)
    mapping = counts.argmax(axis=1)
    mapping[counts.sum(axis=1) == 0] = -1
    return mapping


def permutation_test(suspect_top: np.ndarray, clean_top: np.ndarray, receivers: np.ndarray,
                     num_classes: int, draws: int = 10_000, seed: int = 0) -> Verdict:
    """The statistic and its permutation p-value (see the module docstring)."""
    mapping = class_mapping(clean_top, receivers, num_classes)
    mapped = mapping[clean_top]
    informative = mapped != clean_top
    if not informative.any():
        raise ValueError("the defense moves no image to another class than its top one: "
                         "nothing to test (raise epsilon, or use out-of-distribution images)")
    suspect_top, tops = suspect_top[informative], clean_top[informative]
    observed = float((suspect_top == mapped[informative]).mean())
    rng = np.random.default_rng(seed)
    offsets = rng.integers(1, num_classes, (draws, num_classes))
    random_mappings = (np.arange(num_classes) + offsets) % num_classes  # no fixed points
    null = (random_mappings[:, tops] == suspect_top[None, :]).mean(axis=1)
    p_value = (1 + int((null >= observed).sum())) / (1 + draws)
    return Verdict(images=len(clean_top), informative=int(informative.sum()),
                   follows_receiver=observed, null_mean=float(null.mean()),
                   null_p95=float(np.quantile(null, 0.95)), p_value=p_value, draws=draws)


def verify_suspect(archive: Path, suspect: str, images: Path, token: str | None = None,
                   draws: int = 10_000, seed: int = 0, progress: bool = True) -> Verdict:
    """Test ``suspect`` (a checkpoint path or a prediction URL) on ``images``."""
    clean_top, receivers, files, image_set = receiving_classes(archive, images, progress)
    num_classes = int(max(clean_top.max(), receivers.max())) + 1
    if str(suspect).startswith(("http://", "https://")):
        from grad2.lab.attack import APIClient

        if files is None:
            raise ValueError("a URL suspect needs a folder of image files, not an .npz")
        answers, answered, class_names, _ = APIClient(suspect, token).query_bodies(
            [path.read_bytes() for path in files], progress=progress)
        num_classes = max(num_classes, len(class_names))
        suspect_top = np.full(len(files), -1)
        suspect_top[answered] = answers.argmax(1).numpy()
    else:
        from grad2.models import load_checkpoint

        model, _ = load_checkpoint(Path(suspect))
        tops = []
        with torch.inference_mode():
            for x, _, _ in image_set.batches(256, progress=False):
                tops.append(model.eval()(x).argmax(1))
        suspect_top = torch.cat(tops).numpy()
    return permutation_test(suspect_top, clean_top.numpy(), receivers.numpy(), num_classes,
                            draws, seed)


def write_verdict(verdict: Verdict, path: Path) -> None:
    path.write_text(json.dumps(asdict(verdict), indent=1))


def _verify_command(args: argparse.Namespace) -> int:
    token = None
    if args.token_file is not None:
        from grad2.lab.attack import read_token

        token = read_token(args.token_file)
    verdict = verify_suspect(args.archive, args.suspect, args.images, token, draws=args.draws)
    print(verdict.summary())
    if args.out is not None:
        write_verdict(verdict, args.out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    verify = subparsers.add_parser(
        "verify", help="test whether a suspect follows an archive's redirection")
    verify.add_argument("--archive", type=Path, required=True,
                        help="the served model version whose redirection is looked for")
    verify.add_argument("--suspect", required=True,
                        help="a checkpoint (.pt) or a prediction URL")
    verify.add_argument("--images", type=Path, required=True,
                        help="fresh images of the kind thieves send (a folder, searched "
                             "recursively)")
    verify.add_argument("--draws", type=int, default=10_000,
                        help="random class relabellings of the permutation test")
    verify.add_argument("--token-file", type=Path,
                        help="TorchServe's key_file.json, for a URL suspect")
    verify.add_argument("--out", type=Path, help="write the verdict as JSON here")
    verify.set_defaults(func=_verify_command)
