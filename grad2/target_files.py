"""``grad2 target``: write a target direction to a file for ``target: file`` archives.

``grad2 target misdirect --surrogate surrogate.pt --pool animal --out misdirect.pt``
computes the fixed misdirection direction (clones pushed toward the labelling
``k → k + shift``; see :func:`grad2.targets.misdirect` and docs/results.md) on reference
images like the thief's; ``random`` writes a seeded Gaussian direction. Pack the file with
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

from grad2 import targets
from grad2.balance import balance_target
from grad2.data import THIEF_POOLS, thief_pool, to_tensor
from grad2.defenses import GRAD2
from grad2.models import load_checkpoint
from grad2.train import predict_probs


def _target_command(args: argparse.Namespace) -> int:
    if args.balance_epsilon is not None and args.victim is None:
        raise ValueError("--balance-epsilon needs --victim (its clean answers are the balance)")
    surrogate, _ = load_checkpoint(args.surrogate)

    def reference_images():
        return to_tensor(thief_pool(args.pool, size=args.references, seed=args.seed).images)

    if args.kind == "misdirect":
        target = targets.misdirect(surrogate, reference_images(), shift=args.shift)
    else:
        target = targets.random(surrogate, args.seed)
    if args.balance_epsilon is not None:
        images = reference_images()
        victim, _ = load_checkpoint(args.victim)
        defense = GRAD2(surrogate, args.balance_epsilon, target, preserve_top1=args.preserve_top1)
        target, balance = balance_target(defense, images, predict_probs(victim, images),
                                         steps=args.balance_steps)
        print(f"balanced for epsilon {args.balance_epsilon:g}"
              f"{' with preserve_top1' if args.preserve_top1 else ''} on {len(images)} "
              f"{args.pool} images: |mean answer - mean clean answer|_1 "
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
    parser.add_argument("--surrogate", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--pool", default="animal", choices=THIEF_POOLS,
                        help="reference images like the thief's (misdirect)")
    parser.add_argument("--references", type=int, default=2000)
    parser.add_argument("--shift", type=int, default=1, help="misdirect: k -> k + shift")
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--balance-epsilon", type=float,
                        help="keep the mean answer for this budget (needs --victim)")
    parser.add_argument("--preserve-top1", action="store_true",
                        help="balance for a preserve_top1 defense")
    parser.add_argument("--victim", type=Path, help="the served model's checkpoint")
    parser.add_argument("--balance-steps", type=int, default=600,
                        help="subgradient steps of the balance (about 0.2 s each for 2,000 "
                        "references with --preserve-top1, far less without)")
    parser.set_defaults(func=_target_command)
