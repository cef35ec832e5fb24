"""The operator's tools: what an operator runs on their own archive and image folders.

- :mod:`grad2.tools.images` — image folders read through the worker's decoder;
- :mod:`grad2.tools.gate_files` — ``grad2 gate`` (fit a feature gate), ``grad2 keygen``;
- :mod:`grad2.tools.target_files` — ``grad2 target`` (a target direction file);
- :mod:`grad2.tools.tune` — ``grad2 tune`` (choose epsilon, build the next archive);
- :mod:`grad2.tools.ownership` — ``grad2 verify`` (does a suspect follow an archive?).

They use the serving API of :mod:`grad2.serve` (never its modules' internals) and some
training helpers of the lab; the TorchServe worker never imports them.

Extras: ``keygen`` needs only the library. ``gate``, ``target`` and ``verify`` need the
``lab`` extra for their tqdm progress bars (and ``verify`` with a URL suspect for
requests); ``tune`` needs it for its progress bars and its matplotlib plot, and the
``archive`` extra to pack the next version.
"""
