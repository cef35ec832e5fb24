"""Request decoding and answer encoding: request payloads become input tensors, defended
probabilities become answers.

Everything here is a pure function of its arguments (no ``ts`` import), so it is unit
tested and fuzzed without TorchServe; :mod:`grad2.serve.handler` only wires these
functions to TorchServe's ``Context``.

Request forms (one TorchServe request may carry several images only in the KServe forms):

- image bytes (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM, TGA) as a raw body or a multipart
  field;
- JSON ``{"image": "<base64>"}`` or ``{"data": "<base64>"}``;
- JSON ``{"tensor": [...]}``: pixel intensities in ``[0, 1]``, shape ``[C, H, W]`` (or
  ``[H, W]`` when ``C == 1``) at the model's input size; normalised like a decoded image;
- KServe v1 ``{"instances": [{"data": "<base64>"} | {"tensor": ...} | "<base64>", ...]}``;
- KServe v2 ``{"inputs": [{"name", "shape", "datatype": "BYTES", "data": ["<base64>", ...]}]}``
  or with ``datatype`` ``FP32``/``FP64`` and ``shape`` ``[N, C, H, W]`` (values in ``[0, 1]``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from grad2.config import InputConfig

#: Raster formats accepted from clients. Formats that run external programs or parse
#: complex containers (EPS, PSD, PDF-like) are never opened.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA")
#: Images (or tensors) one request may carry in the KServe forms.
MAX_IMAGES_PER_REQUEST = 64
#: PIL mode used for each channel count.
CHANNEL_MODES: dict[int, str] = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
#: Integer modes PIL opens 16-bit images in (PNG/TIFF ``I;16*``, PGM/PPM ``I``), scaled
#: to 8 bits by :func:`decode_image`.
SIXTEEN_BIT_MODES: tuple[str, ...] = ("I;16", "I;16B", "I;16L", "I;16N", "I")
#: Content types accepted for a binary body; anything else is refused with 415.
BINARY_CONTENT_TYPES: tuple[str, ...] = ("", "application/octet-stream", "multipart/form-data")

PLAIN, KSERVE_V1, KSERVE_V2 = "plain", "kserve_v1", "kserve_v2"


class RequestError(ValueError):
    """A request that cannot be answered; ``status`` is its HTTP code (4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class DecodedRequest:
    """One request's inputs: ``pixels`` is ``[N, C, H, W]`` float32 in ``[0, 1]``."""

    pixels: torch.Tensor
    protocol: str = PLAIN
    request_id: str | None = None
    output_name: str = "probabilities"

    @property
    def count(self) -> int:
        return int(self.pixels.shape[0])


# --------------------------------------------------------------------------- decoding


def select_payload(row: Mapping[str, Any]) -> tuple[str, Any]:
    """Pick the field holding the input: ``body`` (raw/JSON body), else ``data``
    (multipart field, gRPC input), else the only field. Returns ``(name, value)``."""
    if not isinstance(row, Mapping) or not row:
        raise RequestError(400, "empty request: send an image or a JSON body")
    for name in ("body", "data"):
        if name in row:
            return name, row[name]
    if len(row) == 1:
        name = next(iter(row))
        return name, row[name]
    raise RequestError(
        400, f"several form fields ({', '.join(sorted(map(str, row)))}); send the image as 'data'"
    )


def decode_request(value: Any, content_type: str | None, spec: InputConfig) -> DecodedRequest:
    """Turn one request payload into pixels ``[N, C, H, W]`` in ``[0, 1]``.

    ``value`` is what TorchServe's worker passes: bytes for binary bodies, a decoded JSON
    value for ``application/json``, a str for ``text/*``. ``content_type`` is the declared
    type of that payload (may be ``None``). Raises :class:`RequestError` (4xx).
    """
    media_type = (content_type or "").split(";")[0].strip().lower()
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if not data:
            raise RequestError(400, "empty body: send an image or a JSON body")
        if media_type == "application/json" or media_type.endswith("+json"):
            return decode_json(_parse_json(data), spec)
        if media_type.startswith("text/") or not (
            media_type in BINARY_CONTENT_TYPES or media_type.startswith("image/")
        ):
            raise RequestError(
                415,
                f"unsupported content type {media_type!r} for a binary body; send images as "
                "application/octet-stream, image/*, multipart/form-data, or JSON as "
                "application/json",
            )
        if data.lstrip()[:1] in (b"{", b"["):
            return decode_json(_parse_json(data), spec)
        return DecodedRequest(pixels=decode_image(data, spec).unsqueeze(0))
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise RequestError(400, "empty body: send an image or a JSON body")
        if text[:1] in ("{", "["):
            return decode_json(_parse_json(text.encode("utf-8")), spec)
        return DecodedRequest(pixels=decode_image(decode_base64(text, "body"), spec).unsqueeze(0))
    if isinstance(value, Mapping | list):
        return decode_json(value, spec)
    raise RequestError(400, f"unsupported JSON body of type {type(value).__name__}")


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, f"body is not valid JSON: {error}") from None


