"""``grad2 target``: write a target direction to a file for ``target: file`` archives.

``grad2 target misdirect --archive A.mar --images DIR --out misdirect.pt`` (the archive's
surrogate and victim, reference images from a folder decoded as the worker decodes
requests; or ``--surrogate surrogate.pt --pool animal`` with the lab's pools) computes
the fixed misdirection direction (clones pushed toward the labelling ``k → k + shift``;
see :func:`grad2.targets.misdirect` and docs/results.md) on reference images like the
queries expected; ``random`` writes a seeded Gaussian direction. Pack the file with
``grad2 archive --target FILE`` and ``defense: {target: file, target_file: FILE}``.

``--balance-epsilon E --victim victim.pt [--preserve-top1]`` then shifts the target's
per-class scores so that the defense with that budget and constraint keeps the victim's
mean answer on the reference images (:mod:`grad2.balance`): a thief who removes the class
prior of its answers removes nothing of the defense. Serve it with the same ``epsilon``
and ``preserve_top1``; another budget needs its own file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from grad2 import targets
from grad2.balance import balance_target
from grad2.config import InputConfig
from grad2.defenses import GRAD2
from grad2.models import load_checkpoint, predict_probs


def _target_command(args: argparse.Namespace) -> int:
    if args.archive is not None:
        from grad2.serve import open_archive

        with open_archive(args.archive) as archive:
            served = archive.load()
            return _write_target(args, served.surrogate, served.victim, served.input_config)
    if args.surrogate is None:
        raise ValueError("give --archive A.mar (its surrogate), or --surrogate S.pt")
    surrogate, _ = load_checkpoint(args.surrogate)
    victim = load_checkpoint(args.victim)[0] if args.victim is not None else None
    return _write_target(args, surrogate, victim, None)


def _reference_images(args: argparse.Namespace, spec: InputConfig | None) -> torch.Tensor:
    """``[N, C, H, W]`` model inputs: up to ``--references`` images of ``--images`` (at the
    archive's input spec), else of the lab pool ``--pool``."""
    if args.images is not None:
        if spec is None:
            raise ValueError("--images needs --archive (its input section decodes them)")
        from grad2.tools.images import open_images

        images = open_images(args.images, spec)
        inputs = [x for x, _, _ in images.batches(batch_size=256, progress=False)]
        return torch.cat(inputs)[: args.references]
    from grad2.lab.data import thief_pool, to_tensor  # the demo's pools: the lab extra

    return to_tensor(thief_pool(args.pool, size=args.references, seed=args.seed).images)


def _write_target(args: argparse.Namespace, surrogate: torch.nn.Module | None,
                  victim: torch.nn.Module | None, spec: InputConfig | None) -> int:
    if args.surrogate is not None and args.archive is not None:
        surrogate, _ = load_checkpoint(args.surrogate)
    if surrogate is None:
        raise ValueError(f"{args.archive} serves no surrogate (defense.method none?); pass "
                         "--surrogate S.pt, e.g. from grad2 train-surrogate --archive")
    if args.balance_epsilon is not None and victim is None:
        raise ValueError("--balance-epsilon needs --victim (or --archive): the victim's clean "
                         "answers are the balance")
    references = _reference_images(args, spec) if args.kind == "misdirect" or (
        args.balance_epsilon is not None) else None
    if args.kind == "misdirect":
        target = targets.misdirect(surrogate, references, shift=args.shift)
    else:
        target = targets.random(surrogate, args.seed)
    if args.balance_epsilon is not None:
        defense = GRAD2(surrogate, args.balance_epsilon, target, preserve_top1=args.preserve_top1)
        target, balance = balance_target(defense, references, predict_probs(victim, references),
                                         steps=args.balance_steps)
        print(f"balanced for epsilon {args.balance_epsilon:g}"
              f"{' with preserve_top1' if args.preserve_top1 else ''} on {len(references)} "
              f"{args.pool if args.images is None else args.images} images: "
              f"|mean answer - mean clean answer|_1 "
              f"{balance.gap_before:.4f} -> {balance.gap:.4f}")
    path = targets.save(target, args.out)
    targets.load(path, surrogate)  # the file must load back against its surrogate
    print(f"wrote {path}: pack it with grad2 archive --target {path} and "
          f"defense: {{target: file, target_file: {path.name}}}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "target", help="write a target direction file (misdirect, random) for target: file"
    )
    parser.add_argument("kind", choices=("misdirect", "random"))
    parser.add_argument("--archive", type=Path,
                        help="the served model version (.mar): its surrogate, victim and input")
    parser.add_argument("--images", type=Path,
                        help="with --archive: reference images like the queries you expect")
    parser.add_argument("--surrogate", type=Path,
                        help="surrogate checkpoint (default with --archive: the archive's)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--pool", default="animal",
                        help="without --images: the lab pool used as reference images "
                        "(grad2.lab.data.THIEF_POOLS; the demo's model only, lab extra)")
    parser.add_argument("--references", type=int, default=2000)
    parser.add_argument("--shift", type=int, default=1, help="misdirect: k -> k + shift")
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--balance-epsilon", type=float,
                        help="keep the mean answer for this budget (needs --victim)")
    parser.add_argument("--preserve-top1", action="store_true",
                        help="balance for a preserve_top1 defense")
    parser.add_argument("--victim", type=Path,
                        help="without --archive: the served model's checkpoint")
    parser.add_argument("--balance-steps", type=int, default=600,
                        help="subgradient steps of the balance (about 0.2 s each for 2,000 "
                        "references with --preserve-top1, far less without)")
    parser.set_defaults(func=_target_command)
