"""``grad2 target``: write a target direction to a file for ``target: file`` archives.

``grad2 target misdirect --surrogate surrogate.pt --pool animal --out misdirect.pt``
computes the fixed misdirection direction (clones pushed toward the labelling
``k → k + shift``; see :func:`grad2.targets.misdirect` and docs/results.md) on reference
images like the thief's; ``random`` writes a seeded Gaussian direction. Pack the file with
``grad2 archive --target FILE`` and ``defense: {target: file, target_file: FILE}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grad2 import targets
from grad2.data import THIEF_POOLS, thief_pool, to_tensor
from grad2.models import load_checkpoint


def _target_command(args: argparse.Namespace) -> int:
    surrogate, _ = load_checkpoint(args.surrogate)
    if args.kind == "misdirect":
        references = to_tensor(thief_pool(args.pool, size=args.references, seed=args.seed).images)
        target = targets.misdirect(surrogate, references, shift=args.shift)
    else:
        target = targets.random(surrogate, args.seed)
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
    parser.set_defaults(func=_target_command)
