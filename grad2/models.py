"""Architectures for victims, surrogates and clones, and their checkpoint format.

Every architecture takes ``float [B, C, 28, 28]`` (normalised, see ``grad2.lab.data.to_tensor``)
and returns logits ``[B, K]``. Networks are built by name through one registry:

- ``small_cnn`` — the victim default: three conv/BN/ReLU/max-pool blocks (16, 32, 64
  channels) and a linear head; ~29k parameters, fast on a CPU.
- ``wide_cnn`` — a different and wider network for architecture-mismatch thieves: a 5x5
  and a 3x3 conv block (32, 64 channels) and a 128-unit hidden layer with batch-norm.
- ``resnet18_gray`` — torchvision's ResNet-18 with a 3x3 stride-1 first convolution and no
  max-pool, suited to 28x28 inputs (slow on a CPU).
- ``torchvision:<name>`` — any torchvision classification model, untrained, 3 channels.

A checkpoint is ``name.pt`` (a ``state_dict``) beside ``name.json`` (metadata: ``arch``,
``num_classes``, ``in_channels`` and whatever the trainer adds); :func:`load_checkpoint`
rebuilds the network from the JSON and loads the weights with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

TORCHVISION_PREFIX = "torchvision:"
#: Attributes that :func:`build_model` sets so a model remembers how it was built.
_SPEC_ATTRIBUTES = ("grad2_arch", "grad2_num_classes", "grad2_in_channels")


class CheckpointError(ValueError):
    """A checkpoint's metadata is missing or does not match its weights."""


def _conv_block(in_channels: int, out_channels: int, kernel_size: int = 3) -> list[nn.Module]:
    """conv (no bias) -> batch-norm -> ReLU -> 2x2 max-pool: halves the side."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]


def _small_cnn(num_classes: int, in_channels: int) -> nn.Module:
    # 28 -> 14 -> 7 -> 3 (floor), 64 channels.
    return nn.Sequential(
        *_conv_block(in_channels, 16),
        *_conv_block(16, 32),
        *_conv_block(32, 64),
        nn.Flatten(),
        nn.Linear(64 * 3 * 3, num_classes),
    )


def _wide_cnn(num_classes: int, in_channels: int) -> nn.Module:
    # 28 -> 14 -> 7, then a wide hidden layer.
    return nn.Sequential(
        *_conv_block(in_channels, 32, kernel_size=5),
        *_conv_block(32, 64),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128, bias=False),
        nn.BatchNorm1d(128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


def _resnet18_gray(num_classes: int, in_channels: int) -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


#: name -> builder(num_classes, in_channels). ``torchvision:<name>`` is handled apart.
ARCHITECTURES: dict[str, Callable[[int, int], nn.Module]] = {
    "small_cnn": _small_cnn,
    "wide_cnn": _wide_cnn,
    "resnet18_gray": _resnet18_gray,
}


def _torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    if in_channels != 3:
        raise ValueError(f"torchvision:{name} takes 3-channel input; got in_channels={in_channels}")
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"unknown torchvision classification model {name!r}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def build_model(arch: str, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A freshly initialised network (``float [B, in_channels, H, W]`` -> logits
    ``[B, num_classes]``). ``arch`` is a key of :data:`ARCHITECTURES` or
    ``torchvision:<name>``. The model remembers ``arch`` for :func:`save_checkpoint`."""
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be >= 1, got "
                         f"{num_classes} and {in_channels}")
    if arch.startswith(TORCHVISION_PREFIX):
        model = _torchvision_model(arch.removeprefix(TORCHVISION_PREFIX), num_classes, in_channels)
    elif arch in ARCHITECTURES:
        model = ARCHITECTURES[arch](num_classes, in_channels)
    else:
        known = ", ".join([*ARCHITECTURES, f"{TORCHVISION_PREFIX}<name>"])
        raise ValueError(f"unknown architecture {arch!r}; choose one of {known}")
    for attribute, value in zip(_SPEC_ATTRIBUTES, (arch, num_classes, in_channels)):
        setattr(model, attribute, value)
    return model


