"""The operator's tools: what an operator runs on their own archive and image folders.

- :mod:`grad2.tools.images` — image folders read through the worker's decoder;
- :mod:`grad2.tools.gate_files` — ``grad2 gate`` (fit a feature gate), ``grad2 keygen``;
- :mod:`grad2.tools.target_files` — ``grad2 target`` (a target direction file);
- :mod:`grad2.tools.tune` — ``grad2 tune`` (choose epsilon, build the next archive);
- :mod:`grad2.tools.ownership` — ``grad2 verify`` (does a suspect follow an archive?);
- :mod:`grad2.tools.progress` — progress bars: drawn on a terminal, a line every 30 s in
  a log (the lab's commands use them too).

They use the serving API of :mod:`grad2.serve` (never its modules' internals) and some
training helpers of the lab; the TorchServe worker never imports them.

Extras: ``keygen``, ``gate``, ``target`` and ``verify`` of a checkpoint need only the
library; with the ``lab`` extra (tqdm) they draw progress bars. ``verify`` of a URL
suspect needs the ``lab`` extra (requests); ``tune`` needs it for its plot (matplotlib),
and the ``archive`` extra to pack the next version.
"""
