"""The ``grad2`` command: one entry point, one sub-command per task.

Each module listed in ``COMMAND_MODULES`` defines ``register(subparsers)``, which adds
its sub-commands and sets ``func`` on them; modules are imported only when the
command line is parsed, so ``grad2 --help`` stays fast and a broken optional module
cannot take the others down.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES: tuple[str, ...] = (
    "grad2.data",
    "grad2.train",
    "grad2.serving",
    "grad2.attack",
    "grad2.evaluate",
    "grad2.tune",
    "grad2.watermark",
    "grad2.target_files",
    "grad2.bench",
    "grad2.bench_serve",
    "grad2.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grad2", description="GRAD² model-stealing defense for TorchServe."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue  # not written yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"grad2 {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