def decode_json(body: Any, spec: InputConfig) -> DecodedRequest:
    """Decode a parsed JSON body (plain, KServe v1 or v2 form); see the module doc."""
    if isinstance(body, list):
        raise RequestError(
            400, 'JSON body must be an object: {"image": b64}, {"tensor": [...]}, '
            '{"instances": [...]} or {"inputs": [...]}'
        )
    if not isinstance(body, Mapping):
        raise RequestError(400, f"unsupported JSON body of type {type(body).__name__}")
    if "instances" in body:
        return _decode_kserve_v1(body["instances"], spec)
    if "inputs" in body:
        return _decode_kserve_v2(body, spec)
    return DecodedRequest(pixels=_decode_instance(body, spec, "body").unsqueeze(0))


def _decode_instance(instance: Any, spec: InputConfig, where: str) -> torch.Tensor:
    """One image from a JSON instance; returns ``[C, H, W]``."""
    if isinstance(instance, str):
        return decode_image(decode_base64(instance, where), spec)
    if isinstance(instance, list):
        return decode_tensor(instance, spec, where)
    if isinstance(instance, Mapping):
        if "tensor" in instance:
            return decode_tensor(instance["tensor"], spec, f"{where}.tensor")
        for key in ("image", "data", "b64"):
            if key in instance:
                item = instance[key]
                if isinstance(item, Mapping) and "b64" in item:
                    item = item["b64"]
                if isinstance(item, list):
                    return decode_tensor(item, spec, f"{where}.{key}")
                if not isinstance(item, str):
                    raise RequestError(
                        400, f"{where}.{key} must be a base64 string, got {type(item).__name__}"
                    )
                return decode_image(decode_base64(item, f"{where}.{key}"), spec)
    raise RequestError(
        400, f'{where}: expected {{"image": "<base64>"}}, {{"data": "<base64>"}} or '
        '{"tensor": [...]}'
    )


def _decode_kserve_v1(instances: Any, spec: InputConfig) -> DecodedRequest:
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, "instances must be a non-empty list")
    _check_count(len(instances))
    pixels = torch.stack(
        [_decode_instance(item, spec, f"instances[{i}]") for i, item in enumerate(instances)]
    )
    return DecodedRequest(pixels=pixels, protocol=KSERVE_V1)


def _decode_kserve_v2(body: Mapping[str, Any], spec: InputConfig) -> DecodedRequest:
    inputs = body["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], Mapping):
        raise RequestError(400, "inputs must be a list with exactly one input tensor")
    tensor = inputs[0]
    datatype = str(tensor.get("datatype", "")).upper()
    data = tensor.get("data")
    if not isinstance(data, list) or not data:
        raise RequestError(400, "inputs[0].data must be a non-empty list")
    if datatype == "BYTES":
        items = _flatten_strings(data)
        if not items:
            raise RequestError(400, "inputs[0].data of a BYTES input holds no base64 string")
        _check_count(len(items))
        pixels = torch.stack(
            [
                decode_image(decode_base64(item, f"inputs[0].data[{i}]"), spec)
                for i, item in enumerate(items)
            ]
        )
    elif datatype in ("FP32", "FP64"):
        shape = tensor.get("shape")
        per_image = spec.channels * spec.height * spec.width
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
            or math.prod(shape) % per_image
            or math.prod(shape) == 0
            or list(shape[-3:]) != [spec.channels, spec.height, spec.width]
        ):
            raise RequestError(
                400, f"inputs[0].shape must be [N, {spec.channels}, {spec.height}, "
                f"{spec.width}], got {shape!r}"
            )
        values = _finite_unit_array(data, "inputs[0].data")
        if values.size != math.prod(shape):
            raise RequestError(
                400, f"inputs[0].data has {values.size} values, shape {shape} needs "
                f"{math.prod(shape)}"
            )
        count = values.size // per_image
        _check_count(count)
        pixels = torch.from_numpy(
            values.reshape(count, spec.channels, spec.height, spec.width).astype(np.float32)
        )
    else:
        raise RequestError(400, f"inputs[0].datatype must be BYTES, FP32 or FP64, got {datatype!r}")
    request_id = body.get("id")
    return DecodedRequest(
        pixels=pixels,
        protocol=KSERVE_V2,
        request_id=str(request_id) if isinstance(request_id, str | int) else None,
    )