def set_memory_format(network: nn.Module, memory_format: str) -> nn.Module:
    """Put ``network``'s 4-D parameters and buffers in ``memory_format``
    (``"channels_last"`` or ``"contiguous"``, the ``handler.memory_format`` setting), in
    place; returns ``network``. A convolution whose weight is channels-last computes and
    returns channels-last whatever its input's layout, so the weights alone set the
    layout of the whole network."""
    layouts = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    if memory_format not in layouts:
        raise ValueError(f"memory_format must be one of {', '.join(layouts)}; "
                         f"got {memory_format!r}")
    return network.to(memory_format=layouts[memory_format])


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """``(name, layer)`` of ``model``'s last ``nn.Linear`` in module order (a classifier's
    head); raises ``ValueError`` when it has none."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear)]
    if not found:
        raise ValueError("the network has no nn.Linear layer")
    return found[-1]


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, D]``: the input of ``model``'s last ``nn.Linear`` (its feature vector) for
    inputs ``x``, computed in eval mode (restored afterwards), without gradients."""
    _, layer = last_linear(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(
        lambda module, args, out: captured.append(args[0].detach()))
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
        model.train(training)
    return captured[-1].flatten(1)


def predict_probs(
    model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024, device: str = "cpu"
) -> torch.Tensor:
    """Softmax outputs ``[N, K]`` (float32, CPU) for ``inputs [N, C, H, W]``, in eval mode
    (restored afterwards), in batches of ``batch_size``."""
    was_training = model.training
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            logits = model(inputs[start:start + batch_size].to(device))
            outputs.append(logits.float().softmax(dim=1).cpu())
    model.train(was_training)
    if not outputs:
        raise ValueError("no inputs")
    return torch.cat(outputs)


class SurrogateEnsemble(nn.Module):
    """Several surrogates as one model (``[B, C, H, W]`` -> ``[B, K]``): the sum of the
    members' log-probabilities, a product of experts.

    GRAD²'s scores of this model (the JVP of its ``log_softmax`` along the members'
    concatenated parameters) are the sum of the members' own scores minus a per-row
    constant, and no GRAD² solver sees a per-row constant (over the simplex it shifts the
    objective ``c·ỹ`` by the same amount for every answer), so one redirection steers every
    member's architecture at once. For evaluation: archives hold a single surrogate.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.log_softmax(m(x), dim=-1) for m in self.members]).sum(dim=0)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """``{"arch", "num_classes", "in_channels"}`` of a model made by :func:`build_model`."""
    if not all(hasattr(model, a) for a in _SPEC_ATTRIBUTES):
        raise ValueError("model was not made by grad2.models.build_model; pass its 'arch', "
                         "'num_classes' and 'in_channels' in the metadata")
    return {a.removeprefix("grad2_"): getattr(model, a) for a in _SPEC_ATTRIBUTES}


def metadata_path(path: Path) -> Path:
    """The JSON file that goes with checkpoint ``path``."""
    return Path(path).with_suffix(".json")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_checkpoint(model: nn.Module, path: Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (the ``state_dict``) and ``path.with_suffix(".json")`` (``metadata``
    plus ``arch``, ``num_classes``, ``in_channels`` and the weights' SHA-256). Both files are
    replaced atomically. Returns the JSON path."""
    path = Path(path)
    metadata = dict(metadata or {})
    try:
        spec = model_spec(model)
    except ValueError:
        spec = {}
    for key, value in spec.items():
        if key in metadata and metadata[key] != value:
            raise ValueError(f"metadata {key}={metadata[key]!r} contradicts the model's {value!r}")
    metadata = {**spec, **metadata}
    missing = [key for key in ("arch", "num_classes", "in_channels") if key not in metadata]
    if missing:
        raise ValueError(f"checkpoint metadata needs {', '.join(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    # A buffer, not a file: torch embeds a file's name, and equal weights must give equal bytes.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    weights_tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    weights_tmp.write_bytes(buffer.getvalue())
    metadata["weights_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    json_path = metadata_path(path)
    json_tmp = json_path.with_name(f".{json_path.name}.{os.getpid()}.tmp")
    json_tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(weights_tmp, path)
    os.replace(json_tmp, json_path)
    return json_path


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of checkpoint ``path``; :class:`CheckpointError` if absent."""
    json_path = metadata_path(Path(path))
    if not json_path.is_file():
        raise CheckpointError(
            f"{json_path}: metadata file missing; a checkpoint is {Path(path).name} plus "
            f"{json_path.name} (written by save_checkpoint)"
        )
    try:
        metadata = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{json_path}: not valid JSON: {error}") from error
    missing = [k for k in ("arch", "num_classes", "in_channels") if k not in metadata]
    if missing:
        raise CheckpointError(f"{json_path}: metadata lacks {', '.join(missing)}")
    return metadata


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network described by ``path.with_suffix(".json")`` and load the weights
    in ``path``. Returns ``(model in eval mode, metadata)``."""
    path = Path(path)
    metadata = read_metadata(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint weights missing")
    expected_hash = metadata.get("weights_sha256")
    if expected_hash is not None and _file_sha256(path) != expected_hash:
        raise CheckpointError(f"{path}: weights do not match the SHA-256 in "
                              f"{metadata_path(path).name} (files from different runs?)")
    try:
        model = build_model(metadata["arch"], int(metadata["num_classes"]),
                            int(metadata["in_channels"]))
    except ValueError as error:
        raise CheckpointError(f"{metadata_path(path)}: {error}") from error
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state_dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: weights do not fit architecture {metadata['arch']!r} "
            f"({metadata['num_classes']} classes, {metadata['in_channels']} channels): {error}"
        ) from error
    return model.to(map_location).eval(), metadata
