"""The ``grad2`` command: one entry point, one sub-command per task.

:data:`COMMANDS` is the one table of sub-commands: each names the module whose
``register(subparsers)`` adds it (and sets ``func``), and a one-line help. Only the
module of the command being run is imported, so ``grad2 serve --stop`` never imports the
lab, and ``grad2 --help`` imports nothing but this file.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Sub-command -> (module that registers it, one-line help for ``grad2 --help``).
COMMANDS: dict[str, tuple[str, str]] = {
    "archive": ("grad2.serve.cli", "validate a model and its defense config, pack a .mar"),
    "serve": ("grad2.serve.cli", "start (or --stop) TorchServe or KServe with defended models"),
    "tune": ("grad2.tools.tune", "choose epsilon for a model version, build the next archive"),
    "target": ("grad2.tools.target_files", "write a target direction file (target: file)"),
    "gate": ("grad2.tools.gate_files", "fit a grad2_gated model's feature gate"),
    "keygen": ("grad2.tools.gate_files", "write a secret key for the class mapping"),
    "train-victim": ("grad2.lab.train", "train a victim"),
    "train-surrogate": ("grad2.lab.train", "distil an early-stopped surrogate from a victim"),
    "train-clone": ("grad2.lab.train", "train a thief's clone on a victim's answers"),
    "attack": ("grad2.lab.attack", "steal a served model through its API, score the clone"),
    "evaluate": ("grad2.lab.evaluate", "sweep thieves against every defense"),
    "ood-study": ("grad2.lab.ood", "gated defenses fitted on defender data vs every thief"),
    "watermark": ("grad2.lab.watermark", "create, evaluate or verify a watermark target"),
    "verify": ("grad2.tools.ownership", "does a suspect follow an archive's redirection?"),
    "bench": ("grad2.lab.bench", "time the defenses in process"),
    "bench-serve": ("grad2.lab.bench_serve", "throughput and latency through TorchServe"),
    "fetch-data": ("grad2.lab.data", "fetch the lab's datasets into the cache"),
    "demo": ("grad2.lab.demo", "the whole product at work (make demo)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the full options of ``command`` (its module imported) and a
    one-line entry for every other sub-command."""
    parser = argparse.ArgumentParser(
        prog="grad2", description="GRAD² model-stealing defense for TorchServe."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    owner = COMMANDS[command][0] if command in COMMANDS else None
    if owner is not None:
        importlib.import_module(owner).register(subparsers)
    registered = set(subparsers.choices)
    for name, (_, help_text) in COMMANDS.items():
        if name not in registered:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The first argument that names a sub-command (options come after it)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
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
