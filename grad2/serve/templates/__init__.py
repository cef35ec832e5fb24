"""Files shipped with the wheel for serving: the archive's handler entry file, the default
TorchServe ``config.properties`` and metrics declarations, example ``model-config.yaml``
files (``model-configs/``). Found with :mod:`importlib.resources`, so they work from an
installed wheel as from a checkout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def template_path(name: str) -> Path:
    """The file system path of the shipped file ``name`` (e.g. ``"config.properties"``,
    ``"model-configs/grad2.yaml"``)."""
    path = Path(str(resources.files(__name__).joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"shipped file {name} not found in {__name__}")
    return path


def model_config_names() -> list[str]:
    """Names of the shipped example ``model-config.yaml`` files, without ``.yaml``."""
    folder = resources.files(__name__).joinpath("model-configs")
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir()
                  if entry.name.endswith(".yaml"))
