"""GRAD²: gradient-redirection defense against model stealing, as a library.

The package has three parts, and the tree shows which is which:

- the core, this package's modules: the exact solver (:mod:`grad2.redirect`), redirection
  scores by one JVP engine (:mod:`grad2.scores` with :mod:`grad2.folding` and
  :mod:`grad2.tangent_rules`), targets, class balance, the served defenses, the
  ``model-config.yaml`` sections, model checkpoints and batch plans. It imports torch,
  torchvision, numpy, Pillow and PyYAML, never TorchServe and never the lab;
- :mod:`grad2.serve`: what the TorchServe worker runs (request decoding, archive loading,
  the handler) and the tools that build archives and run TorchServe;
- :mod:`grad2.lab`: datasets, training recipes, evaluation sweeps, thieves, watermark
  research, benchmarks and the demo; never imported by the worker.

The public API below is re-exported here and imported on first use, so ``import grad2``
(and the ``grad2`` command) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

#: Public name -> the core module that defines it.
_EXPORTS: dict[str, str] = {
    # solver
    "redirect": "grad2.redirect",
    "separate_top": "grad2.redirect",
    "solve_answers": "grad2.redirect",
    # scores
    "Target": "grad2.scores",
    "redirection_scores": "grad2.scores",
    "eval_mode": "grad2.scores",
    # targets and class balance
    "targets": "grad2.targets",
    "Balance": "grad2.balance",
    "balance_offsets": "grad2.balance",
    "balance_target": "grad2.balance",
    # defenses
    "Defense": "grad2.defenses",
    "Redirection": "grad2.defenses",
    "NoDefense": "grad2.defenses",
    "Top1": "grad2.defenses",
    "Rounding": "grad2.defenses",
    "ReverseSigmoid": "grad2.defenses",
    "GRAD2": "grad2.defenses",
    "RandomNoise": "grad2.defenses",
    "GatedGRAD2": "grad2.defenses",
    "MAD": "grad2.defenses",
    "MADArgmax": "grad2.defenses",
    "AdaptiveMisinformation": "grad2.defenses",
    "DEFENSES": "grad2.defenses",
    "build_defense": "grad2.defenses",
    "parse_config": "grad2.defenses",
    "register": "grad2.defenses",
    "keys_table": "grad2.defenses",
    # configuration
    "ConfigError": "grad2.config",
    "DefenseConfig": "grad2.config",
    "InputConfig": "grad2.config",
    "HandlerConfig": "grad2.config",
    "Param": "grad2.config",
    # models and checkpoints
    "build_model": "grad2.models",
    "set_memory_format": "grad2.models",
    "save_checkpoint": "grad2.models",
    "load_checkpoint": "grad2.models",
    "SurrogateEnsemble": "grad2.models",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'grad2' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.endswith(f".{name}") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

