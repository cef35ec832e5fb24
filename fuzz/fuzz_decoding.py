#!/usr/bin/env python3
"""Coverage-guided fuzzing of the request decoding path (``grad2.serving_io``).

Every input is turned into one request row exactly as TorchServe's worker hands it to the
handler (raw body, text, decoded JSON, base64 inside JSON, KServe v1/v2, multipart field,
an arbitrary row), then goes through ``select_payload`` and ``decode_request``. The
property checked on every input (:func:`check_input`):

- the only exception allowed out is :class:`codec.RequestError` with a 4xx status
  and a message (the handler maps it to that HTTP status); anything else is a decoder bug;
- a decoded request holds ``[N, 1, 28, 28]`` float32 pixels in ``[0, 1]``, ``1 <= N <= 64``;
- one input takes less than :data:`TIME_LIMIT` seconds.

Run it (``pip install atheris`` first; it is not a project dependency)::

    .venv/bin/python fuzz/fuzz_decoding.py fuzz/corpus -runs=200000 -max_len=20000 \\
        -timeout=10 -rss_limit_mb=2048 -artifact_prefix=/tmp/

New interesting inputs land in the first corpus folder, a failing one in
``<artifact_prefix>crash-<sha1>``. To keep the committed corpus small, fuzz into a scratch
folder and merge; libFuzzer's merge re-runs this file as a program (hence the shebang), so
the virtualenv goes first on ``PATH``::

    PATH=.venv/bin:$PATH fuzz/fuzz_decoding.py -merge=1 fuzz/corpus /tmp/scratch-corpus

``--seeds DIR`` writes the hand-made seed inputs (``seed_*``); ``crash-*`` files are inputs
that once broke the property. ``tests/test_fuzz_decoding.py`` replays ``fuzz/corpus``
through :func:`check_input` on every test run, without atheris.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--seeds" not in sys.argv:
    # Instrument PIL's image plugins and grad2's decoders (not numpy/torch) for coverage.
    import atheris
    import numpy  # noqa: F401
    import torch
    import yaml  # noqa: F401

    with atheris.instrument_imports(include=["PIL", "grad2"]):
        import PIL.Image

        PIL.Image.init()  # import every image plugin now, while instrumenting
        from grad2.serve import codec

import base64
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import torch

from grad2.config import InputConfig
from grad2.serve import codec

#: The served models' input (as in ``integration_tests/conftest.py``).
SPEC = InputConfig.from_dict({"channels": 1, "height": 28, "width": 28, "mean": [0.286],
                              "std": [0.353], "max_side": 1024})
#: Seconds one input may take (generous: CI machines are shared).
TIME_LIMIT = 5.0
#: Content types a client may declare; the second byte of an input picks one.
CONTENT_TYPES: tuple[str | None, ...] = (
    None, "application/octet-stream", "application/json", "text/plain", "image/png",
    "multipart/form-data", "application/x-www-form-urlencoded", "application/ld+json",
    "image/jpeg; charset=binary", "TEXT/PLAIN; charset=utf-8",
)
KINDS = ("raw", "text", "json", "image_b64", "kserve_v1", "kserve_v2", "multipart", "row")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _json_or_bytes(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return bytearray(data)


def request_from(data: bytes) -> tuple[Any, str | None, str]:
    """``(row, content type, kind)`` for one fuzz input: its first byte picks how the rest
    reaches the handler, its second byte the declared content type."""
    if len(data) < 2:
        return {"body": bytearray(data)}, None, "raw"
    kind = KINDS[data[0] % len(KINDS)]
    content_type = CONTENT_TYPES[data[1] % len(CONTENT_TYPES)]
    rest = data[2:]
    if kind == "raw":
        row: Any = {"body": bytearray(rest)}
    elif kind == "text":  # TorchServe passes text/* bodies as str
        row = {"body": rest.decode("utf-8", "replace")}
    elif kind == "json":  # ... and application/json bodies already decoded
        row = {"body": _json_or_bytes(rest)}
    elif kind == "image_b64":
        row = {"body": {"image": _b64(rest)}}
    elif kind == "kserve_v1":
        row = {"body": {"instances": [{"data": _b64(rest)}, _b64(rest)]}}
    elif kind == "kserve_v2":
        row = {"body": {"id": "f", "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                                               "data": [_b64(rest)]}]}}
    elif kind == "multipart":
        row = {"data": bytearray(rest)}
    else:  # the row itself from JSON (several fields, odd names, not a mapping at all)
        row = _json_or_bytes(rest)
    return row, content_type, kind


def check_input(data: bytes) -> str:
    """Decode one fuzz input and check the property; returns ``"ok"`` or the status."""
    row, content_type, kind = request_from(data)
    return check_row(row, content_type, kind)


def check_row(row: Any, content_type: str | None, kind: str = "row") -> str:
    """Decode one request row as the handler does and check the property; returns
    ``"ok"`` or the refusal's status."""
    started = time.perf_counter()
    try:
        _, value = codec.select_payload(row)
        decoded = codec.decode_request(value, content_type, SPEC)
    except codec.RequestError as error:
        outcome = str(error.status)
        assert 400 <= error.status < 500, (kind, error.status)
        assert isinstance(error.message, str) and error.message, kind
    else:
        outcome = "ok"
        pixels = decoded.pixels
        assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.float32, kind
        assert pixels.ndim == 4 and tuple(pixels.shape[1:]) == (1, 28, 28), pixels.shape
        assert 1 <= pixels.shape[0] <= codec.MAX_IMAGES_PER_REQUEST, pixels.shape
        assert bool(torch.isfinite(pixels).all()), kind
        assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0, kind
    elapsed = time.perf_counter() - started
    assert elapsed < TIME_LIMIT, f"{kind} input took {elapsed:.1f} s"
    return outcome


