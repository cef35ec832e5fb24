"""``grad2 gate``: fit the feature gate of a ``grad2_gated`` model version.

``grad2 gate --archive A.mar --images TRAIN_DIR --validation VAL_DIR --out gate.pt``
reads the archive's surrogate and victim, fits class means and a shared precision of the
surrogate's penultimate features on ``--images`` (the defender's own labelled training
images; an unlabelled folder is labelled by the victim), and calibrates the threshold on
``--validation`` (in-distribution images the fit never saw) so that ``--flag-share`` of
them count as OOD. It prints the ``defense:`` keys to set; pack the file with
``grad2 archive --gate-file gate.pt``. Never fit or calibrate on a thief's queries.

``grad2 keygen --out K --archive A.mar --images OOD_DIR --validation VAL_DIR`` writes a
secret mapping key whose class mapping passes :mod:`grad2.tools.keys`'s criterion on the
defender's own images (OOD images it chooses, such as transformed training images, and
in-distribution ones); without ``--archive`` it draws a plain key and warns that the
effect then depends on the draw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from grad2 import gate
from grad2.models import penultimate

#: The slope in validation standard deviations of the score (see ``grad2 ood-study``).
SLOPE_SPREADS = 20.0


def fit_gate_files(archive: Path, images: Path, validation: Path, out: Path,
                   flag_share: float = 0.01, progress: bool = True) -> dict:
    """Fit, calibrate and write the gate file; returns the ``defense:`` keys to set."""
    from grad2.serve import clean_probabilities, open_archive
    from grad2.tools.images import open_images

    with open_archive(archive) as opened:
        served = opened.load()
        if served.surrogate is None:
            raise ValueError(f"{archive} has no surrogate; the feature gate reads the "
                             "surrogate's features (archive a grad2 version first)")
        num_classes = len(served.class_names)

        def features_of(folder: Path, need_labels: bool) -> tuple[torch.Tensor, torch.Tensor]:
            image_set = open_images(folder, served.input_config)
            features, labels = [], []
            for x, batch_labels, _ in image_set.batches(256, progress=progress,
                                                        desc=folder.name):
                features.append(penultimate(served.surrogate, x))
                if need_labels:
                    if batch_labels is None:
                        batch_labels = clean_probabilities(served.victim, x, None).argmax(1)
                    labels.append(batch_labels)
            if not features:
                raise ValueError(f"{folder}: no decodable images")
            return torch.cat(features), torch.cat(labels) if labels else torch.empty(0)

        train_features, train_labels = features_of(images, True)
        gate_tensors = gate.fit_feature_gate(train_features, train_labels.long(), num_classes)
        missing = gate.feature_gate_classes(train_labels, num_classes)
        if missing:
            print(f"warning: {len(missing)} classes have fewer than 2 images in {images} and "
                  f"no mean in the gate: {', '.join(served.class_names[k] for k in missing)}; "
                  "their images will look OOD")
        validation_features, _ = features_of(validation, False)
    scores = gate.feature_score(validation_features, gate_tensors)
    threshold = gate.calibrate_threshold(scores, flag_share)
    slope = SLOPE_SPREADS / scores.std().clamp_min(1e-12).item()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(gate_tensors, out)
    keys = {"gate_score": "features", "gate_file": out.name,
            "gate_threshold": round(threshold, 4), "gate_slope": float(f"{slope:.6g}")}
    out.with_suffix(".json").write_text(json.dumps(
        {**keys, "fit_images": len(train_features), "validation_images": len(scores),
         "flag_share": flag_share, "classes_without_mean": missing}, indent=1))
    return keys


def _gate_command(args: argparse.Namespace) -> int:
    keys = fit_gate_files(args.archive, args.images, args.validation, args.out,
                          args.flag_share)
    print(f"wrote {args.out}: pack it with grad2 archive --gate-file {args.out} and set")
    print("defense:")
    for key, value in keys.items():
        print(f"  {key}: {value}")
    return 0


def selected_key(archive: Path, images: Path, validation: Path,
                 progress: bool = True) -> tuple[bytes, dict]:
    """A fresh secret key whose mapping passes :func:`grad2.tools.keys.select_key` for the
    archive's victim on ``images`` (defender-chosen OOD images) and ``validation`` (its
    in-distribution images), with what the selection found."""
    from grad2.serve import open_archive
    from grad2.tools import keys
    from grad2.tools.images import open_images

    with open_archive(archive) as opened:
        served = opened.load()

        def pixels(folder: Path) -> torch.Tensor:
            parts = [x for x, _, _ in open_images(folder, served.input_config).batches(
                256, progress=progress, desc=folder.name)]
            if not parts:
                raise ValueError(f"{folder}: no decodable images")
            return torch.cat(parts)

        gate_weights = getattr(served.defense, "gate_weights", None)
        scorer = keys.MappingScorer.fit(served.victim, pixels(images), pixels(validation),
                                        gate_weights)
    return keys.select_key(scorer, progress=progress)


def _keygen_command(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise FileExistsError(f"{args.out} exists; a new key changes the mapping (and what "
                              "verify tests): pass --force to replace it")
    given = [args.archive, args.images, args.validation]
    if any(given) and not all(given):
        raise ValueError("keygen's criterion needs --archive, --images and --validation "
                         "together")
    if args.archive is None:
        from grad2.tools import keys

        keys.plain_key_warning()
        key = None
    else:
        raw, found = selected_key(args.archive, args.images, args.validation)
        key = raw.hex()
        print(f"the mapping passed the criterion after {found['draws']} draws (simulated "
              f"thief {found['score']:.3f} <= {found['threshold']:.3f})")
    path = gate.write_key(args.out, key)
    print(f"wrote {path} (mode 600): pack it with grad2 archive --mapping-key {path} and "
          f"defense: {{mapping_key: {path.name}}}; keep a copy: verify needs it")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gate", help="fit a grad2_gated model's feature gate on the defender's images",
        description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True,
                        help="a model version with a surrogate (.mar)")
    parser.add_argument("--images", type=Path, required=True,
                        help="the defender's training images (labelled folders, or "
                        "unlabelled: the victim labels them)")
    parser.add_argument("--validation", type=Path, required=True,
                        help="in-distribution images the fit never saw, for the threshold")
    parser.add_argument("--flag-share", type=float, default=0.01,
                        help="share of validation images the gate may treat as OOD")
    parser.add_argument("--out", type=Path, required=True)
    parser.set_defaults(func=_gate_command)

    keygen = subparsers.add_parser(
        "keygen", help="write a secret key for the class mapping (defense.mapping_key)")
    keygen.add_argument("--out", type=Path, required=True)
    keygen.add_argument("--force", action="store_true")
    keygen.add_argument("--archive", type=Path,
                        help="the model version the key is for (.mar): draw only keys whose "
                        "mapping passes the criterion on its victim")
    keygen.add_argument("--images", type=Path,
                        help="defender-chosen OOD images (for example rotated or inverted "
                        "training images; never a thief's queries)")
    keygen.add_argument("--validation", type=Path,
                        help="the defender's in-distribution images")
    keygen.set_defaults(func=_keygen_command)
