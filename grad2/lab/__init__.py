"""The lab: datasets, training recipes, evaluation sweeps, thieves, tuning, watermark
research, benchmarks and the demo. It needs the ``lab`` extra (matplotlib, tqdm,
requests) and is never imported by the TorchServe worker."""