def fuzz_one_input(data: bytes) -> None:
    """libFuzzer's entry point; keeps the input of a failure as ``crash-<sha1>`` under
    ``-artifact_prefix`` (atheris does not write it for Python exceptions)."""
    try:
        check_input(data)
    except BaseException:
        prefix = next((arg.split("=", 1)[1] for arg in sys.argv
                       if arg.startswith("-artifact_prefix=")), "./")
        Path(f"{prefix}crash-{hashlib.sha1(data).hexdigest()}").write_bytes(data)
        raise


# --------------------------------------------------------------------------- seeds


def seed_inputs() -> dict[str, bytes]:
    """Hand-made starting points: small images of every accepted format and several
    modes, and every JSON request form (each prefixed with its kind and content-type
    bytes, see :func:`request_from`)."""
    import numpy as np
    from PIL import Image

    def image(mode: str, fmt: str, size: tuple[int, int] = (6, 5), **save: Any) -> bytes:
        rng = np.random.default_rng(0)
        picture = Image.new(mode, size)
        if mode in ("L", "RGB", "RGBA", "LA", "P", "CMYK"):
            bands = len(picture.getbands())
            shape = (size[1], size[0], bands) if bands > 1 else (size[1], size[0])
            picture = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt, **save)
        return buffer.getvalue()

    def prefix(kind: str, content_type: str | None) -> bytes:
        return bytes([KINDS.index(kind), CONTENT_TYPES.index(content_type)])

    images = {
        "png_l": image("L", "PNG"), "png_rgba": image("RGBA", "PNG"),
        "png_p": image("P", "PNG"), "png_i16": image("I;16", "PNG"),
        "png_1x1": image("L", "PNG", (1, 1)), "jpeg_l": image("L", "JPEG"),
        "jpeg_cmyk": image("CMYK", "JPEG"), "gif": image("P", "GIF"),
        "bmp": image("RGB", "BMP"), "tiff_f": image("F", "TIFF"),
        "tiff_lzw": image("L", "TIFF", compression="tiff_lzw"), "webp": image("RGB", "WEBP"),
        "ppm": image("RGB", "PPM"), "tga": image("LA", "TGA"),
    }
    seeds = {f"raw_{name}": prefix("raw", None) + data for name, data in images.items()}
    seeds["b64_png"] = prefix("image_b64", "application/json") + images["png_l"]
    seeds["v1_jpeg"] = prefix("kserve_v1", "application/json") + images["jpeg_l"]
    seeds["v2_gif"] = prefix("kserve_v2", "application/json") + images["gif"]
    seeds["multipart_bmp"] = prefix("multipart", "image/png") + images["bmp"]
    seeds["text_b64"] = prefix("text", "text/plain") + _b64(images["png_l"]).encode()
    tensor = np.full((28, 28), 0.5).round(2).tolist()
    bodies = {
        "json_tensor": {"tensor": tensor},
        "json_v1_tensor": {"instances": [{"tensor": tensor}]},
        "json_v2_fp32": {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                     "data": np.full(784, 0.25).tolist()}]},
        "json_v2_nested": {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                                       "data": [[_b64(images["png_1x1"])]]}]},
        "json_b64_dict": {"data": {"b64": _b64(images["png_p"])}},
    }
    for name, body in bodies.items():
        seeds[name] = prefix("json", "application/json") + json.dumps(body).encode()
    seeds["row_two_fields"] = prefix("row", None) + b'{"a": "x", "b": "y"}'
    return seeds


def write_seeds(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in seed_inputs().items():
        (folder / f"seed_{name}").write_bytes(data)


if __name__ == "__main__":
    if "--seeds" in sys.argv:
        write_seeds(Path(sys.argv[sys.argv.index("--seeds") + 1]))
    else:
        atheris.Setup(sys.argv, fuzz_one_input)
        atheris.Fuzz()
