"""TorchServe entry file of a GRAD²-defended model, packed into every ``.mar`` by
``grad2 archive``.

TorchServe loads this file from the unpacked archive and needs exactly one class defined
in it. The handler's code is :class:`grad2.serve.handler.Grad2Handler`, imported from the
``grad2-serve`` installed in the Python environment that runs ``torchserve``
(``pip install 'grad2-serve[serve]'``), so archives stay a few lines of handler and
upgrade with the plugin.
"""

from grad2.serve.handler import Grad2Handler as _PackagedHandler


class Grad2Handler(_PackagedHandler):
    """Serves ``defense(x, softmax(victim(x)))`` configured by ``model-config.yaml``."""
