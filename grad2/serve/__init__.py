"""Serving: what the TorchServe worker runs, and the tools around it.

- :mod:`grad2.serve.handler` — the TorchServe handler class (the worker's entry, with
  ``ts``); archives carry only the entry file in :mod:`grad2.serve.templates`;
- :mod:`grad2.serve.codec` — request payloads to tensors, defended probabilities to answers;
- :mod:`grad2.serve.loader` — an archive's files to a :class:`~grad2.serve.loader.ServedModel`;
- :mod:`grad2.serve.archive` — ``grad2 archive``: validate and pack a ``.mar``;
- :mod:`grad2.serve.pipeline` — decode → victim → defense → encode, shared by the runtimes;
- :mod:`grad2.serve.kserve` — the same path as a KServe predictor (``kserve`` extra);
- :mod:`grad2.serve.server` — ``grad2 serve``: run TorchServe, tokens, ports;
- :mod:`grad2.serve.kserve_server` — ``grad2 serve --runtime kserve``: run the predictor;
- :mod:`grad2.serve.templates` — files shipped in the wheel (handler entry file,
  ``config.properties``, metrics, example ``model-config.yaml`` files).

The worker imports the handler, codec and loader (and the core); never the lab or the
operator's tools (:mod:`grad2.tools`).

The package exports the serving API that the tools and the lab use: an archive opened
(:func:`open_archive`), requests decoded as the worker decodes them (:func:`decode_image`,
:func:`normalise`) and the victim's clean answers (:func:`clean_probabilities`). Modules
outside ``grad2.serve`` import them from here, never from the modules that define them.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module that defines it (imported on first use, so the worker, which
#: imports ``grad2.serve.handler``, loads neither the archive nor the server tools).
_EXPORTS: dict[str, str] = {
    "Archive": "grad2.serve.archive",
    "build_archive": "grad2.serve.archive",
    "check_model_config": "grad2.serve.archive",
    "open_archive": "grad2.serve.archive",
    "read_manifest": "grad2.serve.archive",
    "CHANNEL_MODES": "grad2.serve.codec",
    "RequestError": "grad2.serve.codec",
    "decode_image": "grad2.serve.codec",
    "normalise": "grad2.serve.codec",
    "ServedModel": "grad2.serve.loader",
    "clean_probabilities": "grad2.serve.loader",
    "load_served_model": "grad2.serve.loader",
    "Ports": "grad2.serve.server",
    "Tokens": "grad2.serve.server",
    "TorchServeServer": "grad2.serve.server",
    "read_tokens": "grad2.serve.server",
    "start_server": "grad2.serve.server",
    "stop_server": "grad2.serve.server",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'grad2.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