def _flatten_strings(data: list[Any]) -> list[str]:
    items: list[str] = []
    stack = list(reversed(data))
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            items.append(item)
        else:
            raise RequestError(400, "inputs[0].data of a BYTES input must hold base64 strings")
        if len(items) > MAX_IMAGES_PER_REQUEST:
            _check_count(len(items))
    return items


def _check_count(count: int) -> None:
    if count > MAX_IMAGES_PER_REQUEST:
        raise RequestError(
            413, f"{count} images in one request; at most {MAX_IMAGES_PER_REQUEST} are accepted"
        )


def decode_base64(text: str, where: str) -> bytes:
    """Strict base64 (standard or URL-safe alphabet, optional ``data:`` URL prefix)."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where} is not valid base64") from None
    if not data:
        raise RequestError(400, f"{where} is empty")
    return data


def decode_image(data: bytes, spec: InputConfig) -> torch.Tensor:
    """Decode image bytes to ``[C, H, W]`` float32 in ``[0, 1]`` at the model's size.

    The header is read first and images with a side over ``spec.max_side`` are refused
    before any pixel is decoded (decompression bombs)."""
    if not data:
        raise RequestError(400, "empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    raise RequestError(400, f"image has no pixels ({width}x{height})")
                if max(width, height) > spec.max_side:
                    raise RequestError(
                        413, f"image is {width}x{height} pixels; the largest accepted side is "
                        f"{spec.max_side}"
                    )
                image.load()
                converted = _to_8bit(image).convert(CHANNEL_MODES[spec.channels])
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(
            400, f"body is not an image in a supported format ({', '.join(IMAGE_FORMATS)})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(413, "image has too many pixels") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
            struct.error) as error:
        raise RequestError(400, f"image could not be decoded: {type(error).__name__}") from None
    if converted.size != (spec.width, spec.height):
        converted = converted.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    array = np.asarray(converted, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / 255.0)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Bring 16-bit and odd modes to a mode PIL converts faithfully: PIL's own conversion
    of 16-bit pixels (PNG/TIFF ``I;16*``, PGM/PPM and 32-bit TIFF ``I``) to 8 bits clips
    at 255 instead of scaling, turning a 16-bit photograph white; float images (``F``)
    have no agreed range and PIL turns ``[0, 1]`` black, so they are refused; ``LAB``
    converts to grayscale only through RGB."""
    if image.mode in SIXTEEN_BIT_MODES:
        array = np.asarray(image)
        if array.size and (int(array.min()) < 0 or int(array.max()) > 65535):
            raise RequestError(415, "32-bit integer pixels beyond 0..65535 are not accepted; "
                               "send 8- or 16-bit images")
        return Image.fromarray(((array.astype(np.uint32) + 128) // 257).astype(np.uint8), "L")
    if image.mode == "F":
        raise RequestError(415, "floating-point images are not accepted; send 8- or 16-bit "
                           "integer images")
    if image.mode == "LAB":
        return image.convert("RGB")
    return image


def decode_tensor(values: Any, spec: InputConfig, where: str) -> torch.Tensor:
    """A JSON pixel tensor ``[C, H, W]`` (or ``[H, W]`` when ``C == 1``) in ``[0, 1]``."""
    array = _finite_unit_array(values, where)
    expected = (spec.channels, spec.height, spec.width)
    if array.ndim == 2 and spec.channels == 1:
        array = array[None]
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if tuple(array.shape) != expected:
        raise RequestError(
            400, f"{where} has shape {list(array.shape)}; this model takes "
            f"[{spec.channels}, {spec.height}, {spec.width}] (channels, height, width)"
        )
    return torch.from_numpy(array.astype(np.float32))


def _finite_unit_array(values: Any, where: str) -> np.ndarray:
    if not isinstance(values, list) or not values:
        raise RequestError(400, f"{where} must be a non-empty list of numbers")
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise RequestError(400, f"{where} must be a rectangular list of numbers") from None
    if array.dtype != np.float64 or array.size == 0:
        raise RequestError(400, f"{where} must be a rectangular list of numbers")
    if not np.isfinite(array).all():
        raise RequestError(400, f"{where} holds NaN or infinite values")
    if array.min() < 0.0 or array.max() > 1.0:
        raise RequestError(400, f"{where} values must be pixel intensities in [0, 1]")
    return array


def normalise(pixels: torch.Tensor, spec: InputConfig) -> torch.Tensor:
    """``[B, C, H, W]`` pixels in ``[0, 1]`` → the victim's input ``(pixels - mean) / std``."""
    mean = torch.tensor(spec.mean, dtype=pixels.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=pixels.dtype).view(1, -1, 1, 1)
    return (pixels - mean) / std


# --------------------------------------------------------------------------- answers


def answer_probabilities(
    probabilities: torch.Tensor, class_names: Sequence[str], output: str, topk: int
) -> list[dict[str, float]]:
    """Defended probabilities ``[B, K]`` → one ``{class_name: probability}`` per row:
    all classes in index order (``output == "probabilities"``) or the ``topk`` largest in
    decreasing order (``output == "topk"``; ties: lower index first)."""
    values = probabilities.detach().to(torch.float32).cpu()
    if output == "topk":
        k = min(topk, values.shape[1])
        order = torch.argsort(-values, dim=1, stable=True)[:, :k]
        top_values = torch.gather(values, 1, order).tolist()
        return [
            {class_names[j]: p for j, p in zip(indices, row)}
            for indices, row in zip(order.tolist(), top_values)
        ]
    return [dict(zip(class_names, row)) for row in values.tolist()]


def answer_labels(labels: torch.Tensor, class_names: Sequence[str]) -> list[dict[str, str]]:
    """Top-1 labels ``[B]`` → ``{"label": name}`` per row (the fail-closed answer)."""
    return [{"label": class_names[i]} for i in labels.tolist()]


def wrap_answers(
    answers: list[dict[str, Any]],
    request: DecodedRequest,
    model_name: str,
    model_version: str | None,
) -> Any:
    """Shape a request's answers for its protocol: one object (plain), ``{"predictions":
    [...]}`` (KServe v1), or a KServe v2 response with one BYTES output of JSON strings."""
    if request.protocol == KSERVE_V1:
        return {"predictions": answers}
    if request.protocol == KSERVE_V2:
        response: dict[str, Any] = {
            "model_name": model_name,
            "outputs": [
                {
                    "name": request.output_name,
                    "shape": [len(answers)],
                    "datatype": "BYTES",
                    "data": [json.dumps(answer) for answer in answers],
                }
            ],
        }
        if model_version:
            response["model_version"] = model_version
        if request.request_id is not None:
            response["id"] = request.request_id
        return response
    return answers[0]


def check_defended(defended: Any, probs: torch.Tensor, tolerance: float = 1e-4) -> None:
    """Raise ``ValueError`` unless ``defended`` is ``[B, K]`` like ``probs`` and every row
    lies on the probability simplex (within ``tolerance``). Messages quote no values."""
    if not isinstance(defended, torch.Tensor) or defended.shape != probs.shape:
        shape = tuple(defended.shape) if isinstance(defended, torch.Tensor) else type(defended)
        raise ValueError(f"defense returned {shape}, expected {tuple(probs.shape)}")
    if not torch.isfinite(defended).all():
        raise ValueError("defense returned non-finite values")
    if defended.numel() and float(defended.min()) < -tolerance:
        raise ValueError("defense returned negative probabilities")
    if defended.numel() and float((defended.sum(dim=1) - 1).abs().max()) > tolerance:
        raise ValueError("defense returned rows that do not sum to 1")


def error_body(status: int, message: str) -> dict[str, Any]:
    """The JSON body of a refused request (TorchServe's own error shape)."""
    kinds = {
        400: "BadRequest",
        403: "Forbidden",
        413: "PayloadTooLarge",
        415: "UnsupportedMediaType",
        503: "ServiceUnavailable",
    }
    return {"code": status, "type": kinds.get(status, "Error"), "message": message}
