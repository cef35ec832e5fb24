"""The lab: datasets, training recipes, evaluation sweeps, thieves, watermark research,
benchmarks and the demo. It needs the ``lab`` extra (matplotlib, tqdm, requests) and is
never imported by the TorchServe worker. The operator's tools (``grad2 tune``, ``target``,
``gate``, ``keygen``, ``verify``) live in :mod:`grad2.tools`."""
