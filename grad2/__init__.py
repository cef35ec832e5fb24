"""GRAD²: gradient-redirection defense against model stealing, as a library.

The library never imports TorchServe; ``handler/`` wraps it for serving.
"""

__version__ = "0.1.0"
